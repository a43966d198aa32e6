"""The SFT loss: next-token NLL on answer tokens only, logits taken at text slots only."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.sharding import forwards
from lvr_jax.model import PRESETS, LongVILA
from lvr_jax.sft.learner import sft_loss


def test_sft_loss_equals_nll_of_the_answer_tokens_from_full_logits(tokenizer):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    model = LongVILA(config, rngs=nnx.Rngs(0))
    frames = jax.random.uniform(jax.random.key(0), (2, 3, 56, 56, 3), minval=-1, maxval=1)
    v = tokenizer.video_id
    ids = jnp.asarray([[1, 2, v, 40, 41, 42, 43, 44], [1, v, 40, 41, 42, 43, 0, 0]])
    token_mask = jnp.asarray([[1] * 8, [1] * 6 + [0] * 2])
    loss_mask = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "loss_mask": loss_mask, "token_mask": token_mask,
             "frames": frames}
    loss, aux = sft_loss(model, batch, forwards.hidden_fn())

    expected, count = 0.0, 0
    for b in range(2):
        video = model.encode_video(frames[b])
        logits = model(ids[b:b + 1], video, valid=token_mask[b:b + 1].astype(bool))[0]
        logp = np.asarray(jax.nn.log_softmax(logits))
        p, n = int(np.argmax(np.asarray(ids[b]) == v)), video.shape[0]
        for k in np.nonzero(np.asarray(loss_mask[b]))[0]:
            slot = k + n - 1 if k > p else k  # where text token k sits in the merged sequence
            expected -= logp[slot - 1, int(ids[b, k])]
            count += 1
    assert int(aux["target_tokens"]) == count == 7
    np.testing.assert_allclose(float(loss), expected / count, rtol=1e-5)


def test_sft_that_trains_the_tower_feeds_it_normalised_frames_and_caches_nothing(
        tiny_train_config):
    from lvr_jax import build
    from lvr_jax.data.pipeline import sft_dataset
    from lvr_jax.sft.learner import SFTLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("sft", 2)
    config.sft.train_vision_tower = True
    tokenizer, model = build.build_model(config)
    before = jax.tree.map(np.asarray, nnx.state(model.vision_tower, nnx.Param))
    learner = SFTLearner(model, config, EmbeddingCache())
    batch = next(iter(sft_dataset(build.data_config(config, model), tokenizer)))
    frames = learner.device_batch(batch)["frames"]
    assert frames.dtype == jnp.float32 and -1.0 <= float(frames.min()) <= float(frames.max()) <= 1.0
    for _ in range(2):  # the first step's learning rate is 0 (warm-up)
        assert np.isfinite(float(learner.step(batch)["loss"]))
    after = nnx.state(learner.state.model().vision_tower, nnx.Param)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert not learner.videos.cache.entries

"""The re-encoding baseline (`benchmarks.rl_cache_speedup.reencoding_learner`, the reference's
behaviour) encodes the video again for every forward.

It must change only the cost of a step: the same rollout, log-probs and update as with the
embedding cache, with every encode done outside the cache.
"""

import jax
import numpy as np

from benchmarks.rl_cache_speedup import reencoding_learner
from lvr_jax import build
from lvr_jax.data.pipeline import rl_dataset
from lvr_jax.rl.learner import GRPOLearner
from lvr_jax.sharding.embedding_cache import EmbeddingCache


def one_step(config, batch, reencode: bool):
    """(learner, rollout with log-probs, update metrics, encoder calls) after one GRPO step."""
    tokenizer, model = build.build_model(config)  # same seed: same weights for both learners
    learner = (reencoding_learner(model, config, tokenizer) if reencode
               else GRPOLearner(model, config, tokenizer, EmbeddingCache()))
    calls = []
    encode = learner.videos.encode_normalised
    learner.videos.encode_normalised = lambda frames: calls.append(1) or encode(frames)
    rollout, _ = learner.rollout.collect(learner.state.model(), batch, jax.random.key(3))
    rollout, _ = learner.add_logprobs(rollout)
    metrics = learner.update(rollout, jax.random.key(4))
    metrics.update(learner.measure_update(rollout))
    return learner, rollout, metrics, len(calls)


def test_reencoding_learner_matches_the_cached_one_and_bypasses_the_cache(tiny_train_config):
    config = tiny_train_config("grpo", 1)
    config.data.batch_size = 2
    config.rl.update(num_generations=2, max_new_tokens=8, update_batch_size=1)
    tokenizer, model = build.build_model(config)
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    cached, cached_out, cached_metrics, cached_calls = one_step(config, batch, False)
    fresh, fresh_out, fresh_metrics, fresh_calls = one_step(config, batch, True)

    np.testing.assert_array_equal(fresh_out["tokens"], cached_out["tokens"])
    for key in ("rollout_logp", "old_logp", "ref_logp"):
        np.testing.assert_allclose(fresh_out[key], cached_out[key], atol=1e-5, err_msg=key)
    for key in ("pg_loss", "kl", "entropy"):
        np.testing.assert_allclose(fresh_metrics[key], cached_metrics[key], atol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 fresh.state.trainable, cached.state.trainable)

    prompts, g = len(batch["video_key"]), config.rl.num_generations
    sequences = prompts * g
    # Rollout: once per prompt (G samples share the prefill); then once per sequence for the
    # old-policy, reference, (one epoch of) update and update-measuring forwards.
    assert fresh_calls == prompts + 4 * sequences
    stats = fresh.videos.cache.stats
    assert stats.hits == stats.disk_hits == stats.misses == 0 and not fresh.videos.cache.entries
    assert cached_calls == len(set(batch["video_key"]))

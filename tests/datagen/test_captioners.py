"""The JAX captioner's prompt embeddings: each clip's video arranged on its own, through the
one video path (normalised, cached by content)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.model.siglip import normalize_frames
from lvr_jax.datagen.captioners import clip_embedder, clip_prompts
from lvr_jax.model import PRESETS, LongVILA
from lvr_jax.model.video_encoders import VideoEncoderConfig


def test_a_pooling_video_encoder_never_pools_across_the_clips_of_a_batch(tokenizer):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id,
                             video_encoder=VideoEncoderConfig("tsp", ((2, 1, 1), (4, 2, 2))))
    model = LongVILA(config, rngs=nnx.Rngs(0))
    frames = np.random.default_rng(0).integers(0, 255, (2, 4, 56, 56, 3), dtype=np.uint8)
    ids = jnp.asarray([[1, tokenizer.video_id, 5]] * 2)
    videos = clip_embedder(model)
    embeds, _ = clip_prompts(videos, model, ids, frames)
    clip_prompts(videos, model, ids, frames)
    assert videos.cache.stats.misses == 2 and videos.cache.stats.hits == 2
    for i in range(2):
        video = model.encode_video(normalize_frames(jnp.asarray(frames[i])))
        expected, _ = model.embed_inputs(ids[i:i + 1], video)
        np.testing.assert_allclose(embeds[i], expected[0], rtol=1e-5, atol=1e-6)

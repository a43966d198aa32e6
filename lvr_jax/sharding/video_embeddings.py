"""The one path from a batch's videos to the LLM's prompt embeddings (SFT, GRPO, evaluation).

uint8 frames as decoded -> `normalize_frames` -> the embedding cache, keyed by the video's
content, its frame indices and a fingerprint of the frozen encoder -> on a miss the frames
encoded split over the mesh (MR-SP stage 1: `frames.encode_video_sharded`, or
`frames.tower_features_sharded` for SFT), or on one device without a mesh -> spliced into
the prompt (`LongVILA.embed_inputs`). GRPO and evaluation cache whole video embeddings
(tower and projector frozen); SFT caches the tower's features and trains the projector on
top (`output="features"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.data.video import normalize_frames
from lvr_jax.sharding import frames as frames_lib
from lvr_jax.sharding.embedding_cache import CachedVideoEncoder, EmbeddingCache
from lvr_jax.sharding.mesh import DEFAULT_RULES

OUTPUTS = ("embeddings", "features")


def encoder_fn(model, output: str, mesh=None, rules=DEFAULT_RULES):
    """Normalised frames [F, H, W, 3] -> the video's embeddings [num_video_tokens(F), D] (or
    the tower's features [F, patches, C]); split over the mesh's frame axes when there is one."""
    if output not in OUTPUTS:
        raise ValueError(f"video output {output!r} is not one of {OUTPUTS}")
    if mesh is None:
        return jax.jit(model.encode_video if output == "embeddings" else model.vision_tower)
    if output == "features":
        return lambda x: frames_lib.tower_features_sharded(model, x, mesh, rules)

    def sharded(x):  # the padding rows past the real tokens are dropped
        embeds, _ = frames_lib.encode_video_sharded(model, x, mesh, rules)
        return embeds[:model.config.num_video_tokens(x.shape[0])]
    return sharded


class VideoEmbedder:
    """Videos and prompts of a batch (`frames`, `video_key`, `frame_indices`, `prompt_ids`,
    `prompt_mask`) -> video embeddings through the cache, and prompt embeddings."""

    def __init__(self, model, cache: EmbeddingCache | None = None, mesh=None,
                 rules=DEFAULT_RULES, output: str = "embeddings"):
        frozen = (nnx.state(model.vision_tower),)
        tag = ""
        if output == "embeddings":
            frozen += (nnx.state(model.mm_projector),)
            tag = model.config.video_encoder.cache_tag()
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encode_normalised = encoder_fn(model, output, mesh, rules)
        self.cached = CachedVideoEncoder(self.encode, frozen, self.cache, tag)
        self._embed = jax.jit(lambda m, ids, video, valid: m.embed_inputs(ids, video, valid))

    @property
    def fingerprint(self) -> str:
        return self.cached.fingerprint

    def encode(self, frames_fhwc: np.ndarray) -> jax.Array:
        """One video's uint8 frames, encoded now (bypassing the cache)."""
        return self.encode_normalised(normalize_frames(frames_fhwc))

    def normalised(self, batch: dict) -> jax.Array:
        """The batch's frames as the vision tower's input, uncached (SFT that trains the tower)."""
        return normalize_frames(jnp.asarray(batch["frames"]))

    def videos(self, batch: dict) -> jax.Array:
        """Each video of the batch through the cache: [B, ...]."""
        return self.cached(batch["frames"], batch["video_key"], batch["frame_indices"])

    def prompts(self, model, batch: dict, video=None):
        """Prompt embeddings [B, T', D] and validity with the videos spliced in; `video`:
        embeddings already at hand (else `videos(batch)`)."""
        video = self.videos(batch) if video is None else video
        return self._embed(model, jnp.asarray(batch["prompt_ids"]), video,
                           jnp.asarray(batch["prompt_mask"]).astype(bool))

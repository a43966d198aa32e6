"""The one path from a batch's videos to the LLM's prompt embeddings (SFT, GRPO, evaluation).

uint8 frames as decoded -> `normalize_frames` -> the embedding cache, keyed by the video's
content, its frame indices and a fingerprint of the frozen encoder -> on a miss the frames
encoded split over the mesh (MR-SP stage 1: `frames.encode_video_sharded`, or
`frames.tower_features_sharded` for SFT), or on one device without a mesh -> spliced into
the prompt (`LongVILA.embed_inputs`). GRPO and evaluation cache whole video embeddings
(tower and projector frozen); SFT caches the tower's features and trains the projector on
top (`output="features"`).

On several processes each encodes the videos it read on its own devices (`hosts.local_mesh`,
with a copy of the frozen encoder there) and the batch's arrays become global arrays
(`hosts.global_batch`); see `sharding/hosts.py`.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lvr_jax.data.video import normalize_frames
from lvr_jax.sharding import frames as frames_lib
from lvr_jax.sharding import hosts
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


class LocalEncoder:
    """A model's frozen video encoder (tower, projector, separator embeddings) copied whole
    onto the devices of `mesh`: what one process of several encodes its videos with."""

    def __init__(self, model, mesh):
        self.config = model.config
        self.vision_tower = hosts.local_module(model.vision_tower, mesh)
        self.mm_projector = hosts.local_module(model.mm_projector, mesh)
        self.separators = hosts.replicated_on(model.video_token_embeds(), mesh)

    def video_token_embeds(self) -> tuple:
        return self.separators


class VideoEmbedder:
    """Videos and prompts of a batch (`frames`, `video_key`, `frame_indices`, `prompt_ids`,
    `prompt_mask`) -> video embeddings through the cache, and prompt embeddings; `share`:
    which rows of the global batch this process's batches are (`hosts.row_share`)."""

    def __init__(self, model, cache: EmbeddingCache | None = None, mesh=None,
                 rules=DEFAULT_RULES, output: str = "embeddings",
                 share: hosts.RowShare = hosts.RowShare()):
        self.mesh, self.rules, self.share = mesh, rules, share
        encoder, encode_mesh = model, mesh
        if mesh is not None and hosts.multiprocess():
            encode_mesh = hosts.local_mesh(mesh)
            encoder = LocalEncoder(model, encode_mesh)
        frozen = (nnx.state(encoder.vision_tower),)
        tag = ""
        if output == "embeddings":
            frozen += (nnx.state(encoder.mm_projector),)
            tag = model.config.video_encoder.cache_tag()
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encode_normalised = encoder_fn(encoder, output, encode_mesh, rules)
        self.cached = CachedVideoEncoder(self.encode, frozen, self.cache, tag)
        self._embed = jax.jit(lambda m, ids, video, valid: m.embed_inputs(ids, video, valid))

    @property
    def fingerprint(self) -> str:
        return self.cached.fingerprint

    def encode(self, frames_fhwc: np.ndarray) -> jax.Array:
        """One video's uint8 frames, encoded now (bypassing the cache)."""
        return self.encode_normalised(normalize_frames(frames_fhwc))

    def global_batch(self, local) -> jax.Array:
        """This process's rows of a batch array -> the global batch (on one process: as is)."""
        return hosts.global_batch(local, self.mesh, self.rules, self.share)

    def normalised(self, batch: dict) -> jax.Array:
        """The batch's frames as the vision tower's input, uncached (SFT that trains the tower)."""
        return normalize_frames(self.global_batch(batch["frames"]))

    def videos(self, batch: dict) -> jax.Array:
        """Each video of the batch through the cache: [B, ...]."""
        encoded = self.cached(batch["frames"], batch["video_key"], batch["frame_indices"])
        return self.global_batch(hosts.fetch(encoded)) if hosts.multiprocess() else encoded

    def prompts(self, model, batch: dict, video=None):
        """Prompt embeddings [B, T', D] and validity with the videos spliced in; `video`:
        embeddings already at hand (else `videos(batch)`)."""
        video = self.videos(batch) if video is None else video
        return self._embed(model, self.global_batch(batch["prompt_ids"]), video,
                           self.global_batch(np.asarray(batch["prompt_mask"]).astype(bool)))

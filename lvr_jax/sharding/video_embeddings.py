"""The one path from a batch's videos to the LLM's prompt embeddings (SFT, GRPO, evaluation).

uint8 frames as decoded -> `siglip.normalize_frames` -> the embedding cache, keyed by the
video's content, its frame indices and a fingerprint of the frozen encoder -> on a miss the
frames encoded split over the mesh (MR-SP stage 1: `frames.encode_video_sharded`, or
`frames.tower_features_sharded` for SFT), or on one device without a mesh -> spliced into
the prompt (`LongVILA.embed_inputs`) -> placed for the passes (`prompts.PromptPlacement`).

What is frozen decides what is cached (`output`): GRPO and evaluation cache whole video
embeddings (tower and projector frozen); SFT caches the tower's features and projects them
with the projector it trains; SFT that trains the tower caches nothing. The frozen weights
are arguments of the compiled encoders, which are built once per embedder.

On several processes each encodes the videos it read on its own devices (`hosts.local_mesh`,
with a copy of the frozen encoder there) and the batch's arrays become global arrays
(`hosts.global_batch`); see `sharding/hosts.py`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from lvr_jax.model.siglip import normalize_frames
from lvr_jax.model.vlm import projected_video
from lvr_jax.sharding import frames as frames_lib
from lvr_jax.sharding import hosts
from lvr_jax.sharding.embedding_cache import CachedVideoEncoder, EmbeddingCache
from lvr_jax.sharding.mesh import DEFAULT_RULES
from lvr_jax.sharding.prompts import PromptPlacement

# What `VideoEmbedder.videos` gives per video: the video's embeddings (tower and projector
# frozen), the tower's features (tower frozen), or the normalised frames (nothing frozen).
OUTPUTS = ("embeddings", "features", "frames")


class FrozenEncoder:
    """The frozen parts that turn frames into video embeddings, apart from the LLM: the vision
    tower, the projector (`with_projector`) and the separator embeddings (taken once). With a
    `mesh` on one process of several, copied whole onto that process's devices."""

    def __init__(self, model, mesh=None, with_projector: bool = True):
        copy = ((lambda m: hosts.local_module(m, mesh)) if mesh is not None and
                hosts.multiprocess() else (lambda m: m))
        self.config = model.config
        self.vision_tower = copy(model.vision_tower)
        self.mm_projector = copy(model.mm_projector) if with_projector else None
        separators = model.video_token_embeds() if with_projector else ()
        self.separators = (hosts.replicated_on(separators, mesh) if mesh is not None and
                           hosts.multiprocess() else separators)

    def video_token_embeds(self) -> tuple:
        return self.separators


def _encode_on_one_device(graphdef, config, state, separators, frames_fhwc):
    tower, projector = nnx.merge(graphdef, state)
    features = tower(frames_fhwc)
    return features if projector is None else projected_video(projector, features, separators,
                                                              config)


def encoder_fn(encoder: FrozenEncoder, mesh=None, rules=DEFAULT_RULES):
    """Normalised frames [F, H, W, 3] -> the video's embeddings [num_video_tokens(F), D] (or,
    without a projector, the tower's features [F, patches, C]), compiled once with the
    weights as arguments; split over the mesh's frame axes when there is one."""
    if mesh is not None and encoder.mm_projector is None:
        return lambda x: frames_lib.tower_features_sharded(encoder, x, mesh, rules)
    if mesh is not None:
        def sharded(x):  # the padding rows past the real tokens are dropped
            embeds, _ = frames_lib.encode_video_sharded(encoder, x, mesh, rules)
            return embeds[:encoder.config.num_video_tokens(x.shape[0])]
        return sharded
    graphdef, state = nnx.split((encoder.vision_tower, encoder.mm_projector))
    encode = jax.jit(functools.partial(_encode_on_one_device, graphdef, encoder.config))
    return lambda x: encode(state, encoder.separators, x)


@functools.partial(jax.jit, static_argnames="output")
def _embed_prompts(model, ids, video, valid, *, output: str):
    """Prompt embeddings with the videos spliced in, from what `VideoEmbedder.videos` gave."""
    if output == "features":
        video = jax.vmap(model.project_features)(video)
    elif output == "frames":
        video = jax.vmap(model.encode_video)(video)
    return model.embed_inputs(ids, video, valid)


class VideoEmbedder:
    """Videos and prompts of a batch (`frames`, `video_key`, `frame_indices`, `prompt_ids`,
    `prompt_mask`) -> each video as `output` says (through the cache), and prompt
    embeddings; `share`: which rows of the global batch this process's batches are
    (`hosts.row_share`)."""

    def __init__(self, model, cache: EmbeddingCache | None = None, mesh=None,
                 rules=DEFAULT_RULES, output: str = "embeddings",
                 share: hosts.RowShare = hosts.RowShare()):
        if output not in OUTPUTS:
            raise ValueError(f"video output {output!r} is not one of {OUTPUTS}")
        self.mesh, self.rules, self.share, self.output = mesh, rules, share, output
        self.placement = PromptPlacement(mesh, rules)
        self.cache = cache if cache is not None else EmbeddingCache()
        if output == "frames":
            return
        encode_mesh = hosts.local_mesh(mesh) if mesh is not None else None
        encoder = FrozenEncoder(model, encode_mesh, with_projector=output == "embeddings")
        self.encode_normalised = encoder_fn(encoder, encode_mesh, rules)
        frozen = (nnx.state(encoder.vision_tower),)
        tag = ""
        if output == "embeddings":
            frozen += (nnx.state(encoder.mm_projector),)
            tag = model.config.video_encoder.cache_tag()
        self.cached = CachedVideoEncoder(self.encode, frozen, self.cache, tag)

    @property
    def fingerprint(self) -> str:
        return self.cached.fingerprint

    def encode(self, frames_fhwc: np.ndarray) -> jax.Array:
        """One video's uint8 frames, encoded now (bypassing the cache)."""
        return self.encode_normalised(normalize_frames(frames_fhwc))

    def global_batch(self, local) -> jax.Array:
        """This process's rows of a batch array -> the global batch (on one process: as is)."""
        return hosts.global_batch(local, self.mesh, self.rules, self.share)

    def videos(self, batch: dict) -> jax.Array:
        """Each video of the batch as `output` says, [B, ...]: through the cache, or (nothing
        frozen) its frames normalised."""
        if self.output == "frames":
            return normalize_frames(self.global_batch(batch["frames"]))
        encoded = self.cached(batch["frames"], batch["video_key"], batch["frame_indices"])
        return self.global_batch(hosts.fetch(encoded)) if hosts.multiprocess() else encoded

    def prompts(self, model, batch: dict, video=None):
        """Prompt embeddings [B, T', D] and validity with the videos spliced in (what the
        frozen parts gave finished by `model`'s own), placed for the passes; `video`: what
        `videos(batch)` would give, already at hand."""
        video = self.videos(batch) if video is None else video
        embeds, valid = _embed_prompts(
            model, self.global_batch(batch["prompt_ids"]), video,
            self.global_batch(np.asarray(batch["prompt_mask"]).astype(bool)), output=self.output)
        return self.placement.place(embeds, valid)

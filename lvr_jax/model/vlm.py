"""LongVILA: SigLIP tower + projector + Qwen2, with one video placeholder per prompt.

`encode_video` turns frames into `config.num_video_tokens(F)` embeddings: projector tokens
arranged by the configured video encoder (basic: each frame's tokens then the embedding of
"\\n"; tsp: pooled first, see video_encoders.py); `__call__` splices them in place of the `<vila/video>`
token of each prompt and returns the LLM's logits.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.kernels import dot_product_attention
from lvr_jax.model import video_encoders
from lvr_jax.model.config import LongVILAConfig
from lvr_jax.model.projector import Projector
from lvr_jax.model.qwen2 import KVCache, Qwen2
from lvr_jax.model.siglip import SiglipVisionTower


class LongVILA(nnx.Module):
    def __init__(self, config: LongVILAConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision, remat=config.remat, rngs=rngs, **kw)
        self.mm_projector = Projector(config.projector_type, config.vision.hidden_size,
                                      config.llm.hidden_size, rngs=rngs, **kw)
        self.llm = Qwen2(config.llm, remat=config.remat, remat_group=config.remat_group,
                         rngs=rngs, **kw)

    def embed_tokens(self, ids):
        return self.llm.embed(ids)

    def encode_video(self, frames_fhwc):
        """Frames [F, H, W, 3] in [-1, 1] -> [num_video_tokens(F), hidden]."""
        return self.project_features(self.vision_tower(frames_fhwc))

    def project_features(self, features_fpc):
        """Vision features [F, patches, C] -> [num_video_tokens(F), hidden].

        The half of `encode_video` after the vision tower: SFT caches the (frozen) tower's
        features and trains the projector through this.
        """
        return projected_video(self.mm_projector, features_fpc, self.video_token_embeds(),
                               self.config)

    def video_token_embeds(self) -> tuple:
        """The video encoder's (start, end, sep) token embeddings, each [n, D] or None."""
        ids = self.config.video_encoder.token_ids(self.config.newline_token_id)
        return tuple(self.embed_tokens(jnp.asarray(i, jnp.int32)) if i else None for i in ids)

    def embed_inputs(self, input_ids_bt, video_embeds_bnd=None, valid_bt=None,
                     video_valid_bn=None):
        """Token embeddings with each row's placeholder replaced by its video embeddings.

        Returns (embeds [B, T - 1 + N, D], valid [B, T - 1 + N]); without video, T tokens.
        `video_valid_bn` ([N] or [B, N]) masks padding frames of sharded encoding.
        """
        valid_bt = jnp.ones(input_ids_bt.shape, bool) if valid_bt is None else valid_bt
        # The placeholder's own id may lie past the embedding table (VILA adds it to the
        # tokenizer only); it is replaced anyway, so embed the pad id in its place.
        is_placeholder = input_ids_bt == self.config.video_token_id
        embeds = self.embed_tokens(jnp.where(is_placeholder, 0, input_ids_bt))
        if video_embeds_bnd is None:
            return embeds, valid_bt
        if video_embeds_bnd.ndim == 2:
            video_embeds_bnd = jnp.broadcast_to(video_embeds_bnd,
                                                (input_ids_bt.shape[0], *video_embeds_bnd.shape))
        check_one_placeholder(input_ids_bt, self.config.video_token_id)
        video = video_embeds_bnd.astype(embeds.dtype)
        merged = splice_video(embeds, input_ids_bt, video, self.config.video_token_id)
        video_valid = (jnp.ones(video.shape[:2], bool) if video_valid_bn is None
                       else jnp.broadcast_to(video_valid_bn, video.shape[:2]).astype(bool))
        merged_valid = splice_video(valid_bt, input_ids_bt, video_valid,
                                    self.config.video_token_id)
        return merged, merged_valid

    def __call__(self, input_ids_bt, video_embeds=None, *, frames=None, valid=None,
                 positions=None, cache: Optional[KVCache] = None,
                 attention_fn=dot_product_attention, video_valid=None):
        """Logits [B, T', V] for prompts whose placeholder is replaced by video embeddings.

        Pass `video_embeds` ([N, D] shared or [B, N, D]) from `encode_video` (or the
        embedding cache), or `frames` [F, H, W, 3] to encode here.
        """
        if frames is not None:
            video_embeds = self.encode_video(frames)
        embeds, valid = self.embed_inputs(input_ids_bt, video_embeds, valid, video_valid)
        return self.llm(inputs_embeds=embeds, valid=valid, positions=positions, cache=cache,
                        attention_fn=attention_fn)


def projected_video(projector, features_fpc, separators: tuple, config: LongVILAConfig):
    """Vision features [F, patches, C] -> [num_video_tokens(F), D]: the projector's tokens
    arranged by the video encoder (pooling, "\\n"s, the (start, end, sep) embeddings)."""
    tokens_ftd = projector(features_fpc).astype(jnp.dtype(config.dtype))  # as embed_tokens
    return video_encoders.arrange_video(tokens_ftd, config.video_encoder.pools, *separators)


def splice_index(input_ids_bt, num_video: int, video_token_id: int):
    """For each output slot: (is_video, index into the text, index into the video)."""
    t = input_ids_bt.shape[1]
    placeholder_b = jnp.argmax(input_ids_bt == video_token_id, axis=1)[:, None]
    slot = jnp.arange(t - 1 + num_video)[None, :]
    is_video = (slot >= placeholder_b) & (slot < placeholder_b + num_video)
    text_index = jnp.where(slot < placeholder_b, slot, slot - num_video + 1)
    video_index = jnp.clip(slot - placeholder_b, 0, num_video - 1)
    return is_video, jnp.clip(text_index, 0, t - 1), video_index


def splice_video(text_bt, input_ids_bt, video_bn, video_token_id: int):
    """Per-token values [B, T, ...] with the placeholder replaced by video values [B, N, ...]."""
    is_video, text_index, video_index = splice_index(input_ids_bt, video_bn.shape[1],
                                                     video_token_id)
    take = lambda a, i: jnp.take_along_axis(a, i.reshape(*i.shape, *([1] * (a.ndim - 2))), 1)  # noqa: E731
    is_video = is_video.reshape(*is_video.shape, *([1] * (text_bt.ndim - 2)))
    return jnp.where(is_video, take(video_bn, video_index), take(text_bt, text_index))


def check_one_placeholder(input_ids_bt, video_token_id: int) -> None:
    """Raises for rows without exactly one video placeholder (when ids are concrete)."""
    if isinstance(input_ids_bt, jax.core.Tracer):
        return
    counts = jnp.sum(input_ids_bt == video_token_id, axis=1)
    bad = [int(i) for i in jnp.nonzero(counts != 1)[0]]
    if bad:
        raise ValueError(f"rows {bad} of input_ids hold {[int(counts[i]) for i in bad]} video "
                         f"placeholders (id {video_token_id}); each prompt needs exactly one")

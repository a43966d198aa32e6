"""MR-SP stage 1: sequence-parallel frame encoding.

The frames of a video are split over the `sp` mesh axis (several videos also over
data+fsdp); every device runs the vision tower and projector on its own frames with no
communication between devices, and the embeddings come out sharded along the sequence,
the layout the LLM's sequence-parallel forward wants. A frame count that does not divide
is padded with blank frames whose tokens are marked invalid, never truncated.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvr_jax.sharding.mesh import BATCH_AXES

FRAME_AXES = ("sp",)


def padded_frames(num_frames: int, mesh: Mesh, axes=FRAME_AXES) -> int:
    """Frame count rounded up to a multiple of the devices the frames are split over."""
    n = math.prod(mesh.shape[a] for a in axes)
    return -(-num_frames // n) * n


def _encode_local(graphdef, state, newline_d, frames_vfhwc):
    """Runs on one device: its frames [v, f, H, W, 3] -> tokens [v, f * tokens, D]."""
    tower, projector = nnx.merge(graphdef, state)
    v, f = frames_vfhwc.shape[:2]
    tokens_ftd = projector(tower(frames_vfhwc.reshape(v * f, *frames_vfhwc.shape[2:])))
    newline = jnp.broadcast_to(newline_d.astype(tokens_ftd.dtype), (v * f, 1, newline_d.shape[-1]))
    tokens = jnp.concatenate([tokens_ftd, newline], axis=1)
    return tokens.reshape(v, -1, tokens.shape[-1])


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "axes", "tokens"))
def _encode(graphdef, state, newline_d, frames_vfhwc, *, mesh, axes, tokens):
    """Pads the frames, encodes each device's share, marks the real tokens valid."""
    num_frames = frames_vfhwc.shape[1]
    pad = padded_frames(num_frames, mesh, axes) - num_frames
    frames_vfhwc = jnp.pad(frames_vfhwc, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    batch = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1 and a not in axes) or None
    frame_spec = P(batch, axes)
    frames_vfhwc = jax.lax.with_sharding_constraint(frames_vfhwc, NamedSharding(mesh, frame_spec))
    encode = jax.shard_map(functools.partial(_encode_local, graphdef), mesh=mesh,
                           in_specs=(P(), P(), frame_spec), out_specs=P(batch, axes, None),
                           check_vma=False)
    embeds = encode(state, newline_d, frames_vfhwc)
    valid = jnp.arange(embeds.shape[1]) < num_frames * tokens
    return embeds, jax.lax.with_sharding_constraint(valid, NamedSharding(mesh, P(axes)))


def encode_video_sharded(model, frames, mesh: Mesh, axes=FRAME_AXES):
    """Frames [F, H, W, 3] (or [V, F, H, W, 3]) -> (embeds [N, D], valid [N]) sharded on sp.

    N = padded_frames(F) * tokens_per_frame; the first F * tokens_per_frame rows equal
    `model.encode_video(frames)` and `valid` marks them. Pass both to the model
    (`video_embeds=`, `video_valid=`) so padding frames are masked.
    """
    axes = tuple(axes)
    single = frames.ndim == 4
    graphdef, state = nnx.split((model.vision_tower, model.mm_projector))
    newline_d = model.embed_tokens(jnp.array([model.config.newline_token_id]))[0]
    embeds, valid = _encode(graphdef, state, newline_d, frames[None] if single else frames,
                            mesh=mesh, axes=axes, tokens=model.config.tokens_per_frame)
    return (embeds[0], valid) if single else (embeds, valid)

"""MR-SP stage 1: sequence-parallel frame encoding.

The frames of a video are split over the mesh axes the rules give `activation_frames`
(`sp` by default; several videos over those of `activation_batch`, data+fsdp); every
device runs the vision tower and projector on its own frames with no communication
between devices, and the embeddings come out sharded along the sequence, the layout the
LLM's sequence-parallel forward wants. A frame count that does not divide
is padded with blank frames whose tokens are marked invalid, never truncated. The tsp
video encoder pools across frames, so it arranges the real frames' tokens after the
per-device encoding (XLA moves what the pooling groups need) and pads the result.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvr_jax.model import video_encoders
from lvr_jax.sharding.mesh import DEFAULT_RULES, logical_to_spec, spec_axes

# Logical names of the dimensions of frames [V, F, H, W, 3]; the rules give their mesh axes.
VIDEO_FRAME_AXES = ("activation_batch", "activation_frames")
# Frames each device runs through the vision tower at a time: its activations (a 448 px frame
# is 1,024 patches, 4,304 wide in the MLP) then stay those of 8 frames, whatever the video's
# length (4,096 frames of the 7B's tower on sp = 4: 39 GiB of temporaries at once, 3 in chunks).
FRAMES_PER_PASS = 8


def frame_spec(mesh: Mesh, rules=DEFAULT_RULES, num_videos: int | None = None) -> P:
    """The spec of frames [V, F, ...] and of their tokens [V, N, ...] under the rules; the
    videos stay unsplit where the batch axes do not divide `num_videos` (e.g. one video)."""
    spec = logical_to_spec(VIDEO_FRAME_AXES, mesh, rules)
    batch = math.prod(mesh.shape[a] for a in spec_axes(spec, 0))
    if num_videos is not None and num_videos % batch:
        return P(None, *spec[1:])
    return spec


def frame_devices(mesh: Mesh, spec: P) -> int:
    """How many devices share the frames of one video under `spec`."""
    return math.prod(mesh.shape[a] for a in spec_axes(spec, 1))


def padded_frames(num_frames: int, mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """Frame count rounded up to a multiple of the devices the frames are split over."""
    n = frame_devices(mesh, frame_spec(mesh, rules))
    return -(-num_frames // n) * n


def in_frame_chunks(encode, frames_fhwc):
    """encode(frames [n, H, W, 3]) -> [n, ...] over all frames, `FRAMES_PER_PASS` at a time."""
    return jax.lax.map(lambda x: encode(x[None])[0], frames_fhwc, batch_size=FRAMES_PER_PASS)


def _encode_local(graphdef, state, token_embeds, frames_vfhwc, *, arrange):
    """Runs on one device: its frames [v, f, H, W, 3] -> tokens [v, n, D].

    With `arrange` (an encoder that works frame by frame) the tokens are the video's
    embeddings for these frames; without, the raw projector tokens [v, f, T, D].
    """
    tower, projector = nnx.merge(graphdef, state)
    v, f = frames_vfhwc.shape[:2]
    tokens_ftd = in_frame_chunks(lambda x: projector(tower(x)),
                                 frames_vfhwc.reshape(v * f, *frames_vfhwc.shape[2:]))
    tokens_vftd = tokens_ftd.reshape(v, f, *tokens_ftd.shape[1:])
    if arrange is None:
        return tokens_vftd
    return jax.vmap(lambda t: arrange(t, *token_embeds))(tokens_vftd)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "spec", "encoder"))
def _encode(graphdef, state, token_embeds, frames_vfhwc, *, mesh, spec, encoder):
    """Pads the frames, encodes each device's share (`spec`), marks the real tokens valid."""
    num_frames, devices = frames_vfhwc.shape[1], frame_devices(mesh, spec)
    padded = -(-num_frames // devices) * devices
    frames_vfhwc = jnp.pad(frames_vfhwc, ((0, 0), (0, padded - num_frames), (0, 0), (0, 0), (0, 0)))
    frames_vfhwc = jax.lax.with_sharding_constraint(frames_vfhwc, NamedSharding(mesh, spec))
    def arrange(tokens_ftd, start, end, sep):
        return video_encoders.arrange_video(tokens_ftd, encoder.pools, start, end, sep)
    local = encoder.kind == "basic"  # frame by frame: arranged on each device
    encode = jax.shard_map(functools.partial(_encode_local, graphdef,
                                             arrange=arrange if local else None),
                           mesh=mesh, in_specs=(P(), P(), spec), out_specs=spec,
                           check_vma=False)
    embeds = encode(state, token_embeds, frames_vfhwc)
    if local:
        num_valid = num_frames * (embeds.shape[1] // padded)
    else:  # pooling spans frames of several devices: arranged on the real frames, then padded
        embeds = jax.vmap(lambda t: arrange(t, *token_embeds))(embeds[:, :num_frames])
        num_valid = embeds.shape[1]
        embeds = jnp.pad(embeds, ((0, 0), (0, -num_valid % devices), (0, 0)))
    embeds = jax.lax.with_sharding_constraint(embeds, NamedSharding(mesh, P(*spec, None)))
    valid = jnp.arange(embeds.shape[1]) < num_valid
    return embeds, jax.lax.with_sharding_constraint(valid, NamedSharding(mesh, P(spec[1])))


def encode_video_sharded(model, frames, mesh: Mesh, rules=DEFAULT_RULES):
    """Frames [F, H, W, 3] (or [V, F, H, W, 3]) -> (embeds [N, D], valid [N]) sharded on sp
    (the axes the rules give `activation_frames`; videos over `activation_batch`'s).

    The first `config.num_video_tokens(F)` rows equal `model.encode_video(frames)` and
    `valid` marks them; N rounds up to whole frames per device (basic encoder) or to a
    multiple of the devices (tsp). Pass both to the model (`video_embeds=`,
    `video_valid=`) so the padding is masked.
    """
    single = frames.ndim == 4
    graphdef, state = nnx.split((model.vision_tower, model.mm_projector))
    model.config.num_video_tokens(frames.shape[-4])  # refuses frame counts pools do not divide
    frames = frames[None] if single else frames
    embeds, valid = _encode(graphdef, state, model.video_token_embeds(), frames, mesh=mesh,
                            spec=frame_spec(mesh, rules, frames.shape[0]),
                            encoder=model.config.video_encoder)
    return (embeds[0], valid) if single else (embeds, valid)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "spec"))
def _tower(graphdef, state, frames_vfhwc, *, mesh, spec):
    """Vision features [V, F', P, C] of frames padded to whole frames per device."""
    num_frames, devices = frames_vfhwc.shape[1], frame_devices(mesh, spec)
    padded = -(-num_frames // devices) * devices
    frames_vfhwc = jnp.pad(frames_vfhwc, ((0, 0), (0, padded - num_frames), (0, 0), (0, 0), (0, 0)))
    frames_vfhwc = jax.lax.with_sharding_constraint(frames_vfhwc, NamedSharding(mesh, spec))

    def local(state, frames):
        tower = nnx.merge(graphdef, state)
        v, f = frames.shape[:2]
        features = in_frame_chunks(tower, frames.reshape(v * f, *frames.shape[2:]))
        return features.reshape(v, f, *features.shape[1:])
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=spec,
                         check_vma=False)(state, frames_vfhwc)


def tower_features_sharded(model, frames, mesh: Mesh, rules=DEFAULT_RULES):
    """Frames [F, H, W, 3] -> the vision tower's features [F, patches, C], each device
    running the tower on its own frames (SFT caches these and trains the projector)."""
    graphdef, state = nnx.split(model.vision_tower)
    features = _tower(graphdef, state, frames[None], mesh=mesh,
                      spec=frame_spec(mesh, rules, num_videos=1))
    return features[0, :frames.shape[0]]

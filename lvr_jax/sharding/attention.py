"""Sequence-parallel attention over one mesh axis (`sp` by default): all_gather, ulysses, ring.

`make_attention_fn(mesh, strategy, rules=...)` returns an `attention_fn` for `Qwen2` /
`LongVILA`: a `jax.shard_map` over the mesh whose inputs and outputs stay sharded along
the sequence. Its specs come from the rules table (`attention_layout`): by default batch
over data+fsdp, the sequence over sp, heads over tp; a recipe that changes the rules
changes them. Inside, each strategy is a pure function of the local blocks, built on the
one-device kernels of `lvr_jax.kernels`, whose collectives run over the mesh axis the
rules split the sequence over (`axis`):
  all_gather  K/V (and key positions) gathered over the axis; queries stay local.
  ulysses     all_to_all trades sequence for heads, full-length attention on H/sp heads.
  ring        K/V blocks travel around the ring with ppermute; online softmax; custom
              backward sends dK/dV around with them. Use `zigzag` order to balance work.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lvr_jax.kernels import blockwise
from lvr_jax.kernels.local import KERNELS, blocked, local_attention
from lvr_jax.kernels.prefix import prefix_attention, prefix_forward
from lvr_jax.sharding.mesh import DEFAULT_RULES, STRATEGIES, logical_to_spec, spec_axes

# Logical names of the attention operands; the rules table gives their mesh axes.
Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)
POS_AXES = ("activation_batch", "activation_length")


# ---- strategies: pure functions of the local blocks, run inside shard_map over `axis` ----

def all_gather_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                         kernel: str = "blockwise", *, axis: str):
    """Local queries against keys/values gathered from every shard along `axis`."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    return local_attention(q_bthd, gather(k_bskd), gather(v_bskd), q_pos_bt, gather(kv_pos_bs),
                           block, kernel)


def replicate_kv_heads(k_bskd, num_heads: int, sp: int):
    """Repeats KV heads (keeping the query grouping) until their count divides by sp."""
    kvh = k_bskd.shape[2]
    repeat = next(r for r in range(1, num_heads // kvh + 1)
                  if (kvh * r) % sp == 0 and num_heads % (kvh * r) == 0)
    return jnp.repeat(k_bskd, repeat, axis=2)


def ulysses_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                      kernel: str = "blockwise", *, axis: str):
    """all_to_all to [full sequence, heads/sp], attention, and back (sp: size of `axis`)."""
    sp = jax.lax.axis_size(axis)
    h = q_bthd.shape[2]
    if h % sp:
        raise ValueError(f"ulysses needs (local) query heads {h} divisible by {axis}={sp}; "
                         "use ring or all_gather")
    k, v = (replicate_kv_heads(x, h, sp) for x in (k_bskd, v_bskd))
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=2,
                                 concat_axis=1, tiled=True)
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=1, tiled=True)
    out = local_attention(to_heads(q_bthd), to_heads(k), to_heads(v), gather(q_pos_bt),
                          gather(kv_pos_bs), block, kernel)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring_shift(xs, axis: str):
    """Sends each array to the next device of the ring along `axis`."""
    sp = jax.lax.axis_size(axis)
    perm = [(i, (i + 1) % sp) for i in range(sp)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), xs)


def _ring_forward(q, k, v, q_pos, kv_pos, qb, kb, axis):
    """(o, lse) of local queries against every shard's keys, passed round the ring."""
    sp = jax.lax.axis_size(axis)
    o, lse = blockwise.forward_stats(q, k, v, q_pos, kv_pos, qb, kb)

    def step(_, carry):
        o, lse, kv = carry
        kv = _ring_shift(kv, axis)
        k_i, v_i, kv_pos_i = kv
        o_i, lse_i = blockwise.forward_stats(q, k_i, v_i, q_pos, kv_pos_i, qb, kb)
        return (*blockwise.merge(o, lse, o_i, lse_i), kv)

    o, lse, _ = jax.lax.fori_loop(0, sp - 1, step, (o, lse, (k, v, kv_pos)))
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring_core(q, k, v, q_pos, kv_pos, qb, kb, axis):
    return _ring_forward(q, k, v, q_pos, kv_pos, qb, kb, axis)[0].astype(q.dtype)


def _ring_fwd(q, k, v, q_pos, kv_pos, qb, kb, axis):
    o, lse = _ring_forward(q, k, v, q_pos, kv_pos, qb, kb, axis)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_pos, kv_pos, o, lse)


def _ring_bwd(qb, kb, axis, res, do):
    """Each K/V block goes round the ring again with its dK/dV accumulator and ends home."""
    q, k, v, q_pos, kv_pos, o, lse = res
    do = do.astype(jnp.float32)
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)

    def step(_, carry):
        dq, (k_i, v_i, pos_i, dk_i, dv_i) = carry
        dq_i, dk_add, dv_add = blockwise.backward(q, k_i, v_i, q_pos, pos_i, do, lse, delta,
                                                  qb, kb)
        travelling = _ring_shift((k_i, v_i, pos_i, dk_i + dk_add, dv_i + dv_add), axis)
        return dq + dq_i, travelling

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = (jnp.zeros(q.shape, jnp.float32), (k, v, kv_pos, *zeros))
    dq, (_, _, _, dk, dv) = jax.lax.fori_loop(0, jax.lax.axis_size(axis), step, carry)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_core.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                   kernel: str = "blockwise", *, axis: str):
    """Local queries against K/V blocks passed round the ring along `axis` (online softmax)."""
    if kernel != "blockwise":
        raise ValueError(f"ring attention runs the blockwise kernel only, not {kernel!r}")
    core = lambda *args: _ring_core(*args, axis)  # noqa: E731  (custom_vjp: axis positional)
    return blocked(core, q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block)


LOCAL_STRATEGIES = {"all_gather": all_gather_attention, "ulysses": ulysses_attention,
                    "ring": ring_attention}


# ---- the shard_map wrapper: its specs come from the rules table ----------------------------

@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """Where the rules put attention's operands on a mesh: the shard_map specs of queries,
    keys/values and positions, and the one mesh axis that splits the sequence, over which
    the strategies' collectives run (None: every device holds whole sequences)."""

    q: P
    kv: P
    pos: P
    axis: str | None
    size: int  # devices along `axis`; 1 when None


def sequence_axis(spec: P, dim: int = 1) -> str | None:
    """The one mesh axis that `spec` splits the sequence (dimension `dim`) over; None if whole.

    The strategies' collectives (all_gather, all_to_all, ppermute, psum) name one mesh axis,
    so rules that split the sequence over several are refused here, before tracing.
    """
    axes = spec_axes(spec, dim)
    if len(axes) > 1:
        raise ValueError(f"mesh.rules put activation_length on the mesh axes {axes}; "
                         "sequence-parallel attention exchanges keys over one mesh axis: map "
                         "activation_length to one, e.g. ('activation_length', 'sp')")
    return axes[0] if axes else None


def attention_layout(mesh: Mesh, rules=DEFAULT_RULES) -> AttentionLayout:
    """The specs the rules give Q_AXES, KV_AXES and POS_AXES on `mesh`, and the sequence axis."""
    q, kv, pos = (logical_to_spec(names, mesh, rules) for names in (Q_AXES, KV_AXES, POS_AXES))
    if spec_axes(q, 2) != spec_axes(kv, 2):
        raise ValueError(f"mesh.rules put activation_heads on {spec_axes(q, 2) or 'no mesh axis'} "
                         f"and activation_kv_heads on {spec_axes(kv, 2) or 'no mesh axis'}; "
                         "attention keeps each query head on the device of its KV head: map "
                         "both to the same mesh axes")
    axis = sequence_axis(pos)
    return AttentionLayout(q, kv, pos, axis, mesh.shape[axis] if axis else 1)


def make_attention_fn(mesh: Mesh, strategy: str = "ring", block_size: int = 512,
                      kernel: str = "blockwise", rules=DEFAULT_RULES):
    """An `attention_fn(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs)` sharded by the rules.

    Under the default rules batch goes over data+fsdp, the sequence over sp, heads over tp
    (`attention_layout`); T and S must divide by the sequence axis (pad with
    `pad_sequence`). Training and prefill only (no KV cache). `kernel` is the per-device
    attention: "blockwise" (any backend) or "cudnn" (NVIDIA GPUs; an unsplit sequence or
    ulysses, where each device sees whole sequences).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"mesh.attention {strategy!r} is not one of {STRATEGIES}")
    if kernel not in KERNELS:
        raise ValueError(f"mesh.kernel {kernel!r} is not one of {tuple(KERNELS)}")
    layout = attention_layout(mesh, rules)
    if kernel == "cudnn" and layout.axis is not None and strategy != "ulysses":
        raise ValueError(f"mesh.kernel 'cudnn' with the sequence split over "
                         f"{layout.axis}={layout.size} needs attention='ulysses', not {strategy!r}")
    if layout.axis is None:  # whole sequences on every device: no exchange
        local = functools.partial(local_attention, block=block_size, kernel=kernel)
    else:
        local = functools.partial(LOCAL_STRATEGIES[strategy], block=block_size, kernel=kernel,
                                  axis=layout.axis)
    sharded = jax.shard_map(local, mesh=mesh, out_specs=layout.q, check_vma=False,
                            in_specs=(layout.q, layout.kv, layout.kv, layout.pos, layout.pos))

    def attention_fn(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs):
        check_divisible(q_bthd, k_bskd, mesh, layout)
        return sharded(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs)

    return attention_fn


def make_prefix_attention_fn(mesh: Mesh, block_size: int = 512, rules=DEFAULT_RULES):
    """A `PrefixAttentionFn` (`kernels.prefix`) for continuations and their prompts' keys
    and values both split along their length over the sequence axis of the rules (batch and
    heads as `attention_layout` places them): each device takes the partial softmax of its
    prompt shard; only the (short) continuations cross devices. What every GRPO pass runs
    after a prompt's one forward, whatever strategy that forward took."""
    layout = attention_layout(mesh, rules)
    local = lambda *args: prefix_attention(*args, block_size, layout.axis)  # noqa: E731
    sharded = jax.shard_map(local, mesh=mesh, out_specs=layout.q, check_vma=False,
                            in_specs=(layout.q, layout.kv, layout.kv, layout.pos, layout.pos,
                                      layout.kv, layout.kv, layout.pos))

    def attention_fn(q, k, v, q_pos, kv_pos, prefix_k, prefix_v, prefix_pos):
        check_divisible(q, prefix_k, mesh, layout)
        return sharded(q, k, v, q_pos, kv_pos, prefix_k, prefix_v, prefix_pos)
    return attention_fn


def make_prefix_decode_fn(mesh: Mesh, block_size: int = 512, rules=DEFAULT_RULES):
    """The decoding step's `PrefixAttentionFn`: the new tokens and each sample's own cache
    whole on every device of the sequence axis, the shared prompt cache split along it; the
    prompt shards' partial softmaxes are combined across the axis (forward only)."""
    layout = attention_layout(mesh, rules)
    whole = lambda spec: P(spec[0], None, *spec[2:])  # noqa: E731  (length not split)

    def local(q, k, v, q_pos, kv_pos, prefix_k, prefix_v, prefix_pos):
        o, _ = prefix_forward(q, k, v, q_pos, kv_pos, prefix_k, prefix_v, prefix_pos,
                              block_size, layout.axis)
        return o.astype(q.dtype)
    return jax.shard_map(local, mesh=mesh, out_specs=whole(layout.q), check_vma=False,
                         in_specs=(whole(layout.q), whole(layout.kv), whole(layout.kv),
                                   whole(layout.pos), whole(layout.pos), layout.kv, layout.kv,
                                   layout.pos))


def check_divisible(q_bthd, k_bskd, mesh: Mesh, layout: AttentionLayout | None = None) -> None:
    """Names the dimension (and the fix) when a shape does not split as the layout asks."""
    layout = layout or attention_layout(mesh)

    def split(spec, dim):  # ("fsdp*tp", devices) of one dimension
        axes = spec_axes(spec, dim)
        return "*".join(axes), math.prod(mesh.shape[a] for a in axes)

    (seq_name, seq), (batch_name, batch) = split(layout.pos, 1), split(layout.pos, 0)
    heads_name, heads = split(layout.q, 2)
    problems = []
    if q_bthd.shape[1] % seq or k_bskd.shape[1] % seq:
        problems.append(f"sequence {q_bthd.shape[1]} does not divide by {seq_name}={seq}: pad "
                        "it with lvr_jax.sharding.attention.pad_sequence")
    if q_bthd.shape[0] % batch:
        problems.append(f"batch {q_bthd.shape[0]} does not divide by {batch_name}={batch}")
    if q_bthd.shape[2] % heads or k_bskd.shape[2] % heads:
        problems.append(f"heads {q_bthd.shape[2]}/{k_bskd.shape[2]} do not divide by "
                        f"{heads_name}={heads}")
    if problems:
        raise ValueError("; ".join(problems))


# ---- sequence layout: padding and the load-balanced (zig-zag) order ------------------------

def padded_length(length: int, sp: int, strategy: str) -> int:
    """Smallest length >= `length` that the strategy can split (ring: 2*sp zig-zag chunks)."""
    multiple = 2 * sp if strategy == "ring" else sp
    return -(-length // multiple) * multiple


def pad_sequence(embeds_btd, valid_bt, positions_bt, length: int):
    """Right-pads a merged sequence to `length` with invalid tokens (masked as keys)."""
    pad = length - embeds_btd.shape[1]
    return (jnp.pad(embeds_btd, ((0, 0), (0, pad), (0, 0))),
            jnp.pad(valid_bt, ((0, 0), (0, pad))), jnp.pad(positions_bt, ((0, 0), (0, pad))))


def zigzag_order(length: int, sp: int) -> np.ndarray:
    """Token order giving sp shard i the chunks i and 2*sp-1-i of 2*sp equal chunks.

    Under a causal mask every shard then holds an early and a late chunk, so the ring's
    useful work per step is balanced. Positions travel with the tokens, so the model
    needs no other change; undo with `np.argsort(order)`.
    """
    if length % (2 * sp):
        raise ValueError(f"zig-zag order needs a length divisible by 2*sp={2 * sp}, got "
                         f"{length}; pad with padded_length(..., 'ring')")
    chunk = np.arange(length).reshape(2 * sp, -1)
    pairs = [np.concatenate([chunk[i], chunk[2 * sp - 1 - i]]) for i in range(sp)]
    return np.concatenate(pairs)

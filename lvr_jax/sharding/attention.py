"""Sequence-parallel attention over the `sp` mesh axis: all_gather, ulysses, ring.

`make_attention_fn(mesh, strategy)` returns an `attention_fn` for `Qwen2` / `LongVILA`:
a `jax.shard_map` over the mesh whose inputs and outputs stay sharded along the sequence
(and batch over data+fsdp, heads over tp). Inside, each strategy is a pure function of
the local blocks, built on the one-device kernels of `lvr_jax.kernels`:
  all_gather  K/V (and key positions) gathered over sp; queries stay local.
  ulysses     all_to_all trades sequence for heads, full-length attention on H/sp heads.
  ring        K/V blocks travel around the ring with ppermute; online softmax; custom
              backward sends dK/dV around with them. Use `zigzag` order to balance work.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lvr_jax.kernels import blockwise
from lvr_jax.kernels.local import KERNELS, blocked, local_attention
from lvr_jax.sharding.mesh import BATCH_AXES, STRATEGIES

AXIS = "sp"


# ---- strategies: pure functions of the local blocks, run inside shard_map over "sp" ------

def all_gather_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                         kernel: str = "blockwise"):
    """Local queries against keys/values gathered from every sp shard."""
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    return local_attention(q_bthd, gather(k_bskd), gather(v_bskd), q_pos_bt, gather(kv_pos_bs),
                           block, kernel)


def replicate_kv_heads(k_bskd, num_heads: int, sp: int):
    """Repeats KV heads (keeping the query grouping) until their count divides by sp."""
    kvh = k_bskd.shape[2]
    repeat = next(r for r in range(1, num_heads // kvh + 1)
                  if (kvh * r) % sp == 0 and num_heads % (kvh * r) == 0)
    return jnp.repeat(k_bskd, repeat, axis=2)


def ulysses_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                      kernel: str = "blockwise"):
    """all_to_all to [full sequence, heads/sp], attention, and back."""
    sp = jax.lax.axis_size(AXIS)
    h = q_bthd.shape[2]
    if h % sp:
        raise ValueError(f"ulysses needs (local) query heads {h} divisible by sp={sp}; "
                         "use ring or all_gather")
    k, v = (replicate_kv_heads(x, h, sp) for x in (k_bskd, v_bskd))
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=AXIS, split_axis=2,
                                 concat_axis=1, tiled=True)
    gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    out = local_attention(to_heads(q_bthd), to_heads(k), to_heads(v), gather(q_pos_bt),
                          gather(kv_pos_bs), block, kernel)
    return jax.lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _ring_shift(xs):
    """Sends each array to the next device of the sp ring."""
    sp = jax.lax.axis_size(AXIS)
    perm = [(i, (i + 1) % sp) for i in range(sp)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), xs)


def _ring_forward(q, k, v, q_pos, kv_pos, qb, kb):
    """(o, lse) of local queries against every shard's keys, passed round the ring."""
    sp = jax.lax.axis_size(AXIS)
    o, lse = blockwise.forward_stats(q, k, v, q_pos, kv_pos, qb, kb)

    def step(_, carry):
        o, lse, kv = carry
        kv = _ring_shift(kv)
        k_i, v_i, kv_pos_i = kv
        o_i, lse_i = blockwise.forward_stats(q, k_i, v_i, q_pos, kv_pos_i, qb, kb)
        return (*blockwise.merge(o, lse, o_i, lse_i), kv)

    o, lse, _ = jax.lax.fori_loop(0, sp - 1, step, (o, lse, (k, v, kv_pos)))
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring_core(q, k, v, q_pos, kv_pos, qb, kb):
    return _ring_forward(q, k, v, q_pos, kv_pos, qb, kb)[0].astype(q.dtype)


def _ring_fwd(q, k, v, q_pos, kv_pos, qb, kb):
    o, lse = _ring_forward(q, k, v, q_pos, kv_pos, qb, kb)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_pos, kv_pos, o, lse)


def _ring_bwd(qb, kb, res, do):
    """Each K/V block goes round the ring again with its dK/dV accumulator and ends home."""
    q, k, v, q_pos, kv_pos, o, lse = res
    do = do.astype(jnp.float32)
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)

    def step(_, carry):
        dq, (k_i, v_i, pos_i, dk_i, dv_i) = carry
        dq_i, dk_add, dv_add = blockwise.backward(q, k_i, v_i, q_pos, pos_i, do, lse, delta,
                                                  qb, kb)
        travelling = _ring_shift((k_i, v_i, pos_i, dk_i + dk_add, dv_i + dv_add))
        return dq + dq_i, travelling

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = (jnp.zeros(q.shape, jnp.float32), (k, v, kv_pos, *zeros))
    dq, (_, _, _, dk, dv) = jax.lax.fori_loop(0, jax.lax.axis_size(AXIS), step, carry)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_core.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                   kernel: str = "blockwise"):
    """Local queries against K/V blocks passed round the sp ring (online softmax)."""
    if kernel != "blockwise":
        raise ValueError(f"ring attention runs the blockwise kernel only, not {kernel!r}")
    return blocked(_ring_core, q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block)


LOCAL_STRATEGIES = {"all_gather": all_gather_attention, "ulysses": ulysses_attention,
                    "ring": ring_attention}


# ---- the shard_map wrapper ------------------------------------------------------------------

def _batch_axes(mesh: Mesh):
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    return axes or None


def make_attention_fn(mesh: Mesh, strategy: str = "ring", block_size: int = 512,
                      kernel: str = "blockwise"):
    """An `attention_fn(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs)` sharded over `sp`.

    Batch goes over data+fsdp, the sequence over sp, heads over tp; T and S must divide
    by sp (pad with `pad_sequence`). Training and prefill only (no KV cache). `kernel` is
    the per-device attention: "blockwise" (any backend) or "cudnn" (NVIDIA GPUs; sp = 1
    or ulysses, where each device sees whole sequences).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"mesh.attention {strategy!r} is not one of {STRATEGIES}")
    if kernel not in KERNELS:
        raise ValueError(f"mesh.kernel {kernel!r} is not one of {tuple(KERNELS)}")
    if kernel == "cudnn" and mesh.shape[AXIS] > 1 and strategy != "ulysses":
        raise ValueError(f"mesh.kernel 'cudnn' with sp={mesh.shape[AXIS]} needs "
                         f"attention='ulysses', not {strategy!r}")
    strategy = "all_gather" if mesh.shape[AXIS] == 1 else strategy  # sp = 1: no exchange
    local = functools.partial(LOCAL_STRATEGIES[strategy], block=block_size, kernel=kernel)
    batch, heads = _batch_axes(mesh), ("tp" if mesh.shape["tp"] > 1 else None)
    seq_spec, pos_spec = P(batch, AXIS, heads, None), P(batch, AXIS)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq_spec,) * 3 + (pos_spec,) * 2,
                            out_specs=seq_spec, check_vma=False)

    def attention_fn(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs):
        check_divisible(q_bthd, k_bskd, mesh)
        return sharded(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs)

    return attention_fn


def check_divisible(q_bthd, k_bskd, mesh: Mesh) -> None:
    """Names the dimension (and the fix) when a shape does not split over the mesh."""
    sp, tp = mesh.shape[AXIS], mesh.shape["tp"]
    batch = math.prod(mesh.shape[a] for a in BATCH_AXES)
    problems = []
    if q_bthd.shape[1] % sp or k_bskd.shape[1] % sp:
        problems.append(f"sequence {q_bthd.shape[1]} does not divide by sp={sp}: pad it "
                        "with lvr_jax.sharding.attention.pad_sequence")
    if q_bthd.shape[0] % batch:
        problems.append(f"batch {q_bthd.shape[0]} does not divide by data*fsdp={batch}")
    if q_bthd.shape[2] % tp or k_bskd.shape[2] % tp:
        problems.append(f"heads {q_bthd.shape[2]}/{k_bskd.shape[2]} do not divide by tp={tp}")
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

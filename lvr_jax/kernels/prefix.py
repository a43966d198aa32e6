"""Attention of continuations that share a prefix (GRPO's G responses after one prompt).

Each query attends to the keys of its row's prefix (the prompt; all before it) and, causally,
to its own continuation's keys. The two parts are partial softmaxes over disjoint keys,
each giving (o, lse), merged exactly:

    lse = logaddexp(lse_prefix, lse_own),  o = o_prefix e^(lse_prefix - lse) + o_own e^(lse_own - lse)

so the prefix's keys and values are read where they lie, never copied per continuation. A
prefix split along its length over a mesh axis (`axis`) gives one partial softmax per device,
combined across the axis (max m = pmax(lse_i), l = psum(e^(lse_i - m)),
o = psum(o_i e^(lse_i - m)) / l): only the continuations' queries and outputs cross devices.
Prefix rows may serve several continuation rows: with B prefix rows and N = B R query rows,
rows b R .. b R + R - 1 continue prefix b (the sampler's G samples per prompt cache).

Shapes: q [N, T, H, D], own k/v [N, S, KVH, D], prefix k/v [B, P, KVH, D]; positions
[N, T], [N, S], [B, P] (MASKED_POSITION for padding). `prefix_attention` is memory-light
(the blockwise kernel forward, its backward recomputing scores from the saved lse): what a
mesh runs (`lvr_jax.sharding.attention`); `dense_prefix_attention` holds the scores, for
one device's short sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lvr_jax.kernels import blockwise
from lvr_jax.kernels.dense import MASKED_POSITION, NEG_LOGIT as NEG


def _pad(x, multiple: int, value=0):
    """`x` right-padded along dim 1 to a multiple of `multiple`."""
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(q, k, q_pos, kv_pos, block: int):
    """(q [B, T', KVH, G, D], k, q_pos, kv_pos padded to whole blocks, q_block, kv_block)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qb, kb = min(block, t), min(block, k.shape[1])
    q = _pad(q, qb).reshape(b, -1, kvh, h // kvh, d)
    return q, _pad(q_pos, qb), _pad(kv_pos, kb, MASKED_POSITION), qb, kb


def attention_stats(q, k, v, q_pos, kv_pos, block: int):
    """Blockwise attention of q over k/v: (o [B, T, H, D] f32, lse [B, T, H])."""
    b, t, h, d = q.shape
    qg, q_pos, kv_pos, qb, kb = _blocks(q, k, q_pos, kv_pos, block)
    o, lse = blockwise.forward_stats(qg, _pad(k, kb), _pad(v, kb), q_pos, kv_pos, qb, kb)
    return o.reshape(b, -1, h, d)[:, :t], lse.reshape(b, -1, h)[:, :t]


def attention_grads(q, k, v, q_pos, kv_pos, do, lse, delta, block: int):
    """(dq, dk, dv) in f32 of attention whose final lse and delta = sum(do * o) are given."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    qg, q_pos, kv_pos, qb, kb = _blocks(q, k, q_pos, kv_pos, block)
    grouped = lambda x: _pad(x, qb).reshape(b, -1, kvh, h // kvh, *x.shape[3:])  # noqa: E731
    dq, dk, dv = blockwise.backward(qg, _pad(k, kb), _pad(v, kb), q_pos, kv_pos, grouped(do),
                                    grouped(lse), grouped(delta), qb, kb)
    return dq.reshape(b, -1, h, d)[:, :t], dk[:, :s], dv[:, :s]


def _by_prefix(x, rows: int):
    """[N, T, ...] -> [B, R T, ...]: the queries of each prefix row side by side."""
    return x.reshape(rows, -1, *x.shape[2:])


def combine_over(o, lse, axis: str | None):
    """Partial softmaxes of one query over the shards of its keys along `axis`, merged."""
    if axis is None:
        return o, lse
    top = jax.lax.pmax(lse, axis)
    weight = jnp.exp(lse - top)
    total = jax.lax.psum(weight, axis)
    return (jax.lax.psum(o * weight[..., None], axis) / total[..., None],
            top + jnp.log(total))


def prefix_forward(q, k, v, q_pos, kv_pos, pk, pv, p_pos, block: int = 512,
                   axis: str | None = None):
    """(o [N, T, H, D] f32, lse [N, T, H]): q over its prefix (split over `axis`, if given)
    and, causally, over its own keys."""
    n, t, h, d = q.shape
    rows = pk.shape[0]
    o_p, lse_p = attention_stats(_by_prefix(q, rows), pk, pv, _by_prefix(q_pos, rows), p_pos,
                                 block)
    o_p, lse_p = combine_over(o_p, lse_p, axis)
    o_s, lse_s = attention_stats(q, k, v, q_pos, kv_pos, block)
    return blockwise.merge(o_p.reshape(n, t, h, d), lse_p.reshape(n, t, h), o_s, lse_s)


def _gather(x, axis: str | None):
    return x if axis is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)


def _mine(x, length: int, axis: str | None):
    """This device's slice along dim 1 of a whole continuation array."""
    if axis is None:
        return x
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * length, length, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def prefix_attention(q, k, v, q_pos, kv_pos, pk, pv, p_pos, block: int = 512,
                     axis: str | None = None):
    """Attention output like q: each query over its prefix and causally over its own keys.

    With `axis` (inside a shard_map) the continuations q/k/v are split along their length
    over it as the prefix is: the continuations are gathered (they are short), each device
    takes its prefix shard's partial softmax, and the shards are combined exactly."""
    return _forward(q, k, v, q_pos, kv_pos, pk, pv, p_pos, block, axis)[0]


def _forward(q, k, v, q_pos, kv_pos, pk, pv, p_pos, block, axis):
    whole = [_gather(x, axis) for x in (q, k, v, q_pos, kv_pos)]
    o, lse = prefix_forward(*whole, pk, pv, p_pos, block, axis)
    out = _mine(o, q.shape[1], axis).astype(q.dtype)
    return out, (*whole, pk, pv, p_pos, o, lse)


def _backward(block, axis, residuals, d_out):
    q, k, v, q_pos, kv_pos, pk, pv, p_pos, o, lse = residuals
    rows = pk.shape[0]
    do = _gather(d_out, axis).astype(jnp.float32)
    delta = jnp.sum(do * o, axis=-1)
    # the prefix shard's part of dq (summed over the shards below) and its whole dk/dv
    dq_p, dpk, dpv = attention_grads(_by_prefix(q, rows), pk, pv, _by_prefix(q_pos, rows), p_pos,
                                     _by_prefix(do, rows), _by_prefix(lse, rows),
                                     _by_prefix(delta, rows), block)
    dq_p = dq_p.reshape(q.shape)
    if axis is not None:
        dq_p = jax.lax.psum(dq_p, axis)
    # the own keys: every device holds them all, so each computes their whole gradient
    dq_s, dk, dv = attention_grads(q, k, v, q_pos, kv_pos, do, lse, delta, block)
    length = d_out.shape[1]
    mine = lambda x, like: _mine(x, length, axis).astype(like.dtype)  # noqa: E731
    return (mine(dq_p + dq_s, q), mine(dk, k), mine(dv, v), None, None,
            dpk.astype(pk.dtype), dpv.astype(pv.dtype), None)


prefix_attention.defvjp(_forward, _backward)


def dense_stats(q, k, v, q_pos, kv_pos):
    """(o [B, T, H, D] f32, lse [B, T, H]) of attention holding the whole [T, S] scores: for
    the short sequences of one device, where it is faster than the blockwise loops."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    s, allowed = blockwise.scores(q.reshape(b, t, kvh, h // kvh, d), k, q_pos, kv_pos)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, s, NEG), axis=-1))
    p = jnp.where(allowed, jnp.exp(s - top[..., None]), 0.0)  # [B, KVH, G, T, S]
    total = jnp.sum(p, axis=-1)
    seen = total > 0
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    o = o / jnp.moveaxis(jnp.where(seen, total, 1.0), 3, 1)[..., None]
    lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), NEG)
    return o.reshape(b, t, h, d), jnp.moveaxis(lse, 3, 1).reshape(b, t, h)


def dense_prefix_attention(q, k, v, q_pos, kv_pos, pk, pv, p_pos):
    """`prefix_attention` on one device with dense scores (the model's default, as its plain
    attention is dense): the prefix part per prefix row, its R continuations' queries side
    by side, merged with the causal part over each row's own keys. Autodiff backward."""
    n, t, h, d = q.shape
    rows = pk.shape[0]
    o_p, lse_p = dense_stats(_by_prefix(q, rows), pk, pv, _by_prefix(q_pos, rows), p_pos)
    o_s, lse_s = dense_stats(q, k, v, q_pos, kv_pos)
    o, _ = blockwise.merge(o_p.reshape(n, t, h, d), lse_p.reshape(n, t, h), o_s, lse_s)
    return o.astype(q.dtype)

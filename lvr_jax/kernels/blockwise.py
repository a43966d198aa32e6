"""Blockwise (flash-style) causal attention on one device, forward and backward by hand.

Queries and keys are processed in blocks with an online softmax, so memory grows with
block size, not with the [T, S] score matrix; the backward pass recomputes the scores
from the saved log-sum-exp. Shapes use grouped heads: q [B, T, KVH, G, D], k/v
[B, S, KVH, D]. A key attends iff kv_pos <= q_pos (padding keys hold MASKED_POSITION).
The sequence-parallel strategies in `lvr_jax.sharding.attention` are built from these
pieces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lvr_jax.kernels.dense import NEG_LOGIT as NEG


def chunks(x, block: int):
    """[B, n*block, ...] -> [n, B, block, ...]."""
    x = x.reshape(x.shape[0], -1, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def unchunk(x):
    """[n, B, block, ...] -> [B, n*block, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def scores(q_btkgd, k_bskd, q_pos_bt, kv_pos_bs):
    """Scaled scores [B, KVH, G, T, S] in f32 and the causal mask broadcast to them."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q_btkgd.shape[-1]))
    s = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd,
                   preferred_element_type=jnp.float32) * scale
    allowed = kv_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
    return s, allowed[:, None, None]


def all_in_future(q_pos_bt, kv_pos_bs):
    """True when no query of the block may see any key of the block (skip the work)."""
    return jnp.min(kv_pos_bs) > jnp.max(q_pos_bt)


def tie_positions(q, q_pos, kv_pos):
    """Ties positions to q so autodiff cannot hoist the masks out of a layer scan.

    Positions are loop-invariant in the model's scan over layers; without the tie, scan's
    partial evaluation precomputes every block's mask and stores them all ([T, S] memory).
    """
    return jax.lax.optimization_barrier((q, q_pos, kv_pos))


def _forward_q_block(q, q_pos, k_blocks, v_blocks, kv_pos_blocks):
    """Online softmax of one query block over all key blocks -> (o, lse) [B,K,G,T,(D)]."""
    b, t, kvh, g, d = q.shape
    init = (jnp.zeros((b, kvh, g, t, d), jnp.float32), jnp.full((b, kvh, g, t), NEG),
            jnp.zeros((b, kvh, g, t), jnp.float32))

    def update(carry, k, v, kv_pos):
        o, m, l = carry
        s, allowed = scores(q, k, q_pos, kv_pos)
        m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, NEG), axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return o * correction[..., None] + pv, m_new, l * correction + jnp.sum(p, axis=-1)

    def step(carry, kv):
        k, v, kv_pos = kv
        skip = all_in_future(q_pos, kv_pos)
        return jax.lax.cond(skip, lambda c: c, lambda c: update(c, k, v, kv_pos), carry), None

    (o, m, l), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, kv_pos_blocks))
    seen = l > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
    return o / jnp.where(seen, l, 1.0)[..., None], lse


def forward_stats(q_btkgd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, q_block: int, kv_block: int):
    """Attention output [B, T, KVH, G, D] (f32) and log-sum-exp [B, T, KVH, G].

    T and S must divide by their block sizes (`attention` pads).
    """
    q_btkgd, q_pos_bt, kv_pos_bs = tie_positions(q_btkgd, q_pos_bt, kv_pos_bs)
    kv = (chunks(k_bskd, kv_block), chunks(v_bskd, kv_block), chunks(kv_pos_bs, kv_block))
    o, lse = jax.lax.map(lambda x: _forward_q_block(x[0], x[1], *kv),
                         (chunks(q_btkgd, q_block), chunks(q_pos_bt, q_block)))
    # o [n, B, K, G, Tb, D] -> [B, T, K, G, D]; lse [n, B, K, G, Tb] -> [B, T, K, G]
    o = unchunk(jnp.moveaxis(o, 4, 2))
    lse = unchunk(jnp.moveaxis(lse, 4, 2))
    return o, lse


def _backward_q_block(q, q_pos, do, lse, delta, k_blocks, v_blocks, kv_pos_blocks):
    """Gradients of one query block: dq and per-key-block (dk, dv)."""
    do_kgtd = jnp.moveaxis(do, 1, 3)  # [B, K, G, T, D]
    lse_kgt, delta_kgt = jnp.moveaxis(lse, 1, 3), jnp.moveaxis(delta, 1, 3)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))

    def grads(dq, k, v, kv_pos):
        s, allowed = scores(q, k, q_pos, kv_pos)
        p = jnp.where(allowed, jnp.exp(s - lse_kgt[..., None]), 0.0)
        dv = jnp.einsum("bkgts,bkgtd->bskd", p, do_kgtd)
        dp = jnp.einsum("bkgtd,bskd->bkgts", do_kgtd, v.astype(jnp.float32))
        ds = p * (dp - delta_kgt[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(jnp.float32))
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    def step(dq, kv):
        k, v, kv_pos = kv
        zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        return jax.lax.cond(all_in_future(q_pos, kv_pos), lambda d: (d, zeros),
                            lambda d: grads(d, k, v, kv_pos), dq)

    dq0 = jnp.zeros(q.shape, jnp.float32)
    return jax.lax.scan(step, dq0, (k_blocks, v_blocks, kv_pos_blocks))


def backward(q_btkgd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, do_btkgd, lse_btkg, delta_btkg,
             q_block: int, kv_block: int):
    """(dq, dk, dv) in f32 given the final lse and delta = sum(do * o) of every query."""
    q_btkgd, q_pos_bt, kv_pos_bs = tie_positions(q_btkgd, q_pos_bt, kv_pos_bs)
    kv = (chunks(k_bskd, kv_block), chunks(v_bskd, kv_block), chunks(kv_pos_bs, kv_block))
    per_q = (chunks(q_btkgd, q_block), chunks(q_pos_bt, q_block), chunks(do_btkgd, q_block),
             chunks(lse_btkg, q_block), chunks(delta_btkg, q_block))

    def step(dkv, x):
        dq, (dk, dv) = _backward_q_block(*x, *kv)
        return (dkv[0] + unchunk(dk), dkv[1] + unchunk(dv)), dq

    zeros = (jnp.zeros(k_bskd.shape, jnp.float32), jnp.zeros(v_bskd.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(step, zeros, per_q)
    return unchunk(dq), dk, dv


def merge(o_a, lse_a, o_b, lse_b):
    """Combines two partial softmax results over disjoint key sets."""
    lse = jnp.logaddexp(lse_a, lse_b)
    return (o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def grouped_attention(q_btkgd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, q_block, kv_block):
    """Blockwise causal attention with a memory-light custom backward; out like q."""
    o, _ = forward_stats(q_btkgd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, q_block, kv_block)
    return o.astype(q_btkgd.dtype)


def _grouped_fwd(q, k, v, q_pos, kv_pos, q_block, kv_block):
    o, lse = forward_stats(q, k, v, q_pos, kv_pos, q_block, kv_block)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_pos, kv_pos, o, lse)


def _grouped_bwd(q_block, kv_block, res, do):
    q, k, v, q_pos, kv_pos, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    dq, dk, dv = backward(q, k, v, q_pos, kv_pos, do.astype(jnp.float32), lse, delta,
                          q_block, kv_block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


grouped_attention.defvjp(_grouped_fwd, _grouped_bwd)

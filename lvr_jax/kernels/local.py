"""Causal attention of one device's queries and keys: the blockwise kernel padded to whole
blocks, or cuDNN's fused kernel. The sequence-parallel strategies (`lvr_jax.sharding.
attention`) and the sampler's prefill call these on their local blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lvr_jax.kernels import blockwise
from lvr_jax.kernels.dense import MASKED_POSITION


def _pad_to(x, multiple: int, axis: int, value):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(length: int, block: int) -> int:
    return min(block, length)


def blocked(kernel, q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int):
    """Pads to whole blocks, groups query heads by KV head, runs `kernel`, unpads.

    kernel(q_btkgd, k, v, q_pos, kv_pos, q_block, kv_block) -> [B, T, K, G, D].
    """
    b, t, h, d = q_bthd.shape
    s, kvh = k_bskd.shape[1], k_bskd.shape[2]
    qb, kb = _blocks(t, block), _blocks(s, block)
    q = _pad_to(q_bthd, qb, 1, 0).reshape(b, -1, kvh, h // kvh, d)
    k, v = _pad_to(k_bskd, kb, 1, 0), _pad_to(v_bskd, kb, 1, 0)
    q_pos = _pad_to(q_pos_bt, qb, 1, 0)
    kv_pos = _pad_to(kv_pos_bs, kb, 1, MASKED_POSITION)
    out = kernel(q, k, v, q_pos, kv_pos, qb, kb)
    return out.reshape(b, -1, h, d)[:, :t]


def blockwise_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512):
    """Causal attention on one device in blocks; same contract as `dot_product_attention`."""
    return blocked(blockwise.grouped_attention, q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs,
                    block)


def _rotate(x_bt, shift_b):
    """Row b of x [B, T, ...] rotated left by shift_b[b] along T."""
    t = x_bt.shape[1]
    index = (jnp.arange(t)[None] + shift_b[:, None]) % t
    return jnp.take_along_axis(x_bt, index.reshape(index.shape + (1,) * (x_bt.ndim - 2)), 1)


def cudnn_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                    implementation: str = "cudnn"):
    """cuDNN's fused flash attention (bf16/fp16 on NVIDIA GPUs); `block` is unused.

    cuDNN masks by index, not by position, so each row is rotated until its valid tokens
    start at index 0; `is_causal` with the valid length then is the position mask exactly.
    Contract: queries and keys are the same sequence (sp = 1, or ulysses) and each row's
    valid tokens are contiguous (left and/or right padding), as every trainer batch is.
    """
    del block, q_pos_bt  # the positions of a contiguous row follow its index
    t = q_bthd.shape[1]
    if k_bskd.shape[1] != t:
        raise ValueError(f"cudnn attention needs queries and keys of one sequence, got {t} "
                         f"queries and {k_bskd.shape[1]} keys; use kernel='blockwise'")
    valid = kv_pos_bs != MASKED_POSITION
    first, count = jnp.argmax(valid, axis=1), jnp.sum(valid, axis=1, dtype=jnp.int32)
    q, k, v = (_rotate(x, first) for x in (q_bthd, k_bskd, v_bskd))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=count,
                                       key_value_seq_lengths=count,
                                       implementation=implementation)
    return _rotate(out, t - first)


KERNELS = {"blockwise": blockwise_attention, "cudnn": cudnn_attention}


def local_attention(q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block: int = 512,
                    kernel: str = "blockwise"):
    """Causal attention of one device's queries and keys with the chosen kernel."""
    return KERNELS[kernel](q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs, block)

"""Attention over the whole [T, S] score matrix on one device, and the masking constants
every kernel shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Key positions of padding and unwritten cache slots: never <= any query position.
MASKED_POSITION = jnp.iinfo(jnp.int32).max
# Logit of a masked key: finite "minus infinity", so exp() and max() stay free of NaNs.
NEG_LOGIT = -1e30


def dot_product_attention(q_bthd, k_bskd, v_bskd, q_pos_bt=None, kv_pos_bs=None):
    """Softmax attention in f32 with grouped KV heads.

    With positions, a key attends iff its position <= the query's (causal); padding keys
    carry MASKED_POSITION. Without positions, attention is full (the vision tower).
    The queries of a KV group sit side by side along T, so both products are plain matmuls
    batched over [B, KVH]; a grouped einsum made XLA transpose its operands on every call
    (the demo LLM's attention forward was 2.5x slower on CPU).
    """
    b, t, h, d = q_bthd.shape
    kv_heads = k_bskd.shape[2]
    group = h // kv_heads
    q = q_bthd.reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, kv_heads, -1, d)  # [B, KVH, G*T, D]
    k, v = jnp.swapaxes(k_bskd, 1, 2), jnp.swapaxes(v_bskd, 1, 2)  # [B, KVH, S, D]
    q = q * jnp.asarray(d ** -0.5, q.dtype)  # scaled here, the smaller operand
    logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    if q_pos_bt is not None:
        allowed = kv_pos_bs[:, None, :] <= q_pos_bt[:, :, None]  # [B, T, S]
        bias = jnp.where(allowed, 0.0, NEG_LOGIT)[:, None]
        logits = logits + jnp.tile(bias, (1, 1, group, 1))  # [B, 1, G*T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv_heads, group, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

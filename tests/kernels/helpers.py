"""Random attention inputs shared by the kernel and sequence-parallel tests."""

import jax
import jax.numpy as jnp

from lvr_jax.kernels import MASKED_POSITION
from lvr_jax.model.qwen2 import positions_from_valid


def random_qkv(b=2, t=40, h=8, kvh=2, d=16):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(x, (b, t, kvh, d)) for x in ks[1:])
    valid = jnp.ones((b, t), bool).at[0, :5].set(False)  # left padding in row 0
    pos = positions_from_valid(valid)
    return q, k, v, pos, jnp.where(valid, pos, MASKED_POSITION), valid


def attention_loss(fn, q, k, v, pos, kv_pos, valid):
    out = fn(q, k, v, pos, kv_pos)
    return jnp.sum(jnp.where(valid[..., None, None], jnp.sin(out) * out, 0.0))

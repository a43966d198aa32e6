"""One-device kernels: blockwise and cuDNN's (through XLA on CPU) equal dense attention."""

import functools

import jax
import jax.numpy as jnp

from lvr_jax.kernels import MASKED_POSITION, cudnn_attention, dot_product_attention, local_attention
from lvr_jax.model.qwen2 import positions_from_valid
from tests.kernels.helpers import attention_loss, random_qkv
from tests.sharding.helpers import rel_err


def test_local_blockwise_attention_matches_dense_on_ragged_blocks():
    q, k, v, pos, kv_pos, _ = random_qkv(t=37)
    got = jax.jit(local_attention, static_argnames="block")(q, k, v, pos, kv_pos, block=8)
    want = dot_product_attention(q, k, v, pos, kv_pos)
    assert rel_err(got, want) < 1e-6


def test_cudnn_kernel_rotation_matches_dense_on_left_and_right_padding():
    """The cudnn kernel's index-causal trick, run through XLA's implementation on CPU."""
    q, k, v, _, _, _ = random_qkv(b=3, t=24)
    valid = jnp.ones((3, 24), bool).at[0, :5].set(False).at[1, 17:].set(False)
    valid = valid.at[2, :3].set(False).at[2, 20:].set(False)  # both, like a GRPO sequence
    pos = positions_from_valid(valid)
    kv_pos = jnp.where(valid, pos, MASKED_POSITION)
    xla = functools.partial(cudnn_attention, implementation="xla")
    grads = jax.value_and_grad(attention_loss, argnums=(1, 2, 3))
    got = jax.jit(grads, static_argnums=0)(xla, q, k, v, pos, kv_pos, valid)
    want = grads(dot_product_attention, q, k, v, pos, kv_pos, valid)
    assert rel_err(got[0], want[0]) < 1e-5
    for g, w in zip(got[1], want[1]):
        assert rel_err(g, w) < 1e-5

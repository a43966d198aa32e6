"""MR-SP stage 2 helpers: chunked token-wise work and response log-probs under SP."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.model import layers
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.sequence import response_logprobs, response_window, token_chunk_count
from tests.sharding.helpers import make_model, mesh_of, rel_err


def test_map_tokens_in_chunks_equals_one_pass_with_grads():
    w = jax.random.normal(jax.random.key(0), (6, 5))
    x = jax.random.normal(jax.random.key(1), (2, 12, 6))
    loss = lambda w, n: jnp.sum(jnp.sin(layers.map_tokens(lambda h: jnp.tanh(h @ w), (x,), (),  # noqa: E731
                                                           n)))
    want = jax.value_and_grad(loss)(w, 1)
    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(w, 4)
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6


def test_chunk_count_bounds_tokens_per_device():
    assert token_chunk_count(1000, 8, 8192) == 1
    assert token_chunk_count(265472, 8, 8192) == 5


def plain_logprobs(llm, hidden, start, targets):
    logits = llm.logits(hidden[:, start:start + targets.shape[1]])
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, -1)


def test_response_logprobs_under_sp_equal_the_plain_slice_with_grads():
    mesh = mesh_of(sp=8)
    llm = mesh_lib.shard_model(make_model(), mesh).llm
    hidden = jax.random.normal(jax.random.key(2), (2, 64, llm.config.hidden_size))
    targets = jax.random.randint(jax.random.key(3), (2, 16), 0, llm.config.vocab_size)

    def loss(fn):
        def f(llm, hidden):
            logp, entropy = fn(llm, hidden)
            return jnp.sum(logp * jnp.cos(logp)) + jnp.sum(entropy), (logp, entropy)
        return nnx.jit(nnx.value_and_grad(f, argnums=(0, 1), has_aux=True))(llm, hidden)

    (want_loss, want_out), want_g = loss(lambda m, h: plain_logprobs(m, h, 37, targets))
    (got_loss, got_out), got_g = loss(
        lambda m, h: response_logprobs(m, h, 37, targets, mesh, chunk_tokens=4))
    assert rel_err(got_loss, want_loss) < 1e-5
    for g, w in zip(jax.tree.leaves((got_out, got_g)), jax.tree.leaves((want_out, want_g))):
        assert rel_err(g, w) < 1e-5


def test_response_window_is_the_slice_of_sharded_rows():
    mesh = mesh_of(sp=8)
    x = jnp.arange(2 * 64 * 3, dtype=jnp.float32).reshape(2, 64, 3)
    got = jax.jit(lambda x: response_window(x, 5, 20, mesh))(x)
    np.testing.assert_array_equal(got, x[:, 5:25])

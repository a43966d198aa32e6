"""MR-SP stage 2 helpers: chunked token-wise work and response log-probs under SP."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvr_jax.config import base_config
from lvr_jax.model import layers
from lvr_jax.rl.learner import LossConfig, grpo_loss
from lvr_jax.sharding.forwards import response_logprobs_fn
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.param_placement import shard_model
from lvr_jax.sharding.sequence import response_logprobs, response_window, token_chunk_count
from tests.sharding.helpers import make_model, mesh_of, rel_err, shard_map_specs


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
    llm = shard_model(make_model(), mesh).llm
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


def grpo_batch(hidden_size: int, vocab: int, prompts=2, group=2, t=37, m=11):
    """A random GRPO update batch: T and M that do not divide by sp."""
    keys = jax.random.split(jax.random.key(4), 5)
    n = prompts * group
    valid = jnp.arange(t)[None, :] >= jnp.array([[0], [5]])  # the second prompt left-padded
    response_mask = (jnp.arange(m)[None, :] < jnp.array([[m], [7], [m], [3]])).astype(jnp.float32)
    old = -jax.random.uniform(keys[2], (n, m))
    return {"prompt_embeds": jax.random.normal(keys[0], (prompts, t, hidden_size)),
            "prompt_valid": valid, "prompt_index": jnp.repeat(jnp.arange(prompts), group),
            "tokens": jax.random.randint(keys[1], (n, m), 0, vocab),
            "response_mask": response_mask, "loss_mask": response_mask, "old_logp": old,
            "ref_logp": old - 0.1 * jax.random.normal(keys[3], (n, m)),
            "advantages": jax.random.normal(keys[4], (n,)), "pg_weight": jnp.ones((n, m))}


@pytest.mark.parametrize("strategy", ["all_gather", "ulysses", "ring"])
def test_grpo_loss_and_grads_under_sp_equal_single_device(strategy):
    model = make_model()
    batch = grpo_batch(model.config.llm.hidden_size, model.config.llm.vocab_size)
    mesh_config = base_config().mesh
    mesh_config.update(attention=strategy, block_size=8)
    mesh = mesh_of(sp=8)

    def loss_and_grads(model, mesh):
        loss_fn = functools.partial(grpo_loss, cfg=LossConfig.of(base_config().rl),
                                    logprobs_fn=response_logprobs_fn(mesh, mesh_config))
        (loss, _), grads = nnx.jit(nnx.value_and_grad(lambda m: loss_fn(m, batch),
                                                      has_aux=True))(model)
        return loss, nnx.state(grads, nnx.Param)

    want_loss, want_grads = loss_and_grads(model, None)
    got_loss, got_grads = loss_and_grads(shard_model(make_model(), mesh), mesh)
    assert rel_err(got_loss, want_loss) < 1e-5
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 0.9)])
@pytest.mark.parametrize("strategy", mesh_lib.STRATEGIES)
def test_sequence_parallel_prefill_generates_what_one_device_does(strategy, temperature, top_p):
    """Rollouts of long prompts prefill over sp and decode against the group's one prompt
    cache where it lies; greedy, and top-p sampling under the same keys, give one device's
    tokens and log-probs. T = 37 does not divide by sp = 8 and row 0 is left-padded."""
    from lvr_jax.model.sampler import Forwards, SamplingParams, generate
    from lvr_jax.sharding.attention import make_prefix_decode_fn
    from lvr_jax.sharding.sequence import make_sp_prefill
    mesh = mesh_of(sp=8)
    llm = make_model().llm
    embeds = jax.random.normal(jax.random.key(4), (2, 37, llm.config.hidden_size))
    valid = jnp.ones((2, 37), bool).at[0, :6].set(False)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_p=top_p,
                            num_samples=2)
    want = generate(llm, embeds, valid, params, jax.random.key(2))
    got = generate(shard_model(make_model(), mesh).llm, embeds, valid, params, jax.random.key(2),
                   forwards=Forwards(make_sp_prefill(mesh, strategy, block_size=4),
                                     make_prefix_decode_fn(mesh, block_size=4)))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logprobs, want.logprobs) < 1e-5


@pytest.mark.parametrize("prepend, shape, seq_spec", [
    ((("activation_batch", "data"), ("activation_heads", None), ("activation_kv_heads", None)),
     dict(fsdp=2, sp=2, tp=2), P(None, "sp")),
    ((("activation_batch", "data"), ("activation_length", "fsdp")), dict(fsdp=4, sp=2),
     P(None, "fsdp"))])
def test_a_recipe_rules_override_reaches_every_shard_map_of_the_grpo_loss(prepend, shape,
                                                                           seq_spec):
    """config.mesh.rules place the attention and response-window shard_maps (and the axis of
    their collectives) as they place the activations; the numbers stay single-device's."""
    model = make_model()
    batch = grpo_batch(model.config.llm.hidden_size, model.config.llm.vocab_size)
    mesh_config = base_config().mesh
    mesh_config.update(attention="ring", block_size=8, rules=prepend + mesh_lib.DEFAULT_RULES)
    mesh = mesh_of(**shape)

    def loss_fn(mesh):
        return functools.partial(grpo_loss, cfg=LossConfig.of(base_config().rl),
                                 logprobs_fn=response_logprobs_fn(mesh, mesh_config))

    graphdef, state = nnx.split(shard_model(make_model(), mesh))
    specs = set(shard_map_specs(lambda s: loss_fn(mesh)(nnx.merge(graphdef, s), batch)[0],
                                state))
    q_spec = P(*seq_spec, None, None)
    attention = (q_spec,) * 3 + (seq_spec,) * 2  # the prompt's forward
    prefix = attention + (q_spec,) * 2 + (seq_spec,)  # the responses over the prompt's keys
    assert specs == {attention, prefix, (P(*seq_spec, None),)}
    grads_of = lambda m, mesh: nnx.jit(nnx.value_and_grad(  # noqa: E731
        lambda m: loss_fn(mesh)(m, batch), has_aux=True))(m)
    (want_loss, _), want_grads = grads_of(model, None)
    (got_loss, _), got_grads = grads_of(nnx.merge(graphdef, state), mesh)
    assert rel_err(got_loss, want_loss) < 1e-5
    for got, want in zip(jax.tree.leaves(nnx.state(got_grads, nnx.Param)),
                         jax.tree.leaves(nnx.state(want_grads, nnx.Param)), strict=True):
        assert rel_err(got, want) < 1e-5

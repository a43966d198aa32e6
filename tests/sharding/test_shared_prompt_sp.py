"""Shared-prompt passes under sequence parallelism equal each response run whole after its own
copy of its prompt on one device (the independent reference), values and gradients, for every
strategy on 8 simulated devices: left-padded prompts that sp does not divide, responses that
end early, an unordered prompt_index, and a group split across micro-batches. A position off
by one, or a prompt shard left out, moves the numbers far past the tolerance."""


import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lvr_jax.config import base_config
from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.forwards import response_logprobs_fn
from lvr_jax.sharding.param_placement import shard_model
from lvr_jax.sharding.sequence import logprobs_and_entropy
from tests.sharding.helpers import make_model, mesh_of, rel_err

TOLERANCE = 1e-5  # log-probs and entropies
GRAD_TOLERANCE = 1e-4  # gradients: sums over every token, in another order than the reference


def sharp_model(mesh=None):
    """The tiny test LLM with N(0, 0.3^2) added to its weights: its log-probs then depend
    on every position and key (the plain init's are nearly uniform)."""
    model = make_model()
    key = jax.random.key(11)
    for i, (_, var) in enumerate(nnx.iter_graph(model.llm)):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            var.set_value(value + 0.3 * jax.random.normal(jax.random.fold_in(key, i), value.shape))
    return (model if mesh is None else shard_model(model, mesh)).llm


def whole_logprobs(llm, prompts, prompt_valid, index, tokens, response_mask, temperature,
                   shift: int = 0):
    """Each response after its own copy of its prompt, one forward of the whole sequence
    (dense attention); `shift` moves the responses' positions (a planted off-by-one)."""
    t = prompts.shape[1]
    x = jnp.concatenate([prompts[index], llm.embed(tokens)], axis=1)
    valid = jnp.concatenate([prompt_valid[index], response_mask.astype(bool)], axis=1)
    positions = positions_from_valid(valid).at[:, t:].add(shift)
    hidden, _ = llm.hidden_states(x, positions, valid)
    return logprobs_and_entropy(llm.logits(hidden[:, t - 1:-1]) / temperature, tokens)


def case(llm):
    """3 prompts of 37 slots (the second left-padded by 5, the third by 12), 7 responses of 11
    tokens in no order, three of them ending early."""
    keys = jax.random.split(jax.random.key(7), 3)
    t, m = 37, 11
    prompts = jax.random.normal(keys[0], (3, t, llm.config.hidden_size))
    prompt_valid = jnp.arange(t)[None] >= jnp.array([[0], [5], [12]])
    index = jnp.array([2, 0, 1, 0, 2, 1, 0])
    lengths = jnp.array([[11], [4], [11], [1], [9], [11], [6]])
    response_mask = (jnp.arange(m)[None] < lengths).astype(jnp.float32)
    tokens = jax.random.randint(keys[1], (7, m), 0, llm.config.vocab_size)
    weights = jax.random.normal(keys[2], (7, m))
    return (prompts, prompt_valid, index, tokens, response_mask, 0.7), weights


def loss_and_grads(logprobs_fn, llm, args, weights, rows=None):
    """A loss of the log-probs and entropies of `rows` (default all) of the responses, and
    its gradient with respect to the LLM's weights."""
    def loss(model):
        prompts, prompt_valid, index, tokens, mask, temperature = args
        r = slice(None) if rows is None else rows
        logp, entropy = logprobs_fn(model, prompts, prompt_valid, index[r], tokens[r], mask[r],
                                    temperature)
        return jnp.sum((jnp.sin(logp) * weights[r] + 0.1 * entropy) * mask[r])
    value, grads = nnx.jit(nnx.value_and_grad(loss))(llm)
    return value, nnx.state(grads, nnx.Param)


def assert_close(got, want, tolerance=GRAD_TOLERANCE):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < tolerance


def mesh_logprobs(strategy):
    mesh_config = base_config().mesh
    mesh_config.update(attention=strategy, block_size=8)
    return response_logprobs_fn(mesh_of(sp=8), mesh_config)


@pytest.mark.parametrize("strategy", mesh_lib.STRATEGIES)
def test_shared_prompt_log_probs_and_grads_on_the_mesh_equal_whole_sequences(strategy):
    llm = sharp_model()
    args, weights = case(llm)
    mask = args[4] > 0
    reference = whole_logprobs(llm, *args)
    one_device = jax.jit(response_logprobs_fn())(llm, *args)
    sharded_llm = sharp_model(mesh_of(sp=8))
    on_mesh = jax.jit(mesh_logprobs(strategy))(sharded_llm, *args)
    for got in (one_device, on_mesh):
        for g, w in zip(got, reference):
            assert rel_err(g[mask], w[mask]) < TOLERANCE
    want = loss_and_grads(whole_logprobs, llm, args, weights)
    assert_close(loss_and_grads(response_logprobs_fn(), llm, args, weights), want)
    assert_close(loss_and_grads(mesh_logprobs(strategy), sharded_llm, args, weights), want)


def test_a_group_split_across_micro_batches_sums_to_the_whole_gradient():
    """Responses 0-3 and 4-6: prompts 0, 1 and 2 each have responses in both halves."""
    llm = sharp_model()
    args, weights = case(llm)
    sharded_llm = sharp_model(mesh_of(sp=8))
    halves = [loss_and_grads(mesh_logprobs("ring"), sharded_llm, args, weights, rows)
              for rows in (slice(0, 4), slice(4, 7))]
    summed = jax.tree.map(jnp.add, *halves)
    assert_close(summed, loss_and_grads(whole_logprobs, llm, args, weights))


def test_the_comparisons_catch_a_position_off_by_one_and_a_dropped_prompt_shard():
    llm = sharp_model()
    args, _ = case(llm)
    mask = args[4] > 0
    reference = whole_logprobs(llm, *args)
    shifted = whole_logprobs(llm, *args, shift=1)
    assert rel_err(shifted[0][mask], reference[0][mask]) > 100 * TOLERANCE
    prompts, prompt_valid, *rest = args
    last_shard = jnp.arange(prompt_valid.shape[1]) >= 37 - 37 // 8  # the last device's slots
    dropped = jax.jit(mesh_logprobs("ring"))(
        sharp_model(mesh_of(sp=8)), prompts, prompt_valid & ~last_shard,
        *rest)
    assert rel_err(dropped[0][mask], reference[0][mask]) > 100 * TOLERANCE

"""A prompt run once for all its continuations gives what each prompt + continuation run
whole gives (`Qwen2.continuation_hidden`, the GRPO forward on one device)."""

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.model.qwen2 import positions_from_valid
from tests.sharding.helpers import make_model, rel_err


def whole_sequence_hidden(llm, prompts, prompt_valid, index, x, valid):
    """The reference: each continuation after its own copy of its prompt, one forward."""
    t, m = prompts.shape[1], x.shape[1]
    seq = jnp.concatenate([prompts[index], x], axis=1)
    seq_valid = jnp.concatenate([prompt_valid[index], valid], axis=1)
    hidden, _ = llm.hidden_states(seq, positions_from_valid(seq_valid), seq_valid)
    return hidden[:, t - 1:t - 1 + m]


def continuation_case():
    """Three prompts (the second left-padded), five continuations in no particular order,
    two of them ending early (masked tails), one prompt shared by three."""
    llm = make_model().llm
    d, t, m = llm.config.hidden_size, 13, 6
    keys = jax.random.split(jax.random.key(0), 2)
    prompts = jax.random.normal(keys[0], (3, t, d))
    prompt_valid = jnp.arange(t)[None] >= jnp.array([[0], [4], [0]])
    index = jnp.array([1, 0, 1, 2, 1])
    x = jax.random.normal(keys[1], (5, m, d))
    valid = jnp.arange(m)[None] < jnp.array([[6], [2], [6], [4], [6]])
    return llm, (prompts, prompt_valid, index, x, valid)


def test_shared_prompt_forward_equals_the_whole_sequence_forward():
    llm, args = continuation_case()
    want = whole_sequence_hidden(llm, *args)
    got = llm.continuation_hidden(*args)
    valid = args[-1]
    # every position that predicts a real token: the prompt's last one, then the valid ones
    predicts = jnp.concatenate([jnp.ones((5, 1), bool), valid[:, :-1]], axis=1)
    assert rel_err(got[predicts], want[predicts]) < 1e-5


def test_shared_prompt_gradients_equal_the_whole_sequence_gradients():
    llm, args = continuation_case()
    valid = args[-1]
    weights = jax.random.normal(jax.random.key(2), valid.shape + (llm.config.hidden_size,))
    predicts = jnp.concatenate([jnp.ones((5, 1), bool), valid[:, :-1]], axis=1)

    def loss(model, forward):
        hidden = forward(model, *args)
        return jnp.sum(jnp.where(predicts[..., None], jnp.tanh(hidden) * weights, 0.0))

    grads = [nnx.state(nnx.grad(loss)(llm, f), nnx.Param) for f in
             (whole_sequence_hidden, lambda m, *a: m.continuation_hidden(*a))]
    for want, got in zip(*(jax.tree.leaves(g) for g in grads)):
        assert rel_err(got, want) < 1e-4

"""The LLM forwards a learner runs, chosen once from the mesh: on one device without one,
sequence-parallel over `sp` (MR-SP stage 2) with one.

`prefill_fn` is the sampler's prompt prefill, `hidden_fn` the training forward to the final
hidden states, `response_logprobs_fn` the log-probs of sampled responses after their
prompts (GRPO's passes); each keeps the recipe's attention strategy, block size, rules and
kernel (`mesh_config`: a recipe's `mesh` section).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.model.sampler import local_prefill
from lvr_jax.sharding import sequence
from lvr_jax.sharding.mesh import rules_of


def prefill_fn(mesh: Mesh | None = None, mesh_config=None) -> Callable:
    """The sampler's prompt prefill: on one device, or with a mesh sequence-sharded over
    `sp` with the configured attention (MR-SP for rollouts of long videos)."""
    if mesh is None:
        return local_prefill
    c = mesh_config
    return sequence.make_sp_prefill(mesh, c.attention, c.block_size, rules_of(c), c.kernel)


def hidden_fn(mesh: Mesh | None = None, mesh_config=None) -> Callable:
    """(llm, embeds [B, T, D], valid [B, T]) -> final hidden states [B, L >= T, D].

    Without a mesh the plain forward; with one, MR-SP stage 2: the sequence is split over
    `sp` with the configured attention strategy and every layer runs sequence-sharded.
    """
    if mesh is None:
        return lambda llm, embeds, valid: llm.hidden_states(embeds, positions_from_valid(valid),
                                                            valid)[0]
    c = mesh_config

    def sharded(llm, embeds, valid):
        return sequence.sp_hidden_states(llm, embeds, valid, positions_from_valid(valid), mesh,
                                         c.attention, c.block_size, rules_of(c), kernel=c.kernel)
    return sharded


def response_logprobs_fn(mesh: Mesh | None = None, mesh_config=None) -> Callable:
    """(llm, prompt_embeds [P, T, D], prompt_valid [P, T], prompt_index [N], tokens [N, M],
    response_mask [N, M], temperature) -> log-probs and entropies [N, M] of the response
    tokens under logits / temperature, response n following prompt `prompt_index[n]`.

    Without a mesh each prompt runs once for all the responses that share it
    (`Qwen2.continuation_hidden`: a group's G samples cost one prompt forward, not G). With
    one, every sequence runs whole, sharded over `sp`, and only the response window reaches
    the vocabulary projection, vocabulary-parallel and in chunks
    (`sequence.response_logprobs`), so no device holds [T, vocab] logits.
    """
    hidden = hidden_fn(mesh, mesh_config)

    def response_logprobs(llm, prompt_embeds, prompt_valid, prompt_index, tokens, response_mask,
                          temperature):
        prompt_embeds = jax.lax.stop_gradient(prompt_embeds)
        if mesh is None:
            h = llm.continuation_hidden(prompt_embeds, prompt_valid, prompt_index,
                                        llm.embed(tokens), response_mask.astype(bool))
            return sequence.logprobs_and_entropy(llm.logits(h) / temperature, tokens)
        t = prompt_embeds.shape[1]
        x = jnp.concatenate([prompt_embeds[prompt_index], llm.embed(tokens)], axis=1)
        valid = jnp.concatenate([prompt_valid[prompt_index], response_mask.astype(bool)], axis=1)
        return sequence.response_logprobs(llm, hidden(llm, x, valid), t - 1, tokens, mesh,
                                          rules_of(mesh_config), temperature)
    return response_logprobs

"""The LLM forwards a learner runs, chosen once from the mesh: on one device without one,
sequence-parallel over `sp` (MR-SP stage 2) with one.

`sampler_forwards` is how the sampler prefills a prompt and decodes against it,
`hidden_fn` the training forward to the final hidden states, `response_logprobs_fn` the
log-probs of sampled responses after their prompts (GRPO's passes: each prompt runs once for
all the responses that share it, on one device and on a mesh); each keeps the recipe's
attention strategy, block size, rules and kernel (`mesh_config`: a recipe's `mesh` section).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import Mesh

from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.model.sampler import LOCAL, Forwards
from lvr_jax.sharding import sequence
from lvr_jax.sharding.attention import attention_layout, make_prefix_decode_fn
from lvr_jax.sharding.mesh import rules_of, spec_axes


def sampler_forwards(mesh: Mesh | None = None, mesh_config=None) -> Forwards:
    """How the sampler prefills and decodes: on one device, or with a mesh the prompt
    sequence-sharded over `sp` with the configured attention (MR-SP for rollouts of long
    videos) and each decoding step attending to the shared prompt cache where it lies."""
    if mesh is None:
        return LOCAL
    c = mesh_config
    rules = rules_of(c)
    return Forwards(sequence.make_sp_prefill(mesh, c.attention, c.block_size, rules, c.kernel),
                    make_prefix_decode_fn(mesh, c.block_size, rules), batch_devices(mesh, rules))


def batch_devices(mesh: Mesh, rules) -> int:
    """How many devices the rules' batch axes split a batch over."""
    return math.prod(mesh.shape[a] for a in spec_axes(attention_layout(mesh, rules).pos, 0))


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
    """(llm, prompt_embeds [P, T, D], prompt_valid [P, T], prompt_index [N], tokens,
    response_mask, temperature) -> log-probs and entropies [N, M] of the response tokens
    under logits / temperature, response n following prompt `prompt_index[n]`.

    Each prompt runs once for all the responses that share it, its keys and values the
    prefix they attend to (`Qwen2.continuation_hidden`; a group's G samples cost one prompt
    forward, not G). With a mesh the prompt runs sequence-parallel over `sp` with the
    configured strategy, its keys and values stay split along the sequence, the responses
    attend to each shard where it lies (`sequence.sp_continuation_hidden`), and only the
    responses reach the vocabulary projection, vocabulary-parallel and in chunks
    (`sequence.response_logprobs`), so no device holds [T, vocab] logits.
    """
    def response_logprobs(llm, prompt_embeds, prompt_valid, prompt_index, tokens, response_mask,
                          temperature):
        prompt_embeds = jax.lax.stop_gradient(prompt_embeds)
        x, valid = llm.embed(tokens), response_mask.astype(bool)
        if mesh is None:
            h = llm.continuation_hidden(prompt_embeds, prompt_valid, prompt_index, x, valid)
            return sequence.logprobs_and_entropy(llm.logits(h) / temperature, tokens)
        c = mesh_config
        h = sequence.sp_continuation_hidden(llm, prompt_embeds, prompt_valid, prompt_index, x,
                                            valid, mesh, c.attention, c.block_size,
                                            rules_of(c), c.kernel)
        return sequence.response_logprobs(llm, h, 0, tokens, mesh, rules_of(c), temperature)
    return response_logprobs

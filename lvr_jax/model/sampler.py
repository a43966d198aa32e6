"""KV-cache generation from prompt embeddings: the embedded rollout engine.

Each prompt (left-padded) is prefilled once; its cache is then repeated for the G samples
of its group and all samples decode together in one `lax.while_loop`. Returned log-probs
are those of the temperature-scaled distribution (logits / T) before top-k/top-p
filtering, the quantity the training forward recomputes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.kernels import blockwise_attention
from lvr_jax.model.qwen2 import KVCache, Qwen2, positions_from_valid
from lvr_jax.sampling import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """Samples are grouped by prompt: row p * G + g is sample g of prompt p."""

    tokens: jax.Array  # [B*G, M] int32, pad_id after the stop token
    logprobs: jax.Array  # [B*G, M] f32, 0 after the stop token
    lengths: jax.Array  # [B*G] tokens generated, the stop token included


def filter_logits(logits_bv, top_k: int, top_p: float):
    """Sets logits outside the top-k and the top-p nucleus to -inf."""
    neg_inf = jnp.finfo(logits_bv.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, neg_inf, logits_bv)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_desc, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv < threshold, neg_inf, logits_bv)
    return logits_bv


def sample_token(logits_bv, rng, params: SamplingParams):
    """Next token and its log-prob under logits / T (raw logits when greedy)."""
    if params.temperature == 0.0:
        token = jnp.argmax(logits_bv, axis=-1)
        return token, jnp.take_along_axis(jax.nn.log_softmax(logits_bv), token[:, None], 1)[:, 0]
    scaled = logits_bv / params.temperature
    token = jax.random.categorical(rng, filter_logits(scaled, params.top_k, params.top_p))
    return token, jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], 1)[:, 0]


def local_prefill(llm: Qwen2, embeds_btd, valid_bt, positions_bt, cache_len: int):
    """The prompt through every layer on one device into a fresh KV cache of `cache_len`
    slots -> (last hidden state [B, D], cache). The blockwise kernel never holds a long
    video prompt's [T, T] scores. `sharding.sequence.make_sp_prefill` splits it over sp."""
    cache = KVCache.zeros(llm.config, embeds_btd.shape[0], cache_len, llm.dtype)
    hidden, cache = llm.hidden_states(embeds_btd, positions_bt, valid_bt, cache,
                                      blockwise_attention)
    return hidden[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "pad_id", "prefill"))
def _generate(graphdef, state, embeds_btd, valid_bt, rng, params: SamplingParams, pad_id: int,
              prefill):
    llm: Qwen2 = nnx.merge(graphdef, state)
    b, t, _ = embeds_btd.shape
    g, m = params.num_samples, params.max_new_tokens
    positions = positions_from_valid(valid_bt)
    last_hidden, cache = prefill(llm, embeds_btd.astype(llm.dtype), valid_bt.astype(bool),
                                 positions, t + m)
    cache = cache.repeat(g)
    last_logits = jnp.repeat(llm.logits(last_hidden[:, None])[:, 0], g, axis=0)  # not [B, T, V]
    next_pos = jnp.repeat(positions[:, -1] + 1, g)
    stops = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    n = b * g

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < m) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, pos, done, tokens, logps, rng = carry
        rng, key = jax.random.split(rng)
        token, logp = sample_token(logits, key, params)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(token, stops)
        step_logits, cache = llm(token[:, None], positions=pos[:, None],
                                 valid=jnp.ones((n, 1), bool), cache=cache)
        return step + 1, cache, step_logits[:, 0], pos + 1, done, tokens, logps, rng

    carry = (jnp.zeros((), jnp.int32), cache, last_logits, next_pos, jnp.zeros(n, bool),
             jnp.full((n, m), pad_id, jnp.int32), jnp.zeros((n, m), jnp.float32), rng)
    _, _, _, _, _, tokens, logps, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens, logps, generated_lengths(tokens, stops, pad_id))


def lower_generate(graphdef, state, prompt_embeds_btd, prompt_valid_bt, params: SamplingParams,
                   pad_id: int = 0, prefill=local_prefill):
    """`generate`'s program lowered for these (abstract) inputs, to compile without weights."""
    return _generate.lower(graphdef, state, prompt_embeds_btd, prompt_valid_bt,
                           jax.random.key(0), params, pad_id, prefill)


def generated_lengths(tokens_bm, stops, pad_id):
    """Tokens up to and including the first stop token (all M if none)."""
    m = tokens_bm.shape[1]
    is_stop = jnp.isin(tokens_bm, stops)
    first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, 1) + 1, m)
    return first_stop.astype(jnp.int32)


def generate(llm: Qwen2, prompt_embeds_btd, prompt_valid_bt, params: SamplingParams,
             rng=None, pad_id: int = 0, prefill=local_prefill) -> Generation:
    """Samples `params.num_samples` continuations of each left-padded prompt.

    `prefill` fills the KV cache from the prompt (`local_prefill`, or a sequence-parallel
    one made once by `sharding.forwards.prefill_fn`: a new function object recompiles). Decoding
    attends one query at a time with the dense kernel.
    """
    graphdef, state = nnx.split(llm)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompt_embeds_btd, prompt_valid_bt, rng, params, pad_id,
                     prefill)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """Token id lists -> (ids [B, T], valid [B, T]) aligned to the right."""
    t = max(len(s) for s in sequences)
    ids = [[pad_id] * (t - len(s)) + list(s) for s in sequences]
    valid = [[False] * (t - len(s)) + [True] * len(s) for s in sequences]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool)

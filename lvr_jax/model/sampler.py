"""KV-cache generation from prompt embeddings: the embedded rollout engine.

Each prompt (left-padded) is prefilled once into one prompt cache that the G samples of its
group share; each sample keeps a cache of its own response only, and all samples decode
together in one `lax.while_loop`, attending to their group's prompt cache and causally to
their own (`kernels.prefix`). Returned log-probs are those of the temperature-scaled
distribution (logits / T) before top-k/top-p filtering, the quantity the training forward
recomputes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.kernels import MASKED_POSITION, blockwise_attention
from lvr_jax.kernels.prefix import dense_prefix_attention
from lvr_jax.model import layers
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


@dataclasses.dataclass(frozen=True)
class Forwards:
    """How the sampler runs the LLM: `prefill(llm, embeds, valid, positions)` -> (last hidden
    state [B, D], the prompt cache (keys, values [L, B, S, KVH, D], positions [B, S])) and
    the `prefix_attention` each decoding step takes. `local_forwards` on one device;
    `sharding.forwards.sampler_forwards` splits long prompts over a mesh. A new object
    compiles anew: make one per engine."""

    prefill: Callable
    prefix_attention: Callable = dense_prefix_attention
    prefill_rows: int = 1  # prompts prefilled at a time (on a mesh: what its batch axes split)


def local_prefill(llm: Qwen2, embeds_btd, valid_bt, positions_bt):
    """The prompt through every layer on one device -> (last hidden state [B, D], its cache).
    The blockwise kernel never holds a long video prompt's [T, T] scores."""
    hidden, (k, v) = llm.hidden_states(embeds_btd, positions_bt, valid_bt,
                                       attention_fn=blockwise_attention, return_kv=True)
    kv_pos = jnp.where(valid_bt, positions_bt, MASKED_POSITION).astype(jnp.int32)
    return hidden[:, -1], (k, v, kv_pos)


LOCAL = Forwards(local_prefill)


# Where the prompt axis lies in each part of a prefill's output: last states, (k, v, positions).
PREFILL_ROW_AXES = (0, (1, 1, 0))


def prefill_in_turn(forwards: Forwards, llm, embeds_btd, valid_bt, positions_bt):
    """`forwards.prefill` of the prompts `prefill_rows` at a time into one cache, so that
    its temporaries are those of a few prompts however many a rollout chunk holds (each
    prompt's cache is the long video's keys and values of every layer)."""
    rows = forwards.prefill_rows
    b = embeds_btd.shape[0]
    if b <= rows:
        return forwards.prefill(llm, embeds_btd, valid_bt, positions_bt)

    def some(i):
        # read through a barrier tied to i: XLA's CPU compiler slices bf16 in f32, and would
        # hoist an f32 copy of all the chunk's embeddings out of the loop (8 GB at an hour)
        part = (jax.lax.dynamic_slice_in_dim(x, i * rows, rows) for x in
                jax.lax.optimization_barrier((embeds_btd, valid_bt, positions_bt, i))[:3])
        return jax.tree.map(layers.as_words, forwards.prefill(llm, *part))

    def put(i, caches):  # the caches ride the loop as 16-bit words: updated in place
        return jax.tree.map(lambda c, x, axis: jax.lax.dynamic_update_slice_in_dim(
            c, x, i * rows, axis), caches, some(i), PREFILL_ROW_AXES)

    def grown(x, axis):  # the first rows' cache, padded to all: it lies as they lie
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, b - rows)
        return jnp.pad(x, pad)
    from_words = functools.partial(layers.from_words, dtype=llm.dtype)
    caches = jax.tree.map(grown, some(0), PREFILL_ROW_AXES)
    return jax.tree.map(from_words, jax.lax.fori_loop(1, b // rows, put, caches))


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "pad_id", "forwards"))
def _generate(graphdef, state, embeds_btd, valid_bt, rng, params: SamplingParams, pad_id: int,
              forwards: Forwards):
    llm: Qwen2 = nnx.merge(graphdef, state)
    b = embeds_btd.shape[0]
    g, m = params.num_samples, params.max_new_tokens
    positions = positions_from_valid(valid_bt)
    last_hidden, prompt = prefill_in_turn(forwards, llm, embeds_btd.astype(llm.dtype),
                                          valid_bt.astype(bool), positions)
    own = KVCache.zeros(llm.config, b * g, m, llm.dtype)  # each sample: its response only
    last_logits = jnp.repeat(llm.logits(last_hidden[:, None])[:, 0], g, axis=0)  # not [B, T, V]
    next_pos = jnp.repeat(positions[:, -1] + 1, g)
    stops = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    n = b * g

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < m) & ~jnp.all(done)

    def body(carry):
        step, own, logits, pos, done, tokens, logps, rng = carry
        rng, key = jax.random.split(rng)
        token, logp = sample_token(logits, key, params)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        done = done | jnp.isin(token, stops)
        step_logits, own = llm(token[:, None], positions=pos[:, None],
                               valid=jnp.ones((n, 1), bool), cache=own, prefix=prompt,
                               attention_fn=forwards.prefix_attention)
        return step + 1, own, step_logits[:, 0], pos + 1, done, tokens, logps, rng

    carry = (jnp.zeros((), jnp.int32), own, last_logits, next_pos, jnp.zeros(n, bool),
             jnp.full((n, m), pad_id, jnp.int32), jnp.zeros((n, m), jnp.float32), rng)
    _, _, _, _, _, tokens, logps, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens, logps, generated_lengths(tokens, stops, pad_id))


def trace_generate(graphdef, state, prompt_embeds_btd, prompt_valid_bt, params: SamplingParams,
                   pad_id: int = 0, forwards: Forwards = LOCAL):
    """`generate`'s program traced for these (abstract) inputs, to compile (or count)
    without weights."""
    return _generate.trace(graphdef, state, prompt_embeds_btd, prompt_valid_bt,
                           jax.random.key(0), params, pad_id, forwards)


def generated_lengths(tokens_bm, stops, pad_id):
    """Tokens up to and including the first stop token (all M if none)."""
    m = tokens_bm.shape[1]
    is_stop = jnp.isin(tokens_bm, stops)
    first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, 1) + 1, m)
    return first_stop.astype(jnp.int32)


def generate(llm: Qwen2, prompt_embeds_btd, prompt_valid_bt, params: SamplingParams,
             rng=None, pad_id: int = 0, forwards: Forwards = LOCAL) -> Generation:
    """Samples `params.num_samples` continuations of each left-padded prompt, the G samples
    of a prompt sharing its one prompt cache (`forwards`: `LOCAL` on one device, or
    `sharding.forwards.sampler_forwards` on a mesh)."""
    graphdef, state = nnx.split(llm)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompt_embeds_btd, prompt_valid_bt, rng, params, pad_id,
                     forwards)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int):
    """Token id lists -> (ids [B, T], valid [B, T]) aligned to the right."""
    t = max(len(s) for s in sequences)
    ids = [[pad_id] * (t - len(s)) + list(s) for s in sequences]
    valid = [[False] * (t - len(s)) + [True] * len(s) for s in sequences]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool)

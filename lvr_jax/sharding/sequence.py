"""MR-SP stage 2: the LLM forward over the long merged sequence, sharded over `sp`.

The mesh axis is the one the rules give `activation_length` (`sp` by default): the
shard_maps here and in `attention.py` take their specs from the rules table, and their
collectives run over that axis (`attention.attention_layout`).

`sp_hidden_states` pads the sequence so it splits, puts it in the strategy's order
(zig-zag for ring), runs every layer sequence-sharded with the sequence-parallel
attention, and returns hidden states in the original order. The MLP runs in chunks of
`chunk_tokens` tokens per device, so its [tokens, intermediate] activations do not grow
with the video. Callers take log-probs only where they need them (the response) with
`response_logprobs`: chunked, sequence-sharded, never [T, vocab] for a long video.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lvr_jax.kernels import MASKED_POSITION
from lvr_jax.model import layers
from lvr_jax.model.qwen2 import HIDDEN_AXES, continuation_targets, positions_from_valid
from lvr_jax.sharding.attention import (attention_layout, make_attention_fn,
                                        make_prefix_attention_fn, pad_sequence, padded_length,
                                        sequence_axis)
from lvr_jax.sharding.mesh import (DEFAULT_RULES, activation_rules, logical_to_sharding,
                                   logical_to_spec, rules_of, spec_axes)


def to_zigzag(x_bt, sp: int):
    """[B, L, ...] -> the zig-zag order of `attention.zigzag_order` (reshapes, no gather)."""
    b, length = x_bt.shape[:2]
    x = x_bt.reshape(b, 2, sp, length // (2 * sp), *x_bt.shape[2:])
    early, late = x[:, 0], jnp.flip(x[:, 1], axis=1)  # chunks i and 2*sp-1-i, both [B, sp, c]
    return jnp.stack([early, late], axis=2).reshape(x_bt.shape)


def from_zigzag(x_bt, sp: int):
    """Inverse of `to_zigzag`."""
    b, length = x_bt.shape[:2]
    x = x_bt.reshape(b, sp, 2, length // (2 * sp), *x_bt.shape[2:])
    early, late = x[:, :, 0], jnp.flip(x[:, :, 1], axis=1)
    return jnp.concatenate([early, late], axis=1).reshape(x_bt.shape)


def token_chunk_count(length: int, sp: int, chunk_tokens: int) -> int:
    """Chunks for token-wise blocks: at most `chunk_tokens` tokens per device in each."""
    return max(1, math.ceil(length / (sp * chunk_tokens)))


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """How a long sequence lies for the sequence-parallel forward: right-padded to `length`
    (it splits into `chunks` MLP chunks of whole blocks per device) and, for ring attention,
    in zig-zag order (`zigzag`) so every device's causal work is balanced."""

    sp: int
    chunks: int
    length: int
    zigzag: bool

    @classmethod
    def of(cls, tokens: int, mesh: Mesh, strategy: str, rules, chunk_tokens: int):
        sp = attention_layout(mesh, rules).size
        chunks = token_chunk_count(tokens, sp, chunk_tokens)
        length = padded_length(-(-tokens // chunks), sp, strategy) * chunks
        return cls(sp, chunks, length, strategy == "ring" and sp > 1)

    def laid_out(self, embeds_btd, valid_bt, positions_bt):
        """(embeds, valid, positions) padded and ordered for the forward."""
        xs = pad_sequence(embeds_btd, valid_bt, positions_bt, self.length)
        return tuple(to_zigzag(x, self.sp) for x in xs) if self.zigzag else xs

    def original_order(self, x_bt):
        """Rows [B, L, ...] back from the forward's order (still padded)."""
        return from_zigzag(x_bt, self.sp) if self.zigzag else x_bt


def sp_hidden_states(llm, embeds_btd, valid_bt, positions_bt, mesh: Mesh,
                     strategy: str = "ring", block_size: int = 512, rules=DEFAULT_RULES,
                     chunk_tokens: int = 2048, kernel: str = "blockwise"):
    """Final hidden states [B, L, D] (L >= T padded length, original order), sharded on sp.

    Rows past T are padding. Call inside `jax.jit`; positions should come from the
    unpadded sequence (`qwen2.positions_from_valid`). The MLP runs `chunk_tokens` tokens
    per device at a time (2048: its temporaries then stay under a fifth of a 256-frame
    step's memory at sp = 8, where 8192 took half); `kernel` is the per-device attention
    (`lvr_jax.kernels.KERNELS`). `rules` place the sequence, batch and heads, the
    attention's shard_map included (`make_sp_prefill` runs the same forward for a cache).
    """
    layout = SequenceLayout.of(embeds_btd.shape[1], mesh, strategy, rules, chunk_tokens)
    embeds, valid, positions = layout.laid_out(embeds_btd, valid_bt, positions_bt)
    attention_fn = make_attention_fn(mesh, strategy, block_size, kernel, rules)
    with activation_rules(mesh, rules), layers.token_chunks(layout.chunks):
        hidden, _ = llm.hidden_states(embeds, positions, valid, attention_fn=attention_fn)
        return layers.constrain_activation(layout.original_order(hidden), HIDDEN_AXES)


def make_sp_prefill(mesh: Mesh, strategy: str = "ring", block_size: int = 512,
                    rules=DEFAULT_RULES, kernel: str = "blockwise", chunk_tokens: int = 2048):
    """The sampler's prompt prefill (`sampler.local_prefill`'s contract), sequence-sharded:
    the prompt runs laid out as `sp_hidden_states` lays it out, with the strategy's
    attention, and the keys and values it computed become the group's prompt cache, left
    split along the sequence in the forward's order (their positions beside them), so that
    decoding attends to each device's part of a long video where it lies."""
    seq = NamedSharding(mesh, P(None, *attention_layout(mesh, rules).pos, None, None))

    def prefill(llm, embeds_btd, valid_bt, positions_bt):
        layout = SequenceLayout.of(embeds_btd.shape[1], mesh, strategy, rules, chunk_tokens)
        embeds, valid, positions = layout.laid_out(embeds_btd, valid_bt, positions_bt)
        attention_fn = make_attention_fn(mesh, strategy, block_size, kernel, rules)
        with activation_rules(mesh, rules), layers.token_chunks(layout.chunks):
            hidden, kv = llm.hidden_states(embeds, positions, valid, attention_fn=attention_fn,
                                           return_kv=True)
            last = last_rows(layout.original_order(hidden), embeds_btd.shape[1], mesh, rules)
        k, v = (jax.lax.with_sharding_constraint(x, seq) for x in kv)
        kv_pos = jnp.where(valid, positions, MASKED_POSITION).astype(jnp.int32)
        return last, (k, v, kv_pos)

    return prefill


def last_rows(hidden_btd, t: int, mesh: Mesh, rules=DEFAULT_RULES):
    """Row t - 1 of sequence-sharded hidden states [B, L, D] -> [B, D] (a prompt's last)."""
    return response_window(hidden_btd, t - 1, 1, mesh, rules)[:, 0]


def sp_continuation_hidden(llm, prompt_btd, prompt_valid_bt, prompt_index, x_nmd, valid_nm,
                           mesh: Mesh, strategy: str = "ring", block_size: int = 512,
                           rules=DEFAULT_RULES, kernel: str = "blockwise",
                           chunk_tokens: int = 2048):
    """`Qwen2.continuation_hidden` on a mesh: one scan over the layers runs each prompt once,
    laid out as `sp_hidden_states` lays it out (split over `sp`, the strategy's attention),
    and the continuations, split along their own length too (padded to M' >= M), attending
    to each layer's prompt keys and values where they lie (`make_prefix_attention_fn`).
    The states that predict the continuations' tokens [N, M', D], rows past M padding."""
    layout = SequenceLayout.of(prompt_btd.shape[1], mesh, strategy, rules, chunk_tokens)
    prompt, valid, positions = layout.laid_out(prompt_btd, prompt_valid_bt,
                                               positions_from_valid(prompt_valid_bt))
    pad = -x_nmd.shape[1] % layout.sp
    x_nmd = jnp.pad(x_nmd, ((0, 0), (0, pad), (0, 0)))
    valid_nm = jnp.pad(valid_nm, ((0, 0), (0, pad)))
    with activation_rules(mesh, rules), layers.token_chunks(layout.chunks):
        prompt, x = llm.shared_prompt_hidden(
            prompt, positions, valid, x_nmd, valid_nm, prompt_index,
            make_attention_fn(mesh, strategy, block_size, kernel, rules),
            make_prefix_attention_fn(mesh, block_size, rules))
        last = last_rows(layout.original_order(prompt), prompt_btd.shape[1], mesh, rules)
        return continuation_targets(last, prompt_index, x)


def sp_logits(llm, hidden_btd, rules=DEFAULT_RULES, mesh: Mesh | None = None):
    """Logits [B, T, V] in f32 of (a slice of) sequence-sharded hidden states."""
    logits = llm.logits(hidden_btd)
    if mesh is None:
        return logits
    with activation_rules(mesh, rules):
        return layers.constrain_activation(
            logits, ("activation_batch", "activation_length", "activation_vocab"))


def response_window(hidden_btd, start: int, length: int, mesh: Mesh, rules=DEFAULT_RULES):
    """hidden[:, start:start+length] of a sequence-sharded array, replicated over its sp axis.

    Each device contributes the rows it holds and a psum over the rules' sequence axis
    joins them; the backward pass scatters the cotangent into each device's own rows (a
    plain slice would build a full-length, unsharded cotangent).
    """
    spec = logical_to_spec(HIDDEN_AXES, mesh, rules)
    axis = sequence_axis(spec)
    if axis is None:  # every device holds whole sequences
        return hidden_btd[:, start:start + length]

    def local(h_btd):
        local_len = h_btd.shape[1]
        rows = start + jnp.arange(length) - jax.lax.axis_index(axis) * local_len
        mine = (rows >= 0) & (rows < local_len)
        window = jnp.take(h_btd, jnp.clip(rows, 0, local_len - 1), axis=1)
        return jax.lax.psum(jnp.where(mine[None, :, None], window, 0), axis)

    return jax.shard_map(local, mesh=mesh, in_specs=spec,
                         out_specs=P(spec[0], None, spec[2]))(hidden_btd)


def window_vocab_axes(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes for the vocabulary of a response window: the rules' sequence axis, where
    the window is replicated, then the rules' own `activation_vocab` axes."""
    seq = spec_axes(logical_to_spec(HIDDEN_AXES, mesh, rules), 1)
    vocab = spec_axes(logical_to_spec(("activation_vocab",), mesh, rules), 0)
    return tuple(dict.fromkeys(seq + vocab))


def vocab_parallel_head(head_dv, mesh: Mesh, vocab_axes: tuple[str, ...]):
    """The projection [D, V] as the response's chunks use it: V split over `vocab_axes`, D
    whole; resharded once before the chunks, in two steps (D over the mesh's other axes with
    V over `vocab_axes`: an all-to-all; then D gathered). Asked for in one step from the
    weights' FSDP layout (D over fsdp x sp), XLA replicated the whole [D, V] in each chunk."""
    others = tuple(a for a in mesh.axis_names if a not in vocab_axes and mesh.shape[a] > 1)
    rules = (("head_embed", others), ("head_vocab", vocab_axes))
    for names in (("head_embed", "head_vocab"), (None, "head_vocab")):
        sharding = logical_to_sharding(names, mesh, rules, head_dv.shape)
        head_dv = jax.lax.with_sharding_constraint(head_dv, sharding)
    return head_dv


def logprobs_and_entropy(logits_btv, targets_bt):
    """Log-prob of each target and the entropy of its distribution, [B, T] each."""
    logp_all = jax.nn.log_softmax(logits_btv, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets_bt[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def response_logprobs(llm, hidden_btd, start: int, targets_bm, mesh: Mesh,
                      rules=DEFAULT_RULES, temperature: float = 1.0, chunk_tokens: int = 512):
    """Log-probs and entropies [B, M] of `targets_bm` predicted by hidden[:, start:start+M].

    Only the response window reaches the vocabulary projection, vocabulary-parallel over
    the sequence axis (the window is whole there) and the rules' vocabulary axes (sp and
    tp by default): each device scores its slice of the vocabulary, `chunk_tokens`
    positions at a time with recomputation, so at most [chunk, V/sp] logits live.
    """
    axes = ("activation_batch", None, "activation_vocab")
    m = targets_bm.shape[1]
    vocab_axes = window_vocab_axes(mesh, rules)
    head = vocab_parallel_head(llm.head(), mesh, vocab_axes)

    def one_chunk(h_btd, t_bt):
        logits = layers.constrain_activation(llm.logits(h_btd, head), axes)
        return logprobs_and_entropy(logits / temperature, t_bt)

    window = response_window(hidden_btd, start, m, mesh, rules)
    rules = (("activation_vocab", vocab_axes),) + tuple(rules_of(rules))
    with activation_rules(mesh, rules):
        return layers.map_tokens(one_chunk, (window, targets_bm), axes,
                                 token_chunk_count(m, 1, chunk_tokens))

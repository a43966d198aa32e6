"""MR-SP stage 2: the LLM forward over the long merged sequence, sharded over `sp`.

`sp_hidden_states` pads the sequence so it splits, puts it in the strategy's order
(zig-zag for ring), runs every layer sequence-sharded with the sequence-parallel
attention, and returns hidden states in the original order. Callers take logits only
where they need them (the response), never [T, vocab] for a long video.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lvr_jax.model import layers
from lvr_jax.model.qwen2 import HIDDEN_AXES
from lvr_jax.sharding.attention import make_attention_fn, pad_sequence, padded_length
from lvr_jax.sharding.mesh import DEFAULT_RULES, activation_rules


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


def sp_hidden_states(llm, embeds_btd, valid_bt, positions_bt, mesh: Mesh,
                     strategy: str = "ring", block_size: int = 512, rules=DEFAULT_RULES):
    """Final hidden states [B, L, D] (L = padded length, original order), sharded on sp.

    Rows past T are padding. Call inside `jax.jit`; positions should come from the
    unpadded sequence (`qwen2.positions_from_valid`).
    """
    sp = mesh.shape["sp"]
    length = padded_length(embeds_btd.shape[1], sp, strategy)
    embeds, valid, positions = pad_sequence(embeds_btd, valid_bt, positions_bt, length)
    zigzag = strategy == "ring" and sp > 1
    if zigzag:
        embeds, valid, positions = (to_zigzag(x, sp) for x in (embeds, valid, positions))
    attention_fn = make_attention_fn(mesh, strategy, block_size)
    with activation_rules(mesh, rules):
        hidden, _ = llm.hidden_states(embeds, positions, valid, attention_fn=attention_fn)
        hidden = from_zigzag(hidden, sp) if zigzag else hidden
        return layers.constrain_activation(hidden, HIDDEN_AXES)


def sp_logits(llm, hidden_btd, rules=DEFAULT_RULES, mesh: Mesh | None = None):
    """Logits [B, T, V] in f32 of (a slice of) sequence-sharded hidden states."""
    logits = llm.logits(hidden_btd)
    if mesh is None:
        return logits
    with activation_rules(mesh, rules):
        return layers.constrain_activation(
            logits, ("activation_batch", "activation_length", "activation_vocab"))

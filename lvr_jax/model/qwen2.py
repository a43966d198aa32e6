"""Qwen2 decoder: GQA with q/k/v bias, RoPE, RMSNorm, SwiGLU, tied or untied head.

Layers are stacked and scanned. `Qwen2.__call__` runs from token ids or embeddings, with
or without a KV cache; positions and key validity decide the causal mask, so left-padded
batches, prefill and token-by-token decoding share one code path.

Continuations of a shared prompt (GRPO's G samples of one video prompt) run the prompt
once: each layer's keys and values of it are a prefix that every continuation attends to
(`shared_prompt_hidden`, and decoding with `prefix=`), through a prefix attention function
(`kernels.prefix`; sequence-parallel from `lvr_jax.sharding`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.kernels import MASKED_POSITION, dot_product_attention
from lvr_jax.kernels.prefix import dense_prefix_attention
from lvr_jax.model import layers
from lvr_jax.model.config import Qwen2Config

AttentionFn = Callable[..., jax.Array]  # (q_bthd, k_bskd, v_bskd, q_pos_bt, kv_pos_bs) -> out
# (q, k, v, q_pos, kv_pos, prefix_k, prefix_v, prefix_pos) -> out: `kernels.prefix`'s contract
PrefixAttentionFn = Callable[..., jax.Array]
# Logical axes of the residual stream; sharding rules (when active) keep it sequence-sharded.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer [L, B, S, KVH, D] and the position of each slot [B, S]."""

    k: jax.Array
    v: jax.Array
    kv_pos: jax.Array  # MASKED_POSITION for padding and slots not yet written
    index: jax.Array  # next slot to write (shared by the batch: prompts are left-padded)

    @classmethod
    def zeros(cls, config: Qwen2Config, batch: int, max_len: int, dtype) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads,
                 config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((batch, max_len), MASKED_POSITION, jnp.int32),
                   jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(self, c: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, h, kvh, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = layers.Dense(d, (h, hd), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = layers.Dense(d, (kvh, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = layers.Dense(d, (kvh, hd), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.o_proj = layers.Dense(h * hd, d, ("heads", "embed"), use_bias=False, **kw)
        self.theta = c.rope_theta

    def __call__(self, x_btd, pos_bt, kv_pos_bt, attention_fn: AttentionFn, cache_kv=None,
                 cache_index=None, cache_kv_pos=None, prefix=None):
        """`cache_kv`: the decoding cache of these tokens' own sequence, written in place;
        `prefix`: (keys, values [R, S, KVH, D], positions [R, S]) of the prompt these tokens
        continue (rows r R' .. of x continue prefix row r), and `attention_fn` then takes
        them after its five arguments (a `PrefixAttentionFn`)."""
        q = layers.rope(self.q_proj(x_btd), pos_bt, self.theta)
        k = layers.rope(self.k_proj(x_btd), pos_bt, self.theta)
        v = self.v_proj(x_btd)
        if cache_kv is not None:  # every layer's cache [L, B, S, KVH, D]: write ours in place
            layer, slot = cache_index
            cache_kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype),
                                                          (layer, 0, slot, 0, 0))
                             for c, new in zip(cache_kv, (k, v)))
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache_kv)
            kv_pos_bt = cache_kv_pos
        if prefix is None:
            out = attention_fn(q, k, v, pos_bt, kv_pos_bt)
        else:
            prefix_k, prefix_v, prefix_pos = prefix
            out = attention_fn(q, k, v, pos_bt, kv_pos_bt, prefix_k.astype(k.dtype),
                               prefix_v.astype(v.dtype), prefix_pos)
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, -1)), (k, v) if cache_kv is None else cache_kv


class MLP(nnx.Module):
    def __init__(self, c: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = layers.Dense(d, f, ("embed", "mlp"), **kw)
        self.up_proj = layers.Dense(d, f, ("embed", "mlp"), **kw)
        self.down_proj = layers.Dense(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return layers.map_tokens(self.swiglu, (x,), HIDDEN_AXES)

    def swiglu(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, c: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Attention(c, **kw)
        self.post_attention_layernorm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.mlp = MLP(c, **kw)

    def __call__(self, x, pos, kv_pos, attention_fn, **cache_args):
        attn, kv = self.self_attn(self.input_layernorm(x), pos, kv_pos, attention_fn, **cache_args)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2(nnx.Module):
    """The language model: token ids or embeddings -> logits."""

    def __init__(self, c: Qwen2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, remat_group: int = 1, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype, self.remat, self.remat_group = c, dtype, remat, remat_group
        self.embed_tokens = layers.param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                                         param_dtype)
        self.layers = layers.stack_layers(lambda r: DecoderLayer(c, rngs=r, **kw),
                                          c.num_hidden_layers, rngs)
        self.norm = layers.RMSNorm(c.hidden_size, c.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = None if c.tie_word_embeddings else layers.param(
            rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), param_dtype)

    def embed(self, ids):
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)

    def hidden_states(self, x_btd, positions_bt, valid_bt, cache: Optional[KVCache] = None,
                      attention_fn: AttentionFn = dot_product_attention,
                      return_kv: bool = False, prefix=None):
        """Final-norm hidden states [B, T, D] and the updated cache when one is given, or
        with `return_kv` (no cache) every layer's keys and values ([L, B, T, KVH, D] each).
        With a cache, `prefix` (keys, values [L, R, S, KVH, D], positions [R, S]) is the
        prompt cache these tokens continue, read by `attention_fn` (a `PrefixAttentionFn`)."""
        kv_pos = jnp.where(valid_bt, positions_bt, MASKED_POSITION).astype(jnp.int32)
        x_btd = layers.constrain_activation(x_btd, HIDDEN_AXES)
        if cache is None:
            def body(layer, x, _):
                x, kv = layer(x, positions_bt, kv_pos, attention_fn)
                return layers.constrain_activation(x, HIDDEN_AXES), kv if return_kv else None
            x, kv = layers.scan_layers(self.layers, body, x_btd, remat=self.remat,
                                       remat_group=self.remat_group)
            return self.norm(x), kv

        cache_kv_pos = jax.lax.dynamic_update_slice_in_dim(cache.kv_pos, kv_pos, cache.index, 1)

        # The cache rides in the scan's carry, so each layer writes its new keys/values in
        # place; as a scanned input/output it was copied whole at every decoding step.
        def body(layer, carry, per_layer):
            i, prefix_kv = per_layer
            layer_prefix = None if prefix is None else (
                *(layers.from_words(x, self.dtype) for x in prefix_kv), prefix[2])
            x, kv = layer(carry[0], positions_bt, None, attention_fn, cache_kv=carry[1],
                          cache_index=(i, cache.index), cache_kv_pos=cache_kv_pos,
                          prefix=layer_prefix)
            return (layers.constrain_activation(x, HIDDEN_AXES), kv), None
        per_layer = (jnp.arange(self.config.num_hidden_layers),
                     None if prefix is None else tuple(map(layers.as_words, prefix[:2])))
        (x, (k, v)), _ = layers.scan_layers(self.layers, body, (x_btd, (cache.k, cache.v)),
                                            per_layer, remat=self.remat)
        new_cache = KVCache(k, v, cache_kv_pos, cache.index + x_btd.shape[1])
        return self.norm(x), new_cache

    def shared_prompt_hidden(self, prompt_btd, prompt_pos_bt, prompt_valid_bt, x_nmd, valid_nm,
                             prompt_index, attention_fn: AttentionFn = dot_product_attention,
                             prefix_attention_fn: PrefixAttentionFn = dense_prefix_attention):
        """Final-norm hidden states of prompts [P, T, D] and of continuations [N, M, D],
        continuation n following prompt `prompt_index[n]`, in one scan over the layers: each
        runs the prompts (any order of their tokens, `prompt_pos_bt` saying where each
        stands), then the continuations attending to that layer's prompt keys and values
        and causally to their own. A layer's prompt keys and values live only for that layer.
        `prompt_index` None: the rows come in groups, rows p R .. p R + R - 1 following
        prompt p, and every continuation reads its prompt's keys where they are (no copy)."""
        rows = grouped_index(prompt_btd.shape[0], x_nmd.shape[0]) if prompt_index is None \
            else prompt_index
        kv_pos = jnp.where(prompt_valid_bt, prompt_pos_bt, MASKED_POSITION).astype(jnp.int32)
        prefix_of = (lambda x: x) if prompt_index is None else (lambda x: x[prompt_index])
        prefix_pos = prefix_of(kv_pos)
        start = jnp.sum(prompt_valid_bt, axis=1, dtype=jnp.int32)[rows]
        pos = start[:, None] + jnp.cumsum(valid_nm, axis=1, dtype=jnp.int32) - 1
        own_kv_pos = jnp.where(valid_nm, pos, MASKED_POSITION)

        def body(layer, carry, _):
            x_p, x_c = carry
            x_p, (k, v) = layer(x_p, prompt_pos_bt, kv_pos, attention_fn)
            x_c, _ = layer(x_c, pos, own_kv_pos, prefix_attention_fn,
                           prefix=(prefix_of(k), prefix_of(v), prefix_pos))
            return tuple(layers.constrain_activation(x, HIDDEN_AXES) for x in (x_p, x_c)), None
        carry = tuple(layers.constrain_activation(x.astype(self.dtype), HIDDEN_AXES)
                      for x in (prompt_btd, x_nmd))
        (x_p, x_c), _ = layers.scan_layers(self.layers, body, carry, remat=self.remat,
                                           remat_group=self.remat_group)
        return self.norm(x_p), self.norm(x_c)

    def continuation_hidden(self, prompt_btd, prompt_valid_bt, prompt_index, x_nmd, valid_nm,
                            attention_fn: AttentionFn = dot_product_attention,
                            prefix_attention_fn: PrefixAttentionFn = dense_prefix_attention):
        """Hidden states [N, M, D] that predict each of N continuations' M tokens (the first
        from its prompt's last state), continuation n following prompt `prompt_index[n]`.

        Equal to running each prompt + continuation whole, but every layer runs a prompt once
        however many continuations share it: GRPO's G samples of one video prompt cost one
        prompt forward (and backward) instead of G. Prompts are left-padded.
        """
        prompt, x = self.shared_prompt_hidden(
            prompt_btd, positions_from_valid(prompt_valid_bt), prompt_valid_bt, x_nmd, valid_nm,
            prompt_index, attention_fn, prefix_attention_fn)
        return continuation_targets(prompt[:, -1], prompt_index, x)

    def head(self):
        """The vocabulary projection [D, V] in the compute dtype (tied: the embeddings')."""
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(self.dtype)

    def logits(self, hidden_btd, head=None):
        """Logits [B, T, V] in f32; `head`: the projection already at hand (`head()`)."""
        head = self.head() if head is None else head
        return jnp.einsum("btd,dv->btv", hidden_btd, head, preferred_element_type=jnp.float32)

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, valid=None,
                 cache: Optional[KVCache] = None,
                 attention_fn: AttentionFn = dot_product_attention, prefix=None):
        """Logits [B, T, V] in f32 (plus the new cache when `cache` is given; `prefix`: a
        shared prompt cache, see `hidden_states`)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        valid = jnp.ones(x.shape[:2], bool) if valid is None else valid.astype(bool)
        if positions is None:
            positions = positions_from_valid(valid)
        hidden, new_cache = self.hidden_states(x, positions, valid, cache, attention_fn,
                                               prefix=prefix)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)


def grouped_index(prompts: int, rows: int):
    """prompt_index of rows in groups: p R .. p R + R - 1 follow prompt p (R = rows / P)."""
    if rows % prompts:
        raise ValueError(f"{rows} continuations do not come in equal groups of {prompts} "
                         "prompts; pass their prompt_index")
    return jnp.repeat(jnp.arange(prompts), rows // prompts)


def continuation_targets(prompt_last_pd, prompt_index, x_nmd):
    """The states that predict a continuation's tokens: its prompt's last, then its own but
    its last ([N, M, D]); `prompt_index` None: in groups (`grouped_index`)."""
    if prompt_index is None:
        prompt_index = grouped_index(prompt_last_pd.shape[0], x_nmd.shape[0])
    first = prompt_last_pd[prompt_index][:, None].astype(x_nmd.dtype)
    return jnp.concatenate([first, x_nmd[:, :-1]], axis=1)


def positions_from_valid(valid_bt):
    """Positions that count only valid tokens, so left padding does not shift RoPE."""
    return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1, 0)

"""SigLIP vision tower: patch embedding, learned positions, pre-LN encoder layers.

Features are `hidden_states[select_layer]` as VILA uses them (second-to-last layer, no
post-layernorm, every patch kept): only the layers up to that one run. A tower saved with
`vision_use_head` keeps its attention-pooling head so that it is written back as read;
`pooled_output` runs it (transformers' `pooler_output`), features never do.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lvr_jax.kernels import dot_product_attention
from lvr_jax.model import layers
from lvr_jax.model.config import SiglipConfig


def normalize_frames(frames_u8):
    """uint8 frames as decoded -> the tower's input, float32 in [-1, 1] (SigLIP's mean 0.5,
    std 0.5); numpy or jax arrays."""
    return frames_u8.astype("float32") / 127.5 - 1.0


class Attention(nnx.Module):
    def __init__(self, c: SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, h, hd = c.hidden_size, c.num_attention_heads, c.head_dim
        self.q_proj = layers.Dense(d, (h, hd), ("vis_embed", "vis_heads", "head_dim"), **kw)
        self.k_proj = layers.Dense(d, (h, hd), ("vis_embed", "vis_heads", "head_dim"), **kw)
        self.v_proj = layers.Dense(d, (h, hd), ("vis_embed", "vis_heads", "head_dim"), **kw)
        self.out_proj = layers.Dense(h * hd, d, ("vis_heads", "vis_embed"), **kw)

    def __call__(self, x_bnd):
        out = dot_product_attention(self.q_proj(x_bnd), self.k_proj(x_bnd),
                                           self.v_proj(x_bnd))
        return self.out_proj(out.reshape(*x_bnd.shape[:2], -1))


class MLP(nnx.Module):
    def __init__(self, c: SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(c.hidden_size, c.intermediate_size, ("vis_embed", "vis_mlp"), **kw)
        self.fc2 = layers.Dense(c.intermediate_size, c.hidden_size, ("vis_mlp", "vis_embed"), **kw)
        self.act = layers.ACTIVATIONS[c.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, c: SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layers.LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.self_attn = Attention(c, **kw)
        self.layer_norm2 = layers.LayerNorm(c.hidden_size, c.layer_norm_eps, **kw)
        self.mlp = MLP(c, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PoolingHead(nnx.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends to every patch."""

    def __init__(self, c: SiglipConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, h, hd = c.hidden_size, c.num_attention_heads, c.head_dim
        self.probe = layers.param(rngs, (1, 1, d), (None, None, "vis_embed"), param_dtype)
        self.in_proj = layers.Dense(d, (3, h, hd), ("vis_embed", None, "vis_heads", "head_dim"),
                                    **kw)
        self.out_proj = layers.Dense(h * hd, d, ("vis_heads", "vis_embed"), **kw)
        self.layernorm = layers.LayerNorm(d, c.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x_bnd):
        """[B, N, D] (post-layernorm states) -> [B, D]."""
        probe_b1d = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x_bnd.shape[0], 1,
                                                                          x_bnd.shape[2]))
        q = self.in_proj(probe_b1d)[:, :, 0]
        kv = self.in_proj(x_bnd)
        out = dot_product_attention(q, kv[:, :, 1], kv[:, :, 2])
        x = self.out_proj(out.reshape(*probe_b1d.shape[:2], -1))
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class SiglipVisionTower(nnx.Module):
    """Images [B, H, W, C] in [-1, 1] -> patch features [B, num_patches, hidden]."""

    def __init__(self, c: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype, self.remat = c, dtype, remat
        p, d = c.patch_size, c.hidden_size
        self.patch_embedding = layers.Dense(p * p * c.num_channels, d, ("patch", "vis_embed"),
                                            use_bias=True, rngs=rngs, **kw)
        self.position_embedding = layers.param(rngs, (c.num_patches, d), ("patches", "vis_embed"),
                                               param_dtype)
        self.layers = layers.stack_layers(lambda r: EncoderLayer(c, rngs=r, **kw),
                                          c.num_hidden_layers, rngs)
        # Kept for checkpoint round trips; VILA's features are taken before it.
        self.post_layernorm = layers.LayerNorm(d, c.layer_norm_eps, rngs=rngs, **kw)
        if c.vision_use_head:
            self.head = PoolingHead(c, rngs=rngs, **kw)

    def patchify(self, images_bhwc):
        """[B, H, W, C] -> [B, N, p*p*C] in row-major patch order (as a stride-p conv)."""
        b, h, w, ch = images_bhwc.shape
        p = self.config.patch_size
        x = images_bhwc.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * ch)

    def __call__(self, images_bhwc):
        """Features: hidden_states[select_layer], the first token dropped for "patch"."""
        x = self.encode(images_bhwc, self.config.num_feature_layers)
        return x[:, 1:] if self.config.select_feature == "patch" else x

    def encode(self, images_bhwc, num_layers: int):
        """Hidden states [B, N, D] after the first `num_layers` encoder layers."""
        c = self.config
        if images_bhwc.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"vision tower expects {c.image_size}x{c.image_size} images, "
                             f"got {images_bhwc.shape[1]}x{images_bhwc.shape[2]}")
        x = self.patch_embedding(self.patchify(images_bhwc))
        x = x + self.position_embedding[...].astype(self.dtype)

        def body(layer, x, _):
            return layer(x), None
        x, _ = layers.scan_layers(self.layers, body, x, num_layers=num_layers, remat=self.remat)
        return x

    def pooled_output(self, images_bhwc):
        """[B, D]: every layer, post-layernorm, then the pooling head (transformers'
        `pooler_output`); only a tower with `vision_use_head` has one."""
        if not self.config.vision_use_head:
            raise ValueError("this vision tower has no pooling head (vision_use_head is false)")
        x = self.encode(images_bhwc, self.config.num_hidden_layers)
        return self.head(self.post_layernorm(x))

"""VILA multimodal projectors `mlp_downsample_{2x2,3x3}_fix`.

The patch grid is zero-padded to a multiple of k and each k x k block is concatenated on
the channel axis (row offset outer, column offset inner), then an MLP maps it to the LLM
width. Attribute `layer{i}` is `layers.{i}` of VILA's nn.Sequential (layer 0 is the
parameter-free downsample).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.model import layers

# (index in VILA's Sequential, kind, in width, out width) with widths as multiples of
# C = vision hidden size (ints) or "H" = LLM hidden size.
_LAYERS = {
    "mlp_downsample_2x2_fix": [(1, "ln", 4, 4), (2, "linear", 4, "H"), (3, "gelu", 0, 0),
                               (4, "linear", "H", "H")],
    "mlp_downsample_3x3_fix": [(1, "ln", 9, 9), (2, "linear", 9, 3), (3, "gelu", 0, 0),
                               (4, "ln", 3, 3), (5, "linear", 3, "H"), (6, "gelu", 0, 0),
                               (7, "linear", "H", "H")],
}


def downsample(features_fnc, k: int):
    """[F, N, C] patch features on a square grid -> [F, ceil(g/k)^2, k*k*C]."""
    f, n, c = features_fnc.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"projector expects a square patch grid, got {n} patches")
    x = features_fnc.reshape(f, g, g, c)
    pad = -g % k
    x = jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0)))
    s = (g + pad) // k
    x = x.reshape(f, s, k, s, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(f, s * s, k * k * c)


class Projector(nnx.Module):
    """Vision features [F, N, C] -> LLM-width tokens [F, tokens, H]."""

    def __init__(self, projector_type: str, vision_hidden: int, llm_hidden: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if projector_type not in _LAYERS:
            raise ValueError(f"mm_projector_type {projector_type!r} is not one of {list(_LAYERS)}")
        self.k = 2 if "2x2" in projector_type else 3
        order = []
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = lambda w: llm_hidden if w == "H" else w * vision_hidden  # noqa: E731
        for index, kind, din, dout in _LAYERS[projector_type]:
            name = f"layer{index}"
            if kind == "ln":
                setattr(self, name, layers.LayerNorm(width(din), 1e-5, **kw))
            elif kind == "linear":
                setattr(self, name, layers.Dense(width(din), width(dout), ("proj_in", "embed"),
                                                 use_bias=True, **kw))
            order.append((name, kind))
        self.order = tuple(order)

    def __call__(self, features_fnc):
        x = downsample(features_fnc, self.k)
        for name, kind in self.order:
            x = jax.nn.gelu(x, approximate=False) if kind == "gelu" else getattr(self, name)(x)
        return x


def layer_names(projector_type: str) -> list[tuple[int, str]]:
    """(Sequential index, kind) of each parameterised projector layer."""
    return [(i, kind) for i, kind, _, _ in _LAYERS[projector_type] if kind != "gelu"]

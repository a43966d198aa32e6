"""Building blocks shared by the vision tower, projector and LLM.

Parameters carry logical axis names (`axes=`) that the sharding rules map to mesh axes;
weights are stored in the parameter dtype and cast to the compute dtype at use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

# (x, logical_axes) -> x with a sharding constraint; set by lvr_jax.sharding while tracing.
_ACTIVATION_CONSTRAINT: contextvars.ContextVar = contextvars.ContextVar(
    "activation_constraint", default=None)


@contextlib.contextmanager
def activation_constraints(constrain: Callable) -> Iterator[None]:
    """Within this context `constrain_activation` applies `constrain(x, logical_axes)`."""
    token = _ACTIVATION_CONSTRAINT.set(constrain)
    try:
        yield
    finally:
        _ACTIVATION_CONSTRAINT.reset(token)


def constrain_activation(x, logical_axes):
    """Pins x's layout by logical names when sharding rules are active; else a no-op."""
    constrain = _ACTIVATION_CONSTRAINT.get()
    return x if constrain is None else constrain(x, tuple(logical_axes))


# How many chunks `map_tokens` splits token-wise work into; set by lvr_jax.sharding.
_TOKEN_CHUNKS: contextvars.ContextVar = contextvars.ContextVar("token_chunks", default=1)


@contextlib.contextmanager
def token_chunks(num_chunks: int) -> Iterator[None]:
    """Within this context token-wise blocks (the MLP) run in `num_chunks` chunks."""
    token = _TOKEN_CHUNKS.set(int(num_chunks))
    try:
        yield
    finally:
        _TOKEN_CHUNKS.reset(token)


def map_tokens(fn: Callable, xs, axes, num_chunks=None):
    """fn(*xs) for a token-wise fn of arrays [B, T, ...], in chunks of tokens.

    Chunk j holds tokens j, j+n, j+2n, ... so a sequence-sharded T stays sharded with no
    communication; each chunk is recomputed in the backward pass, so the large
    intermediates (MLP width, vocabulary) exist for one chunk at a time.
    """
    n = _TOKEN_CHUNKS.get() if num_chunks is None else num_chunks
    b, t = xs[0].shape[:2]
    if n <= 1 or t % n:
        return fn(*xs)
    split = lambda x: jnp.moveaxis(x.reshape(b, t // n, n, *x.shape[2:]), 2, 0)  # noqa: E731

    def step(_, chunk):
        chunk = [constrain_activation(c, axes[:c.ndim]) for c in chunk]
        return None, fn(*chunk)

    _, ys = jax.lax.scan(jax.checkpoint(step), None, [split(x) for x in xs])
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2).reshape(b, t, *y.shape[3:]), ys)


def param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; init is 'normal' (std 0.02), 'zeros' or 'ones'."""
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.zeros if init == "zeros" else jnp.ones)(shape, dtype)
    return nnx.Param(value, axes=tuple(axes))


def logical_axes(var: nnx.Param) -> tuple:
    """Logical axis names of a parameter made by `param`, with "layers" for the leading
    axis that `stack_layers` adds."""
    axes = tuple(var.get_metadata().get("axes", ()))
    return ("layers",) * (var.get_value().ndim - len(axes)) + axes


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, "ones")
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), param_dtype, "ones")
        self.bias = param(rngs, (dim,), ("embed",), param_dtype, "zeros")
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) over the last axis; kernel may split its output axes."""

    def __init__(self, din: int, dout, axes, *, use_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        dout = (dout,) if isinstance(dout, int) else tuple(dout)
        self.kernel = param(rngs, (din, *dout), axes, param_dtype)
        self.bias = param(rngs, dout, axes[1:], param_dtype, "zeros") if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


ACTIVATIONS: dict[str, Callable] = {
    "gelu_pytorch_tanh": lambda x: gelu(x, True),
    "gelu": lambda x: gelu(x, False),
    "silu": jax.nn.silu,
}


def rope(x_bthd, positions_bt, theta: float):
    """Rotary embedding in the Hugging Face (rotate-half) layout, computed in f32."""
    head_dim = x_bthd.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def as_words(x):
    """A 16-bit float array as uint16 words (other arrays as they are), to slice or update in
    place: XLA's CPU compiler slices and updates a bf16 array through an f32 copy of all of
    it, which for a long video's prompt cache is tens of GB. A bitcast: free everywhere."""
    if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_words(x, dtype):
    """`as_words` undone: uint16 words back to the 16-bit float `dtype`."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Creates `num_layers` layers as one module whose parameters have a leading layer axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, num_layers=None,
                remat: bool = False, remat_group: int = 1):
    """Runs body(layer, carry, x) -> (carry, y) over stacked layers with one lax.scan.

    Scanning keeps compile time independent of depth; `num_layers` runs only the first
    layers (the vision tower stops before its last); `remat` recomputes activations of a
    layer in the backward pass instead of storing them. With `remat_group` k > 1 the
    backward keeps only the input of every k-th layer (L/k of them instead of L, each a
    long sequence's [B, T, D]) and recomputes a group's k inputs when it reaches it: k
    more of them alive at once, one more forward of each layer.
    """
    graphdef, state = nnx.split(layers)
    if num_layers is not None:
        state = jax.tree.map(lambda a: a[:num_layers], state)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if not remat:
        return jax.lax.scan(step, carry, (state, xs))
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
    if remat_group <= 1:
        return jax.lax.scan(step, carry, (state, xs))
    count = jax.tree.leaves(state)[0].shape[0]
    if count % remat_group:
        raise ValueError(f"remat_group={remat_group} does not divide {count} layers")
    grouped = jax.tree.map(lambda a: a.reshape(count // remat_group, remat_group, *a.shape[1:]),
                           (state, xs))

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def group(carry, inputs):
        return jax.lax.scan(step, carry, inputs)
    carry, ys = jax.lax.scan(group, carry, grouped)
    return carry, jax.tree.map(lambda y: y.reshape(count, *y.shape[2:]), ys)

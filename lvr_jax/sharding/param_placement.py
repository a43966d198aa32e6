"""Where parameters live on a mesh: a checkpoint's tensors as they stream in, or the
parameters of a model already built, each by its logical axes and the rules table.

The model package reads and writes checkpoints on one device and never imports sharding;
this module hands `model.checkpoint.load_pretrained` the sharding of every tensor.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lvr_jax.model import LongVILA
from lvr_jax.model.checkpoint import load_pretrained, read_config
from lvr_jax.model.layers import logical_axes
from lvr_jax.sharding.mesh import DEFAULT_RULES, logical_to_sharding, place_global


def param_shapes(config) -> dict[tuple, tuple]:
    """Shape of every LongVILA parameter by its path (as `load_pretrained` names paths)."""
    model = nnx.eval_shape(lambda: LongVILA(config, rngs=nnx.Rngs(0)))
    return {tuple(str(p) for p in path): v.get_value().shape
            for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def sharding_fn(mesh: Mesh, rules=DEFAULT_RULES, shapes: Optional[dict] = None):
    """`sharding_fn(path, logical_axes)` for `load_pretrained`; `shapes` lets it skip
    axes that do not divide (from `param_shapes`)."""
    def fn(path, axes):
        shape = None if shapes is None else shapes.get(tuple(path))
        return logical_to_sharding(axes, mesh, rules, shape)
    return fn


def load_sharded(path: str, mesh: Mesh, rules=DEFAULT_RULES, **kw):
    """`load_pretrained` with every tensor streamed straight into its FSDP/TP sharding."""
    shapes = param_shapes(read_config(path))
    return load_pretrained(path, sharding_fn=sharding_fn(mesh, rules, shapes), **kw)


def param_sharding(var: nnx.Param, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """The sharding of one parameter (abstract or concrete) by its logical axes."""
    return logical_to_sharding(logical_axes(var), mesh, rules, var.get_value().shape)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """The sharding of each parameter of a model (abstract or concrete), as a State."""
    params = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda var: param_sharding(var, mesh, rules), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Moves a model's parameters (in place) into their mesh shardings; returns it."""
    params = nnx.state(model, nnx.Param)
    shardings = param_shardings(model, mesh, rules)
    nnx.update(model, jax.tree.map(
        lambda v, s: v.replace(place_global(np.asarray(v.get_value()), s)),
        params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model

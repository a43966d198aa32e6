"""Small model, meshes and comparisons shared by the sharding tests."""

import dataclasses

import jax
import jax.extend.core as jax_core
import numpy as np
from flax import nnx

from lvr_jax.model import PRESETS, LongVILA
from lvr_jax.sharding import mesh as mesh_lib


def sp_config():
    """The tiny preset with 8 query heads (2 KV heads), so ulysses splits over sp=8."""
    config = PRESETS["tiny"]()
    return config.replace(llm=dataclasses.replace(config.llm, num_attention_heads=8))


def make_model(seed=0):
    return LongVILA(sp_config(), rngs=nnx.Rngs(seed))


def mesh_of(data=1, fsdp=1, sp=8, tp=1):
    shape = dict(data=data, fsdp=fsdp, sp=sp, tp=tp)
    return mesh_lib.make_mesh({"shape": shape})


def frames(num, size=56, seed=1):
    return jax.random.uniform(jax.random.key(seed), (num, size, size, 3), minval=-1, maxval=1)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def shard_map_specs(fn, *args) -> list[tuple]:
    """The in_specs of every shard_map that tracing fn(*args) runs, nested ones included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "shard_map":
                found.append(tuple(eqn.params["in_specs"]))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found

"""Matmul FLOPs of a traced computation, loops counted as often as they run.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of a loop once,
however many times it runs: a `lax.scan` of 10 matmuls reports the FLOPs of one, so a
scanned 28-layer LLM reports one layer and blockwise attention one block. This walks the
jaxpr instead and counts every `dot_general` and convolution (2 FLOPs per multiply-add),
each scan body times its length, a while loop's body `while_trips` times (the sampler's
decoding loop: its bound, max_new_tokens), a shard_map's body once per device it runs on,
and a cond at its most expensive branch (the blockwise kernels' skipped causal blocks
counted as computed, the same for every computation compared). Elementwise work is left
out: matmuls are where a transformer's time goes.
"""

from __future__ import annotations

import math

import jax.extend.core as jax_core
import numpy as np


def dot_flops(eqn) -> float:
    """2 x the output's size x the contracted size of one dot_general."""
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def conv_flops(eqn) -> float:
    """2 x the output's size x the kernel's window and input channels per group."""
    kernel = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"]
    out_features = kernel[spec.rhs_spec[0]]
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(kernel) / out_features


def jaxpr_flops(jaxpr, while_trips: int = 1) -> float:
    """FLOPs of a (closed or open) jaxpr, see the module docstring."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            total += dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += conv_flops(eqn)
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"], while_trips)
        elif name == "while":
            total += while_trips * jaxpr_flops(params["body_jaxpr"], while_trips)
        elif name == "cond":
            total += max(jaxpr_flops(b, while_trips) for b in params["branches"])
        elif name == "shard_map":
            devices = np.size(params["mesh"].devices)
            total += devices * jaxpr_flops(params["jaxpr"], while_trips)
        else:
            total += sum(jaxpr_flops(sub, while_trips)
                         for sub in jax_core.jaxprs_in_params(params))
    return total


def traced_flops(traced, while_trips: int = 1) -> float:
    """FLOPs of a `jax.jit(f).trace(...)` result (all devices together)."""
    return jaxpr_flops(traced.jaxpr, while_trips)


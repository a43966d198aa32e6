"""What one device needs for each phase of a recipe's step, from shapes alone.

Each phase (the frame encoding of a cache miss, the update or its streamed micro-batches and
optimizer step, and a stage's own phases, e.g. GRPO's rollout and log-prob passes) is
compiled on a mesh without loading a weight; XLA's memory analysis gives what the phase
itself takes, and the step's resident state (weights, optimizer state, what the stage holds)
is added beside it. Its matmul FLOPs come from its jaxpr (`lvr_jax.flops`: XLA's own cost
analysis counts a loop's body once), per call and times the calls a step makes. `python -m lvr_jax.train --config=... --compile_only` prints `report`;
`benchmarks/recipe_memory` tabulates it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvr_jax import flops, training
from lvr_jax.config import preset_config
from lvr_jax.model import LongVILA
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding import video_embeddings
from lvr_jax.sharding.param_placement import param_sharding
from lvr_jax.stages import stage_of


def abstract_model(config, mesh) -> LongVILA:
    """The recipe's model with shape structs placed on `mesh` for weights (nothing loaded)."""
    rules = mesh_lib.rules_of(config.mesh)
    model = nnx.eval_shape(lambda: LongVILA(preset_config(config), rngs=nnx.Rngs(0)))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype,
                                               sharding=param_sharding(var, mesh, rules)))
    return model


def abstract_batch(config, mesh, **sizes) -> dict:
    """Shape structs of the stage's update batch (`sizes`: its `abstract_batch` keywords),
    placed as a run places them: rows over the batch axes, or the stage's `batch_layout`."""
    stage, rules = stage_of(config), mesh_lib.rules_of(config.mesh)

    def placed(key, a):
        axes = stage.batch_layout.get(key, ("activation_batch",))[:a.ndim]  # scalars: whole
        sharding = mesh_lib.logical_to_sharding(axes + (None,) * (a.ndim - len(axes)),
                                                mesh, rules, a.shape)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    shapes = stage.abstract_batch(config, preset_config(config), mesh, **sizes)
    return {k: jax.tree.map(functools.partial(placed, k), a) for k, a in shapes.items()}


def abstract_opt_state(tx, trainable):
    """Shape structs of the optimizer state of `trainable`, placed as a run places it."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(tx.init, trainable),
                        training.opt_state_shardings(tx, trainable))


def trace_update(config, mesh) -> dict:
    """The update traced on `mesh`: phase -> traced. One optimizer step ("update"), or
    where the stage streams its micro-batches one micro-batch's pass ("update micro-batch",
    adding its gradients to the sum) and the optimizer applying the sum ("optimizer step").
    Parameters, optimizer state and the sum are donated, as in a run."""
    stage = stage_of(config)
    graphdef, trainable, frozen = nnx.split(abstract_model(config, mesh),
                                            stage.trainable_filter(config), ...)
    tx = training.make_optimizer(config.optim)
    opt_state = abstract_opt_state(tx, trainable)
    loss_fn = stage.loss_fn(config, mesh)
    if not stage.streams_update(config):
        step = training.jit_update(tx, loss_fn, micro=stage.micro_batches(config))
        return {"update": step.trace(trainable, frozen, opt_state, graphdef=graphdef,
                                     batch=abstract_batch(config, mesh))}
    streamed = training.StreamedUpdate(tx, loss_fn)
    batch = abstract_batch(config, mesh, micro=True)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    summed = jax.eval_shape(functools.partial(streamed.first, graphdef=graphdef, batch=batch),
                            trainable, frozen)
    (_, aux), _ = summed
    summed = ((scalar, {k: scalar for k in aux}), trainable)  # gradients lie as the weights
    return {"update micro-batch": streamed.add.trace(trainable, frozen, summed,
                                                     graphdef=graphdef, batch=batch),
            "optimizer step": streamed.apply.trace(trainable, opt_state, summed)}


def trace_frame_encoding(config, mesh) -> dict:
    """One video of `data.num_frames` frames encoded over the mesh as a cache miss encodes
    it (MR-SP stage 1, `video_embeddings.encoder_fn`): GRPO the video's embeddings, SFT the
    tower's features (the projector trains on top); none where nothing is frozen."""
    output = stage_of(config).video_output(config)
    if output == "frames":
        return {}
    graphdef, state = nnx.split(abstract_model(config, mesh))
    rules, size = mesh_lib.rules_of(config.mesh), preset_config(config).vision.image_size
    frames = jax.ShapeDtypeStruct((config.data.num_frames, size, size, 3), jnp.float32)

    def encode(state, frames):  # unused weights (the LLM's layers) are not arguments
        encoder = video_embeddings.FrozenEncoder(nnx.merge(graphdef, state),
                                                 with_projector=output == "embeddings")
        return video_embeddings.encoder_fn(encoder, mesh, rules)(frames)
    return {"frame encoding": jax.jit(encode).trace(state, frames)}


def trace_phases(config, mesh) -> dict:
    """Each phase of a step of the recipe traced from shapes: phase -> traced."""
    llm = abstract_model(config, mesh).llm
    return {**trace_frame_encoding(config, mesh), **trace_update(config, mesh),
            **stage_of(config).trace_phases(
                config, mesh, llm, functools.partial(abstract_batch, config, mesh))}


def held_beside(config, mesh) -> dict:
    """What a step keeps on each device while each phase runs, besides that phase's own
    arguments: phase -> {what: bytes}. The trainable weights and the optimizer state stay
    resident through a step (the update takes them as arguments), and what the stage holds
    (`Stage.held_during_step`)."""
    stage = stage_of(config)
    _, trainable, _ = nnx.split(abstract_model(config, mesh), stage.trainable_filter(config), ...)
    opt_state = abstract_opt_state(training.make_optimizer(config.optim), trainable)
    weights = {"trainable weights": per_device_bytes(trainable)}
    adam = {"optimizer state": per_device_bytes(opt_state)}
    step = stage.held_during_step(config, trainable, functools.partial(abstract_batch, config,
                                                                      mesh), per_device_bytes)
    return {"frame encoding": weights | adam | step, "rollout": adam | step,
            "log-probs": adam | step, "update": step, "update micro-batch": adam | step,
            "optimizer step": step}


def per_device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of placed shape structs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def peak_bytes(memory) -> int:
    """What one device holds at the step's peak by XLA's memory analysis: arguments,
    temporaries and outputs, the outputs that reuse donated arguments counted once."""
    return (memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)


@dataclasses.dataclass
class PhaseCost:
    """One phase of a step on a mesh: XLA's memory analysis of its compile, what the step
    holds beside it (what -> bytes) and the total one device needs meanwhile; its matmul
    FLOPs per call (all devices, `flops.traced_flops`) and how often a step calls it."""

    memory: Any
    held: dict
    total: int
    flops: float
    calls: int

    @property
    def step_flops(self) -> float:
        return self.flops * self.calls


def phase_costs(config, mesh) -> dict[str, PhaseCost]:
    """Each phase of a step (`trace_phases`) compiled on `mesh`, with its memory and FLOPs."""
    stage = stage_of(config)
    held, calls = held_beside(config, mesh), stage.phase_calls(config)
    costs = {}
    for phase, traced in trace_phases(config, mesh).items():
        memory = traced.lower().compile().memory_analysis()
        costs[phase] = PhaseCost(memory, held[phase],
                                 peak_bytes(memory) + sum(held[phase].values()),
                                 flops.traced_flops(traced, stage.loop_trips(config)),
                                 calls[phase])
    return costs


def report(config) -> None:
    """Prints what one device needs for each phase of a step of the recipe on this machine's
    devices (XLA's memory analysis of its compile) and what the step holds beside it."""
    mesh = mesh_lib.make_mesh(config.mesh)
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(f"{config.stage} step on {dict(mesh.shape)}, per device:")
    devices = mesh.devices.size
    for phase, cost in phase_costs(config, mesh).items():
        memory = cost.memory
        print(f"  {phase}: arguments {gib(memory.argument_size_in_bytes)}, temporaries "
              f"{gib(memory.temp_size_in_bytes)}, outputs {gib(memory.output_size_in_bytes)} "
              f"({gib(memory.alias_size_in_bytes)} of them in donated arguments), "
              f"peak {gib(peak_bytes(memory))}")
        beside = ", ".join(f"{what} {gib(size)}" for what, size in cost.held.items())
        print(f"    held beside it: {beside or 'nothing'}; total {gib(cost.total)}")
        print(f"    matmul TFLOPs per device: {cost.flops / devices / 1e12:.3g} per call, "
              f"x {cost.calls} calls a step = {cost.step_flops / devices / 1e12:.3g}")
    for note in stage_of(config).memory_notes(config):
        print(f"  {note}")

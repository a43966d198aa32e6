"""One sequence-parallel training loss, the same on any number of processes.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
        python -m lvr_jax.sharding.multihost_check --out loss.json   (and PROCESS_ID=1)

Each process builds the same tiny model and batch, places them on a mesh over all global
devices (sp takes them all), encodes the frames sequence-parallel and computes the
loss and gradient norm of the LLM with ring attention. Process 0 writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvr_jax.model import PRESETS, LongVILA
from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.frames import encode_video_sharded
from lvr_jax.sharding.param_placement import shard_model
from lvr_jax.sharding.sequence import sp_hidden_states

VIDEO_ID = 151650


def tiny_model() -> LongVILA:
    config = PRESETS["tiny"]()
    config = config.replace(llm=dataclasses.replace(config.llm, num_attention_heads=8))
    return LongVILA(config, rngs=nnx.Rngs(0))


def batch() -> dict[str, np.ndarray]:
    """Five frames and two prompts (one left-padded); fixed so every process agrees."""
    frames = np.random.default_rng(0).uniform(-1, 1, (5, 56, 56, 3)).astype(np.float32)
    ids = np.array([[5, 6, 7, VIDEO_ID, 8, 9, 10, 11, 12, 19],
                    [0, 0, 13, 14, VIDEO_ID, 15, 16, 17, 18, 19]], np.int32)
    valid = np.ones(ids.shape, bool)
    valid[1, :2] = False
    return dict(frames=frames, ids=ids, valid=valid)


def loss_and_grad_norm(model, frames, ids, valid, mesh, strategy):
    """Mean token log-prob loss over valid tokens and the LLM gradient's global norm."""
    video, video_valid = encode_video_sharded(model, frames, mesh)
    embeds, merged_valid = model.embed_inputs(ids, video, valid, video_valid)
    positions = positions_from_valid(merged_valid)
    t = embeds.shape[1]

    def loss_fn(llm):
        hidden = sp_hidden_states(llm, embeds, merged_valid, positions, mesh, strategy,
                                  block_size=8)[:, :t]
        logits = llm.logits(hidden)
        labels = (positions * 7 + 3) % logits.shape[-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(merged_valid, logp, 0.0)) / jnp.sum(merged_valid)

    loss, grads = nnx.value_and_grad(loss_fn)(model.llm)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    return loss, jnp.sqrt(sum(jnp.sum(g * g) for g in leaves))


def run(strategy: str = "ring") -> dict:
    """Loss and gradient norm on a mesh over every global device (sp takes them all)."""
    mesh = mesh_lib.make_mesh({"shape": dict(data=1, fsdp=1, sp=-1, tp=1)})
    model = shard_model(tiny_model(), mesh)
    replicated = NamedSharding(mesh, P())
    inputs = {k: mesh_lib.place_global(v, replicated) for k, v in batch().items()}
    step = nnx.jit(loss_and_grad_norm, static_argnames=("mesh", "strategy"))
    loss, grad_norm = step(model, inputs["frames"], inputs["ids"], inputs["valid"], mesh=mesh,
                           strategy=strategy)
    return dict(loss=float(loss), grad_norm=float(grad_norm), processes=jax.process_count(),
                devices=jax.device_count())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ring", choices=mesh_lib.STRATEGIES)
    args = parser.parse_args(argv)
    mesh_lib.initialize_distributed()
    result = run(args.strategy)
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

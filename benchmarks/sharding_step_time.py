"""Step time of each SP attention strategy at sp = 8 vs sp = 1 on simulated CPU devices.

    python -m benchmarks.sharding_step_time --frames 8

Runs the RL step of `sharding_memory` (forward + backward of the policy loss) for real on
the small config. Simulated devices share the host's cores, so the ratio shows the
overhead of each strategy's communication and bookkeeping, not a speed-up. At 8 frames the
sequence is 4.4K tokens (2K of them response) through 4 remat layers, so a step takes seconds
on a CPU; compute is f32 by default, since CPUs run bf16 matmuls several times slower.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks.sharding_memory import PROMPT, RESPONSE, TOKENS_PER_FRAME, policy_loss_step, small_llm  # noqa: E402
from lvr_jax.model.qwen2 import Qwen2  # noqa: E402
from lvr_jax.sharding import mesh as mesh_lib  # noqa: E402
from lvr_jax.sharding.param_placement import shard_model  # noqa: E402


def seconds_per_step(frames: int, sp: int, strategy: str, dtype=jnp.float32,
                     repeats: int = 3) -> float:
    """Median wall time of the compiled step on a mesh of `sp` devices."""
    mesh = mesh_lib.make_mesh({"shape": dict(data=1, fsdp=1, sp=sp, tp=1)},
                              devices=jax.devices()[:sp])
    config = small_llm()
    llm = shard_model(Qwen2(config, dtype=dtype, remat=True, rngs=nnx.Rngs(0)), mesh)
    t = frames * TOKENS_PER_FRAME + PROMPT + RESPONSE
    t -= t % (2 * sp)  # keep the toy batch divisible; padding is tested elsewhere
    rng = np.random.default_rng(0)
    seq = NamedSharding(mesh, P(None, "sp"))
    embeds = jax.device_put(rng.normal(size=(1, t, config.hidden_size)).astype(dtype),
                            NamedSharding(mesh, P(None, "sp", None)))
    valid = jax.device_put(np.ones((1, t), bool), seq)
    positions = jax.device_put(np.arange(t, dtype=np.int32)[None], seq)
    actions = jnp.asarray(rng.integers(0, config.vocab_size, (1, RESPONSE)), jnp.int32)
    advantages = jnp.ones((1, RESPONSE), jnp.float32)
    step = nnx.jit(policy_loss_step, static_argnums=(6, 7, 8))
    args = (llm, embeds, valid, positions, actions, advantages, mesh, strategy, 512)
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--strategies", nargs="*", default=list(mesh_lib.STRATEGIES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell (median)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    base = seconds_per_step(args.frames, 1, "all_gather", dtype, args.repeats)
    print(f"small config, {args.frames} frames, {args.dtype}; sp=1 step {base:.2f} s "
          f"({jax.devices()[0].platform}, {jax.device_count()} devices)")
    print(f"{'strategy':>10} {'sp=8 s/step':>12} {'ratio to sp=1':>14}")
    for strategy in args.strategies:
        sec = seconds_per_step(args.frames, 8, strategy, dtype, args.repeats)
        print(f"{strategy:>10} {sec:12.2f} {sec / base:14.2f}", flush=True)


if __name__ == "__main__":
    main()

"""MR-SP stage 1: encoding one long video with its frames split over sp = 8 vs on one device.

    python -m benchmarks.frame_encoding --frames 256

On 8 (simulated) devices, the frame-parallel encoder (`lvr_jax.sharding.frames`, the path
`VideoEmbedder` takes on a cache miss) against `LongVILA.encode_video` on one device:
per-device memory from XLA's memory analysis of each compiled program (arguments +
temporaries + outputs), and wall time of each (on simulated CPU devices the 8 "devices"
share this machine's cores, so the time ratio says little; the memory one is what sp buys).
`--tower 7b` compiles LongVILA-R1-7B's SigLIP (448 px, 27 layers) for memory only; the
default is a small tower that also runs. Then the share of encoding in a GRPO step: one
encode of the batch's videos against a cached step (`benchmarks.rl_cache_speedup` times
whole steps with and without the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lvr_jax.model import PRESETS, LongVILA  # noqa: E402
from lvr_jax.sharding import frames as frames_lib  # noqa: E402
from lvr_jax.sharding import mesh as mesh_lib  # noqa: E402

GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.frame_encoding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--tower", default="small", choices=("small", "7b"))
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def model_config(tower: str):
    config = PRESETS["tiny"]()
    if tower == "7b":
        vision = PRESETS["longvila_r1_7b"]().vision
        return config.replace(vision=vision)
    return config.replace(vision=dataclasses.replace(config.vision, hidden_size=256,
                                                     intermediate_size=1024, image_size=112))


def per_device_gib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / GIB


def programs(model, mesh):
    """(name, jitted fn of frames) for one device and for sp = 8."""
    one = jax.jit(lambda x: model.encode_video(x))
    split = jax.jit(lambda x: frames_lib.encode_video_sharded(model, x, mesh)[0])
    return [("one device", one), ("frames over sp = 8", split)]


def main(argv=None):
    args = parse_args(argv)
    config = model_config(args.tower)
    model = LongVILA(config, rngs=nnx.Rngs(0))  # the 7B's tower: 0.4B random weights
    mesh = mesh_lib.make_mesh({"shape": dict(data=1, fsdp=1, sp=8, tp=1)})
    size = config.vision.image_size
    shape = jax.ShapeDtypeStruct((args.frames, size, size, 3), jnp.float32)
    rows = []
    for name, fn in programs(model, mesh):
        gib = per_device_gib(fn.lower(shape).compile())
        seconds = None
        if args.tower == "small":
            frames = jax.random.uniform(jax.random.key(0), shape.shape, minval=-1, maxval=1)
            jax.block_until_ready(fn(frames))
            start = time.perf_counter()
            for _ in range(args.repeats):
                jax.block_until_ready(fn(frames))
            seconds = (time.perf_counter() - start) / args.repeats
        rows.append((name, gib, seconds))
    base_gib, base_s = rows[0][1], rows[0][2]
    print(f"\n| encoding {args.frames} frames ({args.tower} tower, {size} px) | per-device GiB "
          "| ratio | seconds (simulated devices) |\n|---|---|---|---|")
    for name, gib, seconds in rows:
        time_text = "-" if seconds is None else f"{seconds:.2f}"
        print(f"| {name} | {gib:.3f} | {gib / base_gib:.2f} | {time_text} |")
    if base_s is not None:
        print(f"\nOne encode of this video on one device: {base_s:.2f} s; with the embedding cache "
              "a GRPO step encodes it once per run instead of once per step (and without it, once "
              "per forward: `python -m benchmarks.rl_cache_speedup`).")


if __name__ == "__main__":
    main()

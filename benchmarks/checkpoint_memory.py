"""Peak host RAM of loading a VILA checkpoint: streaming loader vs whole-file loading.

    python -m benchmarks.checkpoint_memory --size_mb 400

Writes a random checkpoint of about --size_mb, then loads it in fresh processes and
prints the peak resident memory above the process's baseline as a multiple of the
checkpoint's size. The naive row reads every file whole first, as many loaders do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile


def build_checkpoint(path: str, size_mb: int) -> int:
    """A random LongVILA of roughly size_mb in f32; returns its bytes on disk."""
    from flax import nnx

    from lvr_jax.model import PRESETS, LongVILA, save_pretrained

    base = PRESETS["tiny"]()
    hidden = 512
    layers = max(1, int(size_mb * 2**20 / 4 / (12 * hidden * hidden)))
    llm = dataclasses.replace(base.llm, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_attention_heads=8, num_key_value_heads=4,
                              num_hidden_layers=layers, vocab_size=8192)
    model = LongVILA(base.replace(llm=llm), rngs=nnx.Rngs(0))
    save_pretrained(model, path, max_shard_bytes=100 << 20)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files if f.endswith(".safetensors"))


def peak_rss() -> int:
    """High-water mark of resident memory of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure(path: str, how: str) -> dict:
    """Runs in a fresh process: baseline RSS after imports, then peak RSS after loading."""
    import jax
    import jax.numpy as jnp

    from lvr_jax.model import load_pretrained

    jnp.ones(1).block_until_ready()
    baseline = peak_rss()
    if how == "streaming":
        model = load_pretrained(path)
    else:  # whole files in memory first, then converted: about 2x the checkpoint
        from safetensors.numpy import load_file
        everything = {}
        for comp in ("llm", "vision_tower", "mm_projector"):
            d = os.path.join(path, comp)
            for f in sorted(os.listdir(d)):
                if f.endswith(".safetensors"):
                    everything.update(load_file(os.path.join(d, f)))
        model = load_pretrained(path)
        del everything
    jax.block_until_ready(jax.tree.leaves(model))
    peak = peak_rss()
    return {"baseline": baseline, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=int, default=400, help="checkpoint size to generate")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        size = build_checkpoint(tmp, args.size_mb)
        print(f"checkpoint: {size / 2**20:.0f} MiB of safetensors")
        print(f"{'loader':<12} {'baseline MiB':>13} {'peak MiB':>9} {'(peak-baseline)/size':>21}")
        for how in ("streaming", "whole-file"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_memory",
                                  "--measure", tmp, how], check=True, capture_output=True,
                                 text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ratio = (r["peak"] - r["baseline"]) / size
            print(f"{how:<12} {r['baseline'] / 2**20:>13.0f} {r['peak'] / 2**20:>9.0f} {ratio:>21.2f}")


if __name__ == "__main__":
    main()

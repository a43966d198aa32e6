"""What one device of 8 needs for each phase of a recipe's step, against the frames per video,
the MR-SP attention strategy and the recipe's mesh; the ceiling of each.

    python -m benchmarks.recipe_memory                      # 7B GRPO, 256 to 4,096 frames
    python -m benchmarks.recipe_memory --recipe longvila_r1_7b_sft
    python -m benchmarks.recipe_memory --recipe longvila_3b_grpo --platforms gpu8
    python -m benchmarks.recipe_memory --phases --platforms gpu8 tpu hour   # each phase, as shipped

Each cell compiles every phase of a step of `configs/<recipe>.py` as shipped (its batch
sizes, micro-batches, chunks, offloads) on 8 simulated devices with
`data.num_frames` and `mesh.attention` changed, from shapes alone (`memory_report.phase_costs`,
what `python -m lvr_jax.train --compile_only` prints), and shows the worst phase: its peak
by XLA's memory analysis of this CPU compile plus what the step holds beside it (weights,
optimizer state, reference policy), and the matmul FLOPs per device of a step's log-prob
and update passes (`lvr_jax.flops`). The ceiling is the most frames at which every phase
fits an 80 GB GPU (69.0 GiB left to XLA). `--phases` prints every phase of each platform's
recipe as shipped instead: peak per device, FLOPs per device per call, calls per step. Ulysses needs the query heads (28) to divide by
sp: on `tpu`'s sp = 8 it does not run. `benchmarks/gpu_step` checks such figures on a GPU.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lvr_jax import memory_report  # noqa: E402
from lvr_jax.config import preset_config  # noqa: E402
from lvr_jax.sharding import mesh as mesh_lib  # noqa: E402

GIB = 1 << 30
# An 80 GB GPU holds 74.5 GiB; the CUDA context, cuDNN and NCCL take about 5.5 of it: XLA
# gets 69.0 GiB (the bytes every figure is held against)
GPU_80GB = 80e9 - 5.5 * GIB
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="longvila_r1_7b_grpo", help="a config in configs/")
    p.add_argument("--frames", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--platforms", nargs="+", default=["gpu8", "tpu"])
    p.add_argument("--strategies", nargs="+", default=list(mesh_lib.STRATEGIES))
    p.add_argument("--layers", type=int, default=0,
                   help="LLM layers (0: the recipe's 28); fewer compile faster, for a check")
    p.add_argument("--override", action="append", default=[], metavar="[PLATFORM:]KEY=VALUE",
                   help="a recipe key to change, e.g. rl.rollout.prompts_per_chunk=4 (VALUE "
                        "as a Python literal); PLATFORM: only on that platform's rows")
    p.add_argument("--phases", action="store_true",
                   help="every phase of each platform's recipe as shipped (frames unchanged)")
    p.add_argument("--out", default="runs/recipe_memory.png", help="the plot ('' for none)")
    return p.parse_args(argv)


def recipe(name: str, platform: str):
    spec = importlib.util.spec_from_file_location("recipe", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(platform)


def set_key(config, key: str, value) -> None:
    *path, last = key.split(".")
    node = config
    for name in path:
        node = node[name]
    node[last] = value


def cell_config(args, platform: str, strategy: str, frames: int):
    config = recipe(args.recipe, platform)
    config.mesh.attention, config.data.num_frames = strategy, frames
    if args.layers:
        config.model.llm = dict(config.model.llm, num_hidden_layers=args.layers)
    for item in args.override:
        key, value = item.split("=", 1)
        only, _, key = key.rpartition(":")
        if only in ("", platform):
            set_key(config, key, ast.literal_eval(value))
    return config


def heads_allow(config, mesh) -> bool:
    """Ulysses gives each device all the sequence and heads / sp of the heads."""
    heads = preset_config(config).llm.num_attention_heads
    return config.mesh.attention != "ulysses" or heads % mesh.shape["sp"] == 0


# The passes whose FLOPs a step repeats over its sequences (not the rollout's decoding).
PASSES = ("log-probs", "update", "update micro-batch")


def costs(config) -> dict | str:
    """phase -> `memory_report.PhaseCost` on the recipe's 8-device mesh, or why it cannot run."""
    mesh = mesh_lib.make_mesh(config.mesh)
    if not heads_allow(config, mesh):
        return "heads do not divide"
    try:
        return memory_report.phase_costs(config, mesh)
    except ValueError as error:  # e.g. a chunk of prompts that fsdp does not divide
        return f"cannot run: {error}"


def measure(config) -> dict | str:
    """phase -> total bytes per device (peak + held beside it), plus "pass TFLOPs": the
    log-prob and update passes' matmul TFLOPs per device per step; or why it cannot run."""
    report = costs(config)
    if isinstance(report, str):
        return report
    out = {phase: cost.total for phase, cost in report.items()}
    return {**out, "pass TFLOPs": sum(c.step_flops for p, c in report.items() if p in PASSES)
            / 8 / 1e12}


def ceiling(row: dict) -> int | None:
    """The most frames at which every phase fits, counting up until one does not."""
    best = None
    for frames, phases in sorted(row.items()):
        if isinstance(phases, str) or max(memory(phases).values()) >= GPU_80GB:
            break
        best = frames
    return best


def memory(phases: dict) -> dict:
    """The phases' bytes of a `measure` result (its FLOPs left out)."""
    return {p: v for p, v in phases.items() if p != "pass TFLOPs"}


def print_table(args, table: dict) -> None:
    frames_text = " | ".join(f"{f:,} frames" for f in args.frames)
    print(f"\n| `{args.recipe}` | strategy | {frames_text} | ceiling |")
    print("|---|---|" + "---|" * len(args.frames) + "---|")
    for (platform, strategy), row in table.items():
        cells = []
        for frames in args.frames:
            phases = row[frames]
            if isinstance(phases, str):
                cells.append(phases)
                continue
            totals = memory(phases)
            worst = max(totals, key=totals.get)
            mark = "" if totals[worst] < GPU_80GB else " (over)"
            cells.append(f"{totals[worst] / GIB:.1f} GiB {worst}{mark}, "
                         f"{phases['pass TFLOPs']:,.0f} TFLOPs")
        top = ceiling(row)
        top_text = "-" if top is None else (f"{top:,}" if top < max(args.frames)
                                            else f">= {top:,}")
        print(f"| `{platform}` | {strategy} | " + " | ".join(cells) + f" | {top_text} |")


def plot(args, table: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (platform, strategy), row in table.items():
        points = [(f, max(memory(p).values()) / GIB) for f, p in sorted(row.items())
                  if not isinstance(p, str)]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{platform} {strategy}")
    ax.axhline(GPU_80GB / GIB, color="k", linestyle="--", label="80 GB GPU (69.0 GiB to XLA)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.frames, [f"{f:,}" for f in args.frames])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("frames per video")
    ax.set_ylabel("worst phase per device (GiB)")
    ax.set_title(f"{args.recipe} on 8 devices (XLA memory analysis of a CPU compile)",
                 fontsize=10)
    ax.legend(fontsize=8)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


def print_phases(args) -> None:
    """Every phase of each platform's recipe as shipped: peak per device (what the step holds
    beside it included), matmul TFLOPs per device per call and per step."""
    print(f"\n| `{args.recipe}` | phase | per device | TFLOPs per device per call | calls a step "
          "| TFLOPs per device a step |\n|---|---|---|---|---|---|")
    for platform in tqdm(args.platforms, desc="compiling", unit="recipe"):
        report = costs(cell_config(args, platform, recipe(args.recipe, platform).mesh.attention,
                                   recipe(args.recipe, platform).data.num_frames))
        if isinstance(report, str):
            print(f"| `{platform}` | {report} | | | | |")
            continue
        for phase, cost in report.items():
            print(f"| `{platform}` | {phase} | {cost.total / GIB:.1f} GiB | "
                  f"{cost.flops / 8 / 1e12:,.1f} | {cost.calls} | "
                  f"{cost.step_flops / 8 / 1e12:,.0f} |", flush=True)
        passes = sum(c.step_flops for p, c in report.items() if p in PASSES) / 8 / 1e12
        print(f"| `{platform}` | log-prob and update passes | | | | {passes:,.0f} |")


def main(argv=None):
    args = parse_args(argv)
    assert jax.device_count() == 8, "the recipes' meshes are for 8 devices"
    if args.phases:
        return print_phases(args)
    cells = [(p, s, f) for p in args.platforms for s in args.strategies for f in args.frames]
    table = {}
    start = time.perf_counter()
    for platform, strategy, frames in tqdm(cells, desc="compiling", unit="cell"):
        row = table.setdefault((platform, strategy), {})
        row[frames] = measure(cell_config(args, platform, strategy, frames))
    print(f"{len(cells)} cells compiled in {time.perf_counter() - start:.0f} s")
    print_table(args, table)
    if args.out:
        plot(args, table)


if __name__ == "__main__":
    main()

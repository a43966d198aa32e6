"""One-step off-policy GRPO vs strictly in turn, on a rollout server on loopback.

    python -m benchmarks.off_policy --data runs/demo/data --init runs/demo/sft/model

runs the demo's GRPO recipe twice from the same model and data through
`lvr_jax.trainer.run` with `rl.rollout.backend=server`: once synchronous
(`rl.off_policy_steps=0`: push, generate, then update) and once one-step off-policy
(`rl.off_policy_steps=1`: the server generates batch k+1 while the trainer updates on batch
k, `rl.rollout_correction=token-tis`). Prints the mean step time (the first, compiling, step
left out) as a ratio table and the reward per step, and draws both reward curves to `--out`.
Without `--init` the demo model is random (rewards stay near 0: the table is then about time
only); without `--data` a small synthetic set is generated.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

MODES = {"synchronous": dict(off_policy_steps=0),
         "one-step off-policy": dict(off_policy_steps=1, rollout_correction="token-tis")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.off_policy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a synthetic set (default: 24 videos, generated)")
    p.add_argument("--init", default=None, help="the VILA directory GRPO starts from")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default: recipe's)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    p.add_argument("--python", default=None, help="interpreter of the server (vLLM's venv)")
    p.add_argument("--out", default="runs/off_policy.png")
    return p.parse_args(argv)


def recipe(args, data: str, url: str, mode: dict):
    from lvr_jax.config import demo_config
    config = demo_config("grpo", data, args.steps)
    config.data.categories = ()  # every category, as the README's figures were measured
    config.model.update(init=args.init or "", allow_random_init=not args.init)
    config.rl.rollout.update(backend="server", urls=[url], wait_s=120)
    config.rl.update(**mode)
    if args.prompts:
        config.data.batch_size = args.prompts
        config.rl.update_batch_size = min(config.rl.update_batch_size, args.prompts)
    if args.max_new_tokens:
        config.rl.max_new_tokens = args.max_new_tokens
    config.eval.every = 0
    config.train.update(export=False, checkpoint_every=10_000)
    return config


def run_mode(args, data, url, mode, workdir) -> list[dict]:
    from lvr_jax import trainer
    from lvr_jax.metrics import read_metrics
    trainer.run(recipe(args, data, url, mode), workdir)
    return [r for r in read_metrics(os.path.join(workdir, "grpo_metrics.jsonl")) if "reward" in r]


def plot(curves: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker="o", label=name)
    ax.set(xlabel="GRPO step", ylabel="training reward", title="GRPO on a rollout server")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None):
    from lvr_jax import build
    from lvr_jax.data.synthetic import generate
    from rollout_bridge import export
    from rollout_bridge.launch import running_server
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "data")
        if not args.data:
            generate(data, num_videos=24, frames=32, size=64, seed=0, progress=False)
        tokenizer, model = build.build_model(recipe(args, data, "http://unused", MODES["synchronous"]))
        llm_dir = export.export_dir(model, os.path.join(tmp, "llm"), tokenizer)
        curves = {}
        for name, mode in MODES.items():  # a fresh server each: weight versions start again
            with running_server(llm_dir, args.engine, python=args.python or sys.executable,
                                log_dir=tmp) as server:
                curves[name] = run_mode(args, data, server.url, mode, os.path.join(tmp, name))
    seconds = {n: np.mean([r["step_seconds"] for r in rows[1:]]) for n, rows in curves.items()}
    base = seconds["synchronous"]
    print(f"\n| GRPO step on a {args.engine} server (steps 2-{args.steps}) | seconds | "
          "speed-up |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.1f} | {base / s:.2f}x |")
    for name, rows in curves.items():
        print(f"{name} reward per step: " + " ".join(f"{r['reward']:.3f}" for r in rows))
    plot(curves, args.out)
    print(f"reward curves: {args.out}")


if __name__ == "__main__":
    main()

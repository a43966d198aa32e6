"""The embedded default: SFT then GRPO of a tiny LongVILA on synthetic long videos, on a CPU.

    python -m lvr_jax.demo --workdir runs/demo

1. generates the synthetic event-video set (train / test splits with disjoint videos);
2. text-only option drills, then CoT-SFT (`configs/demo.py:sft`), then evaluates on the
   test questions;
3. GRPO from the SFT model (`configs/demo.py:grpo`), then evaluates again;
4. writes `results.json`, `accuracy.png` and the learning curves of both stages.
Each stage resumes from its checkpoints if the demo is interrupted and run again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib

from absl import logging as absl_logging

from lvr_jax import train
from lvr_jax.data import synthetic
from lvr_jax.data.schema import load_eval_records
from lvr_jax.eval import report, runner

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="data, checkpoints, plots")
    parser.add_argument("--videos", type=int, default=2000, help="synthetic videos to generate")
    parser.add_argument("--drill_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--sft_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--grpo_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--eval_limit", type=int, default=0, help="evaluate on the first N only")
    return parser.parse_args(argv)


def stage_config(stage: str, data: str, steps: int | None = None):
    """configs/demo.py for a stage, reading the synthetic set in `data`."""
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(stage)
    config.data.update(records=os.path.join(data, "train.jsonl"), video_root=data)
    config.eval.records = os.path.join(data, "test_eval.jsonl")
    if steps is not None:
        config.train.num_steps = steps
    return config


def evaluate_stage(config, workdir: str, out_dir: str, limit: int) -> dict:
    """Accuracy of a stage's exported model on the test questions (reasoning on)."""
    records = load_eval_records(config.eval.records)
    records = records[:limit] if limit else records
    [row] = runner.evaluate_checkpoint(config, workdir, [config.data.num_frames], [True], records,
                                       out_dir)
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, "test_eval.jsonl")):
        synthetic.generate(data, num_videos=args.videos, frames=64, size=96)
    results, eval_dir = {}, os.path.join(args.workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    sft = stage_config("sft", data, args.sft_steps)
    if args.drill_steps is not None:
        sft.drills.steps = args.drill_steps
    train.run(sft, os.path.join(args.workdir, "sft"))
    results["after SFT"] = evaluate_stage(sft, os.path.join(args.workdir, "sft"), eval_dir,
                                          args.eval_limit)
    grpo = stage_config("grpo", data, args.grpo_steps)
    grpo.model.init = os.path.join(args.workdir, "sft", "model")
    train.run(grpo, os.path.join(args.workdir, "grpo"))
    results["after GRPO"] = evaluate_stage(grpo, os.path.join(args.workdir, "grpo"), eval_dir,
                                           args.eval_limit)
    report.write_comparison(eval_dir, list(results.values()))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report.plot_categories(results, os.path.join(args.workdir, "accuracy.png"))
    print(f"\n{'stage':<12} {'accuracy':>9} {'unparseable':>12}  per category")
    for stage, r in results.items():
        cats = ", ".join(f"{k} {v:.0%}" for k, v in r["per_category"].items())
        print(f"{stage:<12} {r['accuracy']:>9.1%} {r['unparseable']:>12}  {cats}")
    print(f"chance is 25%; plots: {args.workdir}/accuracy.png, {args.workdir}/*/…_curves.png")
    return results


if __name__ == "__main__":
    main()

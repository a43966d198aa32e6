"""The embedded default: SFT then GRPO of a tiny LongVILA on synthetic long videos, on a CPU.

    python -m lvr_jax.demo --workdir runs/demo

1. generates the synthetic event-video set (train / validation / test splits with disjoint
   videos; the training videos split again, a third for SFT and two thirds for GRPO; the
   SFT third's chains of thought make a simulated annotator's slips, `--annotator_slip`);
2. CoT-SFT (`configs/demo.py:sft`), then evaluates on the test questions;
3. GRPO from the SFT model (`configs/demo.py:grpo`), then evaluates again;
4. writes `results.json`, `accuracy.png`, `heldout_during_grpo.png` (accuracy on a fixed
   slice of validation questions against the GRPO step) and the learning curves of both
   stages.
Each stage resumes from its checkpoints if the demo is interrupted and run again.

    python -m lvr_jax.demo --seed 1 --workdir runs/demo_seed1      # another training seed
    python -m lvr_jax.demo --summarize runs/demo runs/demo_seed1 runs/demo_seed2

`--seed` changes the model's initialisation, the data order and the sampling; the synthetic
set (and so the test questions) is the same for every seed. `--summarize` prints the mean and
spread of several finished runs and draws their held-out curves in one plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from absl import logging as absl_logging

import numpy as np

from lvr_jax import trainer
from lvr_jax.config import demo_config
from lvr_jax.data import synthetic
from lvr_jax.data.schema import load_eval_records
from lvr_jax.eval import report, runner
from lvr_jax.metrics import read_metrics

# How often the SFT chains of thought make the simulated annotator's slips
# (synthetic_script.ANNOTATOR_SLIPS): 3 in 4, so that greedy SFT answers follow them
# (README, "What GRPO corrects in the demo").
ANNOTATOR_SLIP = 0.75


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="data, checkpoints, plots")
    parser.add_argument("--videos", type=int, default=3000, help="synthetic videos to generate")
    parser.add_argument("--drill_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--sft_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--grpo_steps", type=int, default=None, help="override the recipe")
    parser.add_argument("--annotator_slip", type=float, default=ANNOTATOR_SLIP,
                        help="how often the SFT chains of thought make the simulated "
                             "annotator's slips (synthetic_script.ANNOTATOR_SLIPS); GRPO "
                             "trains on the ground truth")
    parser.add_argument("--eval_limit", type=int, default=0, help="evaluate on the first N only")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed: initialisation, data order, sampling")
    parser.add_argument("--summarize", nargs="+", metavar="WORKDIR",
                        help="finished demo workdirs (one per seed): print mean and spread, "
                             "plot their held-out curves; trains nothing")
    return parser.parse_args(argv)


def evaluate_stage(config, workdir: str, out_dir: str, limit: int) -> dict:
    """Accuracy of a stage's exported model on the test questions (reasoning on)."""
    records = load_eval_records(config.eval.records)
    records = records[:limit] if limit else records
    [row] = runner.evaluate_checkpoint(config, workdir, [config.data.num_frames], [True], records,
                                       out_dir)
    return row


def heldout_curve(workdir: str) -> list[tuple[int, float]]:
    """(GRPO step, validation accuracy) of a demo run, step 0 being the SFT model."""
    rows = read_metrics(os.path.join(workdir, "grpo", "grpo_metrics.jsonl"))
    return sorted({r["step"]: r["val_accuracy"] for r in rows if "val_accuracy" in r}.items())


def summarize(workdirs: list[str], out_png: str) -> dict:
    """Mean and spread of the test accuracy after SFT, after GRPO and of the gain."""
    runs = {}
    for workdir in workdirs:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        sft, grpo = results["after SFT"]["accuracy"], results["after GRPO"]["accuracy"]
        runs[workdir] = {"after SFT": sft, "after GRPO": grpo, "gain": grpo - sft}
    print(f"{'run':<28} {'after SFT':>10} {'after GRPO':>11} {'gain':>7}")
    for workdir, r in runs.items():
        print(f"{workdir:<28} {r['after SFT']:>10.1%} {r['after GRPO']:>11.1%} {r['gain']:>+7.1%}")
    stats = {k: (float(np.mean([r[k] for r in runs.values()])),
                 float(np.std([r[k] for r in runs.values()])))
             for k in ("after SFT", "after GRPO", "gain")}
    print(f"{'mean ± std':<28} " + " ".join(f"{m:>8.1%} ±{s:.1%}" for m, s in stats.values()))
    report.plot_heldout_curves({w: heldout_curve(w) for w in workdirs}, out_png)
    print(f"held-out accuracy during GRPO: {out_png}")
    return {"runs": runs, "mean_std": stats}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, os.path.join(args.summarize[0], "seeds_heldout.png"))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, "test_eval.jsonl")):
        synthetic.generate(data, num_videos=args.videos, frames=64, size=96,
                           annotator_slip=args.annotator_slip)
    results, eval_dir = {}, os.path.join(args.workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    sft = demo_config("sft", data, args.sft_steps, args.seed)
    if args.drill_steps is not None:
        sft.drills.steps = args.drill_steps
    trainer.run(sft, os.path.join(args.workdir, "sft"))
    results["after SFT"] = evaluate_stage(sft, os.path.join(args.workdir, "sft"), eval_dir,
                                          args.eval_limit)
    grpo = demo_config("grpo", data, args.grpo_steps, args.seed)
    grpo.model.init = os.path.join(args.workdir, "sft", "model")
    trainer.run(grpo, os.path.join(args.workdir, "grpo"))
    results["after GRPO"] = evaluate_stage(grpo, os.path.join(args.workdir, "grpo"), eval_dir,
                                           args.eval_limit)
    report.write_comparison(eval_dir, list(results.values()))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report.plot_categories(results, os.path.join(args.workdir, "accuracy.png"))
    report.plot_heldout_curves({f"seed {args.seed}": heldout_curve(args.workdir)},
                               os.path.join(args.workdir, "heldout_during_grpo.png"))
    print(f"\n{'stage':<12} {'accuracy':>9} {'unparseable':>12}  per category")
    for stage, r in results.items():
        cats = ", ".join(f"{k} {v:.0%}" for k, v in r["per_category"].items())
        print(f"{stage:<12} {r['accuracy']:>9.1%} {r['unparseable']:>12}  {cats}")
    print(f"chance is 25%; plots: {args.workdir}/accuracy.png, {args.workdir}/*/…_curves.png")
    return results


if __name__ == "__main__":
    main()

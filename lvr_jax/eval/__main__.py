"""Evaluation entrypoint: multiple-choice accuracy per category, duration, frames and mode.

    python -m lvr_jax.eval --config=configs/demo.py:sft --checkpoint=runs/demo/sft/model \
        --num_frames=8,16 --think=on,off --scorer=official --out=runs/demo/eval

`--checkpoint` takes VILA directories or training workdirs (their `model/` export), several
separated by commas. Records come from `config.eval.records` (LongVideo-Reason-eval or
VideoMME-style JSONL; a `duration` field gives the short/medium/long buckets). Generation
uses `config.rl.rollout.backend`: the embedded sampler, or rollout servers at its `urls`.
`--scorer` (default `config.eval.scorer`, "math") chooses how answers are graded: "math", the
accuracy reward of training, or "official", the LongVideo-Reason-eval script's string equality
(the paper's numbers); every file and table written names it.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lvr_jax.cli import run_app
from lvr_jax.data.schema import load_eval_records
from lvr_jax.eval import report
from lvr_jax.eval.runner import evaluate_checkpoint, model_dir
from lvr_jax.eval.scoring import SCORERS, get_scorer

_CONFIG = config_flags.DEFINE_config_file("config", None, "a recipe in configs/, e.g. "
                                          "configs/demo.py:sft (its eval, data and rl.rollout)")
_CHECKPOINTS = flags.DEFINE_list("checkpoint", [], "VILA directories or training workdirs")
_FRAMES = flags.DEFINE_list("num_frames", [], "frame counts to compare (default: data.num_frames)")
_THINK = flags.DEFINE_list("think", ["on"], "reasoning modes: on (<think> then <answer>), off")
_OUT = flags.DEFINE_string("out", "runs/eval", "where the JSON, Markdown and PNG files go")
_LIMIT = flags.DEFINE_integer("limit", 0, "evaluate the first N records only (0: all)")
_SCORER = flags.DEFINE_enum("scorer", None, list(SCORERS),
                            "how answers are graded: official (the LongVideo-Reason-eval script: "
                            "<answer> span == truth) or math (the accuracy reward); default "
                            "config.eval.scorer (math)")


def parse_think(values: list[str]) -> list[bool]:
    modes = {"on": True, "think": True, "off": False, "direct": False}
    bad = [v for v in values if v not in modes]
    if bad:
        raise app.UsageError(f"--think takes on/off, got {bad}")
    return [modes[v] for v in values]


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    if config is None or not _CHECKPOINTS.value:
        raise app.UsageError("--config and --checkpoint are required")
    if not config.eval.records:
        raise app.UsageError("the config has no eval.records; set --config.eval.records=FILE")
    if _SCORER.value:
        config.eval.scorer = _SCORER.value
    get_scorer(config.eval.scorer)  # an unknown --config.eval.scorer stops here, exit 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    for checkpoint in _CHECKPOINTS.value:  # fail before any record or video is read
        model_dir(checkpoint)
    records = load_eval_records(config.eval.records)
    records = records[:_LIMIT.value] if _LIMIT.value else records
    frame_counts = [int(f) for f in _FRAMES.value] or [config.data.num_frames]
    os.makedirs(_OUT.value, exist_ok=True)
    rows = []
    for checkpoint in _CHECKPOINTS.value:
        rows += evaluate_checkpoint(config, checkpoint, frame_counts, parse_think(_THINK.value),
                                    records, _OUT.value)
    report.write_comparison(_OUT.value, rows)
    print(report.markdown_table(rows))
    print(f"per-question JSON, results.md and plots in {_OUT.value}")


if __name__ == "__main__":
    run_app(main)

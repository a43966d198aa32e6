"""Training entrypoint: CoT-SFT or GRPO, the stage `config.stage` names.

    python -m lvr_jax.train --config=configs/demo.py:sft --workdir=runs/demo/sft \
        --config.train.num_steps=200

The workdir holds checkpoints (an interrupted run resumes from the latest by itself),
metrics as JSONL and TensorBoard events, a PNG of the learning curves, and at the end the
model as a VILA directory (`workdir/model`) that a GRPO stage or transformers can load.
`--compile_only` compiles one step of the recipe from shapes and prints each phase's memory.
"""

from __future__ import annotations

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lvr_jax import memory_report, trainer
from lvr_jax.cli import run_app


def define_flags() -> None:
    """The entrypoint's flags, defined when it runs."""
    config_flags.DEFINE_config_file("config", None, "a recipe in configs/, e.g. "
                                    "configs/demo.py:sft", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, plots and the export")
    flags.DEFINE_bool("compile_only", False, "compile one step of the recipe on this "
                      "machine's devices from shapes alone and print its memory")


def main(argv) -> None:
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is not None and flags.FLAGS.compile_only:
        return memory_report.report(config)
    if config is None or workdir is None:
        raise app.UsageError("--config and --workdir are required")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    trainer.run(config, workdir)


if __name__ == "__main__":
    run_app(main, define_flags)

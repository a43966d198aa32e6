"""python -m lvr_jax.datagen --config=lvr_jax/datagen/config.py --config.videos_dir=... --config.out_dir=...

Generates LongVideo-Reason-style training records. Rerunning skips videos already done;
the summary is printed at the end. Exit status 1, with one line on stderr, when the run
stopped on an endpoint that is down, when none of the videos it tried finished, or when the
outputs hold no record; 2 for a bad setting.
"""

from __future__ import annotations

import os
import sys

from absl import app, logging
from ml_collections import config_flags

from lvr_jax.cli import CommandLineError, run_app
from lvr_jax.datagen import config as config_lib

__doc__ += "\n" + config_lib.__doc__  # --help shows every config field
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "config.py"),
    "pipeline config file (get_config()); override fields with --config.FIELD=VALUE")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD")
    from lvr_jax.datagen.pipeline import check_config, run
    from lvr_jax.datagen.summary import failure, format_summary

    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        check_config(config)
    except ValueError as error:  # one line and exit 2, not the whole --help and exit 1
        raise CommandLineError(str(error)) from None
    summary = run(config)
    print(format_summary(summary))
    print(f"outputs in {config.out_dir}: train.jsonl val.jsonl rejected.jsonl summary.json done/")
    if why := failure(summary):
        print(f"lvr_jax.datagen: error: {why}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    run_app(main)

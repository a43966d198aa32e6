"""Run by test_pipeline in a fresh process: restore an SFT iterator from a saved state, read on.

    python -m tests.data.resume_pipeline CONFIG_JSON STATE_JSON OUT_JSON
"""

from __future__ import annotations

import json
import sys

from lvr_jax.data.pipeline import DataConfig, sft_dataset
from lvr_jax.tokenizer import build_tiny_tokenizer


def resume(config_path: str, state_path: str, out_path: str) -> None:
    """Writes the records of every remaining batch and the epoch reports to `out_path`."""
    with open(config_path) as f:
        config = DataConfig(**json.load(f))
    reports = []
    iterator = iter(sft_dataset(config, build_tiny_tokenizer(), on_epoch_end=reports.append))
    with open(state_path) as f:
        iterator.set_state(json.load(f))
    batches = [batch["record"] for batch in iterator]
    iterator.close()
    with open(out_path, "w") as f:
        json.dump({"batches": batches, "reports": [[r.epoch, r.records, r.skipped]
                                                   for r in reports]}, f)


if __name__ == "__main__":
    resume(*sys.argv[1:4])

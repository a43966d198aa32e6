"""Reads every batch of a DataConfig (JSON file) and prints what was kept and the peak RSS.

    python -m tests.data.read_under_memory CONFIG_JSON

A separate process, so that its peak resident memory measures the pipeline alone.
"""

from __future__ import annotations

import json
import sys

from lvr_jax.data.pipeline import DataConfig, sft_dataset
from lvr_jax.tokenizer import build_tiny_tokenizer


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM; getrusage's would include the parent's
    peak from before exec)."""
    with open("/proc/self/status") as f:
        (line,) = [line for line in f if line.startswith("VmHWM:")]
    return int(line.split()[1]) / 1024


def main(config_path: str) -> None:
    with open(config_path) as f:
        config = DataConfig(**json.load(f))
    reports, kept, shapes = [], [], set()
    for batch in sft_dataset(config, build_tiny_tokenizer(), on_epoch_end=reports.append):
        kept.extend(batch["record"])
        shapes.add(tuple(batch["frames"].shape[1:]))
    peak_mb = peak_rss_mb()
    print(json.dumps({"kept": kept, "frame_shapes": sorted(shapes), "peak_rss_mb": peak_mb,
                      "skipped": [r.skipped for r in reports],
                      "messages": [list(r.messages) for r in reports]}))


if __name__ == "__main__":
    main(sys.argv[1])

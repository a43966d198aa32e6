"""Run metrics: JSONL and TensorBoard event files while training, a PNG of curves at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402

log = logging.getLogger(__name__)


def scalars(metrics: Mapping) -> dict[str, float]:
    """The numeric entries of a metrics dict as floats."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class MetricsWriter:
    """Appends one JSON line per step to `metrics.jsonl` and mirrors it to TensorBoard.

    A run resumed from step `resumed_step` first drops what a killed run logged after it
    (and TensorBoard purges those steps), so each step appears once; 0 starts afresh.
    """

    def __init__(self, workdir: str, stage: str, resumed_step: int = 0):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{stage}_metrics.jsonl")
        self.stage = stage
        self._drop_rows_after(resumed_step)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage),
                                purge_step=resumed_step + 1 if resumed_step else 0)

    def _drop_rows_after(self, resumed_step: int) -> None:
        """Keeps the rows up to `resumed_step`; the others (a run that went further than its
        last checkpoint, or one restarted from step 0) go to a file beside it, never lost."""
        if not os.path.exists(self.path):
            return
        rows = read_metrics(self.path)
        kept = [row for row in rows if resumed_step and row["step"] <= resumed_step]
        if len(kept) < len(rows):
            aside = self.path.replace(".jsonl", f".replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            shutil.copyfile(self.path, aside)
            log.warning("%d metric rows after step %d are replaced by this run; all rows as "
                        "they were are kept in %s", len(rows) - len(kept), resumed_step, aside)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, metrics: Mapping) -> None:
        values = scalars(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(f"{self.stage}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics JSONL; a last line cut by a killed run is left out."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_curves(path: str, keys: Sequence[str], out_png: str, title: str) -> str:
    """One panel per metric against step, four to a row; later rows of a resumed step replace
    earlier ones."""
    rows = {r["step"]: r for r in read_metrics(path)}
    steps = sorted(rows)
    keys = [k for k in keys if any(k in rows[s] for s in steps)]
    cols = min(max(len(keys), 1), 4)
    nrows = -(-max(len(keys), 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        points = [(s, rows[s][key]) for s in steps if key in rows[s] and math.isfinite(rows[s][key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


SUMMARY_KEYS = ("loss", "reward", "accuracy", "format", "kl", "response_length", "cache_hit_rate")


def short_summary(metrics: Mapping) -> dict[str, str]:
    """The few numbers a progress bar shows."""
    values = scalars(metrics)
    return {k: f"{values[k]:.3g}" for k in SUMMARY_KEYS if k in values}

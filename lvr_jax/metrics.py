"""Run metrics: JSONL and TensorBoard event files while training, a PNG of curves at the end."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


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
    """Appends one JSON line per step to `metrics.jsonl` and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, stage: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, f"{stage}_metrics.jsonl")
        self.stage = stage
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))

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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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

"""What an evaluation writes: JSON per setting, a Markdown table, bar charts, comparisons.

One *setting* is (checkpoint, number of frames, reasoning on/off). Each gets
`<label>.json` (summary and every prediction) and `<label>_categories.png`; all settings
together get `results.md`, `results.json` and, when frame counts differ,
`accuracy_vs_frames.png`. Every file and table names the scorer that graded the answers, and
how many questions were answered and skipped (accuracy is over those answered); the skipped
ones are listed with their reasons.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lvr_jax.data.schema import CATEGORIES  # noqa: E402
from lvr_jax.eval.evaluate import EvalResult  # noqa: E402
from lvr_jax.eval.scoring import SCORERS  # noqa: E402

DURATIONS = ("short", "medium", "long")
CHANCE = 0.25
LISTED_SKIPS = 20  # skipped questions named per setting in results.md; all are in <label>.json


def checkpoint_name(path: str) -> str:
    """Short name of a checkpoint path: `runs/demo/sft/model` -> `sft`, `ckpts/7b` -> `7b`."""
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]


@dataclasses.dataclass(frozen=True)
class Setting:
    checkpoint: str
    num_frames: int
    think: bool

    @property
    def name(self) -> str:
        return checkpoint_name(self.checkpoint)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.num_frames}f-{'think' if self.think else 'direct'}"


def summary(result: EvalResult) -> dict:
    """The scorer; overall, per-category and per-duration accuracy (over the questions
    answered); the unparseable count; questions asked, answered, skipped, and why skipped."""
    return {"scorer": result.scorer, "accuracy": result.accuracy,
            "questions": result.questions, "answered": result.answered,
            "skipped": len(result.skipped),
            "correct": sum(p["correct"] for p in result.predictions),
            "unparseable": result.unparseable, "per_category": result.per_category,
            "per_duration": result.per_duration, "skipped_records": result.skipped}


def counts(row: dict) -> str:
    """`answered 8 of 12, 4 skipped` for a summary row (one written before skips were
    counted has no `answered`: all its questions were)."""
    answered = row.get("answered", row["questions"])
    return f"answered {answered} of {row['questions']}, {row.get('skipped', 0)} skipped"


def write_setting(out_dir: str, setting: Setting, result: EvalResult) -> dict:
    """`<label>.json` and `<label>_categories.png`; returns the summary."""
    row = {**dataclasses.asdict(setting), **summary(result)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{setting.label}.json"), "w", encoding="utf-8") as f:
        json.dump({**row, "predictions": result.predictions}, f, indent=1, ensure_ascii=False)
    plot_categories({setting.label: row}, os.path.join(out_dir, f"{setting.label}_categories.png"),
                    f"{setting.label}, {counts(row)}")
    return row


def scorers_of(rows: Sequence[dict]) -> str:
    """The scorer names of `rows`, in order of appearance: what titles say graded them."""
    return ", ".join(dict.fromkeys(r["scorer"] for r in rows))


def table_title(rows: Sequence[dict]) -> str:
    """`Accuracy, scorer: official (LongVideo-Reason-eval: ...)`, each scorer of rows named."""
    names = scorers_of(rows).split(", ")
    return "Accuracy, scorer: " + "; ".join(f"{n} ({SCORERS[n].about})" for n in names)


def _columns(rows: Sequence[dict], field: str, order: Sequence[str]) -> list[str]:
    present = {k for r in rows for k in r[field]}
    return [k for k in order if k in present] + sorted(present - set(order))


def markdown_table(rows: Sequence[dict]) -> str:
    """A title naming the scorer, then one line per setting: scorer, overall, per category, per
    duration bucket, unparseable, questions answered of asked; then the skipped questions."""
    categories = _columns(rows, "per_category", CATEGORIES)
    durations = _columns(rows, "per_duration", DURATIONS)
    head = ["checkpoint", "frames", "reasoning", "scorer", "overall", *categories, *durations,
            "unparseable", "questions"]
    lines = [f"**{table_title(rows)}**", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    pct = lambda d, k: f"{d[k]:.1%}" if k in d else "-"  # noqa: E731
    for r in rows:
        cells = [r["checkpoint"], str(r["num_frames"]), "on" if r["think"] else "off",
                 r["scorer"],
                 f"**{r['accuracy']:.1%}**", *(pct(r["per_category"], c) for c in categories),
                 *(pct(r["per_duration"], d) for d in durations), str(r["unparseable"]),
                 counts(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + skipped_lines(rows)) + "\n"


def _label(row: dict) -> str:
    return Setting(row["checkpoint"], row["num_frames"], row["think"]).label


def skipped_lines(rows: Sequence[dict]) -> list[str]:
    """The skipped questions under the table, with their reasons; settings that skipped the
    same questions share one list. Nothing when every question was answered."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("skipped"):
            key = tuple((s["record"], s["message"]) for s in r["skipped_records"])
            groups.setdefault(key, []).append(r)
    if not groups:
        return []
    lines = ["", "**Skipped questions** (not graded: each setting's accuracy is over the "
                 "questions it answered):"]
    for same in groups.values():
        lines += _skipped_group(same)
    return lines


def _skipped_group(rows: Sequence[dict]) -> list[str]:
    first = rows[0]
    by_reason = collections.Counter(s["reason"] for s in first["skipped_records"])
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
    lines = [f"- {', '.join(map(_label, rows))}: {first['skipped']} of {first['questions']} "
             f"skipped ({reasons})"]
    for s in first["skipped_records"][:LISTED_SKIPS]:
        named = f"id {s['id']}: " if s["id"] is not None else ""
        lines.append(f"  - {named}{s['message']}")  # the message names the record's line
    if first["skipped"] > LISTED_SKIPS:
        lines.append(f"  - ... and {first['skipped'] - LISTED_SKIPS} more (all in "
                     f"{_label(first)}.json)")
    return lines


def plot_categories(rows: dict[str, dict], out_png: str, title: str = "") -> None:
    """Accuracy per category and overall, one group of bars per label, chance marked."""
    labels = list(rows)
    categories = list(rows[labels[0]]["per_category"]) + ["overall"]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, label in enumerate(labels):
        values = [rows[label]["per_category"].get(c, 0) for c in categories[:-1]]
        values.append(rows[label]["accuracy"])
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=label)
    ax.axhline(CHANCE, color="gray", linestyle="--", label="chance")
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(categories))], categories)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (scorer: {scorers_of(list(rows.values()))})".strip())
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_frames(rows: Sequence[dict], out_png: str) -> None:
    """Overall accuracy against the number of frames, one line per checkpoint and reasoning mode."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = sorted({(r["checkpoint"], r["think"]) for r in rows})
    for checkpoint, think in lines:
        points = sorted((r["num_frames"], r["accuracy"]) for r in rows
                        if (r["checkpoint"], r["think"]) == (checkpoint, think))
        label = f"{checkpoint_name(checkpoint)} ({'think' if think else 'direct'})"
        ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(CHANCE, color="gray", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("frames")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"scorer: {scorers_of(rows)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_comparison(out_dir: str, rows: Sequence[dict]) -> None:
    """`results.md` for all settings, and the frames plot when frame counts differ."""
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(rows))
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(list(rows), f, indent=1)
    if len({r["num_frames"] for r in rows}) > 1:
        plot_accuracy_vs_frames(rows, os.path.join(out_dir, "accuracy_vs_frames.png"))


def plot_heldout_curves(curves: dict[str, Sequence[tuple[int, float]]], out_png: str,
                        title: str = "held-out accuracy during GRPO") -> None:
    """Held-out accuracy against the training step, one line per run (seed), chance marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    ax.axhline(CHANCE, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

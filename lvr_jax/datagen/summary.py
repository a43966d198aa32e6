"""The final summary: videos, clips, questions kept per category and split, rejections by reason."""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

from lvr_jax.data.schema import CATEGORIES


def summarize(states: Iterable[Mapping[str, Any]], run: Mapping[str, Any]) -> dict[str, Any]:
    """Totals over all finished videos (state files) plus this run's video counts."""
    status, kept, rejected = collections.Counter(), collections.Counter(), collections.Counter()
    clips = retries = 0
    for state in states:
        status[state["status"]] += 1
        clips += len(state.get("clips", []))
        retries += state.get("reply_retries", 0)
        for record in state["records"]:
            kept[(state["split"], record["category"])] += 1
        rejected.update(r["reason"] for r in state["rejected"])
    return {
        "run": dict(run),
        "videos_by_status": dict(status),
        "clips_captioned": clips,
        "reply_retries": retries,
        "kept": {split: {c: kept[(split, c)] for c in CATEGORIES} for split in ("train", "val")},
        "rejected": dict(sorted(rejected.items())),
    }


def _rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    run = summary["run"]
    rows = [("videos found", run["found"]), ("  already done (skipped)", run["skipped"]),
            ("  finished this run", run["finished"]), ("  failed this run (retry later)",
                                                       run["failed"])]
    rows += [(f"  status {name}", n) for name, n in sorted(summary["videos_by_status"].items())]
    rows += [("clips captioned", summary["clips_captioned"]),
             ("malformed replies retried", summary["reply_retries"])]
    for category in CATEGORIES:
        train, val = summary["kept"]["train"][category], summary["kept"]["val"][category]
        rows.append((f"kept {category} (train / val)", f"{train} / {val}"))
    total = sum(sum(by_cat.values()) for by_cat in summary["kept"].values())
    rows.append(("kept in all", total))
    rows += [(f"rejected: {reason}", n) for reason, n in summary["rejected"].items()]
    return [(name, str(value)) for name, value in rows]


def format_summary(summary: Mapping[str, Any]) -> str:
    """A two-column text table of the summary."""
    rows = _rows(summary)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

"""The final summary: videos, clips, questions kept per category and split, rejections by
reason; and `failure`, why a run counts as failed (the entrypoint's non-zero exit)."""

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
    rows.append(("kept in all", _kept(summary)))
    rows += [(f"rejected: {reason}", n) for reason, n in summary["rejected"].items()]
    if run.get("stopped"):
        rows.append(("stopped early", run["stopped"]))
    return [(name, str(value)) for name, value in rows]


def _kept(summary: Mapping[str, Any]) -> int:
    return sum(sum(by_cat.values()) for by_cat in summary["kept"].values())


def failure(summary: Mapping[str, Any]) -> str | None:
    """Why the run failed, in one line, or None: it stopped on an endpoint that is down, no
    video it tried finished, no video was found, or the outputs hold no record at all."""
    run = summary["run"]
    pending = run["found"] - run["skipped"]
    if run.get("stopped"):
        left = pending - run["finished"]
        why = (f"stopped early, {left} of {pending} videos left for the next run: "
               f"{run['stopped']}")
    elif pending and not run["finished"]:
        first = next(iter(run["errors"].values()), "")
        why = (f"none of the {pending} videos finished ({run['failed']} failed; the first: "
               f"{first}); rerun to retry them")
    elif not run["found"]:
        why = "no video found under videos_dir (check videos_dir and videos_glob)"
    elif not _kept(summary):
        why = (f"no training record was kept: videos by status {summary['videos_by_status']}, "
               f"rejections {summary['rejected']}; see rejected.jsonl")
    else:
        return None
    return " ".join(why.split())


def format_summary(summary: Mapping[str, Any]) -> str:
    """A two-column text table of the summary."""
    rows = _rows(summary)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

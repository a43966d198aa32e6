"""What the pipeline writes: per-video state files, then train/val/rejected JSONL built from them.

`out/done/<video-id>.json` is written atomically when a video is finished, so it is the
unit of resumption; `train.jsonl`, `val.jsonl` and `rejected.jsonl` are rebuilt from all
state files at the end of every run (also atomically), so a crash never leaves half a file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable, Iterator

from lvr_jax.data.templates import format_question
from lvr_jax.datagen.parse import Question, Rejection

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg")
STATE_DIR = "done"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def video_id(relative_path: str) -> str:
    """A file-name-safe id of a video path relative to the video root ('a/b c.mp4' -> 'a__b_c.mp4')."""
    parts = relative_path.replace(os.sep, "/").split("/")
    return "__".join(_UNSAFE.sub("_", part) for part in parts)


def find_videos(videos_dir: str, pattern: str = "**/*") -> list[str]:
    """Video files under videos_dir matching `pattern`, relative to it, sorted; ids must differ."""
    if not os.path.isdir(videos_dir):
        raise FileNotFoundError(f"videos_dir {videos_dir!r} is not a directory")
    found = sorted(os.path.relpath(p, videos_dir)
                   for p in glob.glob(os.path.join(videos_dir, pattern), recursive=True)
                   if os.path.isfile(p) and p.lower().endswith(VIDEO_EXTENSIONS))
    by_id: dict[str, str] = {}
    for path in found:
        other = by_id.setdefault(video_id(path), path)
        if other != path:
            raise ValueError(f"videos {other!r} and {path!r} share the id {video_id(path)!r}; "
                             "rename one of them")
    return found


def split_of(relative_path: str, seed: int, val_fraction: float) -> str:
    """'val' for a seeded-hash share `val_fraction` of videos, else 'train'; stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{relative_path}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


def training_record(question: Question, video: str, problem_id: str) -> dict[str, Any]:
    """A kept question in the LongVideo-Reason training format (schema.load_train_records)."""
    return {"problem_id": problem_id,
            "problem": format_question(question.question, question.options),
            "answer": f"<think>{question.reasoning}</think><answer>{question.answer}</answer>",
            "videos": video, "category": question.category, "data_type": "video"}


def rejection_row(rejection: Rejection, video: str) -> dict[str, Any]:
    """A rejected item (or reply) as one line of rejected.jsonl."""
    return {"video": video, "reason": rejection.reason, "detail": rejection.detail,
            "item": rejection.item}


def state_path(out_dir: str, video: str) -> str:
    return os.path.join(out_dir, STATE_DIR, video_id(video) + ".json")


def write_atomic(path: str, text: str) -> None:
    """Writes a file through a temporary name and a rename: readers see all of it or none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_state(out_dir: str, state: dict[str, Any]) -> None:
    """Marks a video finished by writing its state file atomically."""
    write_atomic(state_path(out_dir, state["video"]), json.dumps(state, ensure_ascii=False, indent=1))


def is_done(out_dir: str, video: str) -> bool:
    return os.path.exists(state_path(out_dir, video))


def read_states(out_dir: str) -> Iterator[dict[str, Any]]:
    """Every finished video's state, in file-name order (a state file is never partial)."""
    for path in sorted(glob.glob(os.path.join(out_dir, STATE_DIR, "*.json"))):
        with open(path, encoding="utf-8") as f:
            yield json.load(f)


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_outputs(out_dir: str) -> dict[str, int]:
    """Rebuilds train.jsonl, val.jsonl and rejected.jsonl from the state files; returns line counts."""
    rows: dict[str, list] = {"train": [], "val": [], "rejected": []}
    for state in read_states(out_dir):
        rows[state["split"]].extend(state["records"])
        rows["rejected"].extend(state["rejected"])
    for name, lines in rows.items():
        write_atomic(os.path.join(out_dir, f"{name}.jsonl"), _jsonl(lines))
    return {name: len(lines) for name, lines in rows.items()}

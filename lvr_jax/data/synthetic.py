"""Synthetic long-video reasoning set: rendered videos, event scripts, four-category questions.

    python -m lvr_jax.data.synthetic --out DIR --num_videos 200 --frames 64 --size 96 --seed 0

writes DIR/videos/*.mp4, DIR/scripts/*.json (each video's event script, the ground truth),
DIR/{train,val,test}.jsonl in the LongVideo-Reason training format (answers are
`<think>...</think><answer>X</answer>`) and DIR/test_eval.jsonl in the evaluation format.
train.jsonl is also written in two parts, sft.jsonl (a third of its videos) and rl.jsonl
(the other two thirds): the paper trains SFT and RL on different questions.
Splits hold disjoint videos. Everything is a function of the seed.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from lvr_jax.data.synthetic_render import render, write_video
from lvr_jax.data.synthetic_script import annotated, make_questions, make_script
from lvr_jax.data.templates import format_question

SPLITS = ("train", "val", "test")
_PROBLEM_TYPES = {"Temporal": "temporal", "Goal & Purpose": "goal",
                  "Plot & Narrative": "plot", "Spatial": "spatial"}


def split_of_videos(num_videos: int, seed: int, held_out: float = 0.1) -> dict[str, list[int]]:
    """Disjoint train/val/test video indices; val and test get `held_out` each (at least 1)."""
    order = np.random.default_rng([seed, 1]).permutation(num_videos).tolist()
    n_held = max(1, int(round(held_out * num_videos))) if num_videos >= 3 else 0
    return {"val": sorted(order[:n_held]), "test": sorted(order[n_held:2 * n_held]),
            "train": sorted(order[2 * n_held:])}


def duration_bucket(seconds: float) -> str:
    """LongVideo-Reason-style bucket of a video's length."""
    return "short" if seconds < 60 else "medium" if seconds < 600 else "long"


def train_row(video_name: str, question: dict[str, Any], number: int) -> dict[str, Any]:
    """A question in the LongVideo-Reason training format."""
    answer = f"<think>{question['reasoning']}</think><answer>{question['answer']}</answer>"
    return {"problem_id": f"{video_name}-{number}",
            "problem": format_question(question["question"], question["options"]),
            "answer": answer, "videos": f"videos/{video_name}.mp4",
            "problem_type": _PROBLEM_TYPES[question["category"]], "data_type": "video"}


def eval_row(video_name: str, question: dict[str, Any], number: int, seconds: float) -> dict:
    """A question in the evaluation format (explicit options, answer letter, category)."""
    return {"id": f"{video_name}-{number}", "question": question["question"],
            "options": list(question["options"]), "answer": question["answer"],
            "category": question["category"], "duration": duration_bucket(seconds),
            "videos": f"videos/{video_name}.mp4"}


def make_video(out: str, index: int, frames: int, size: int, fps: int, seed: int) -> tuple:
    """Renders and writes one video and its script; returns (name, script, questions)."""
    rng = np.random.default_rng([seed, 0, index])
    script = make_script(rng, frames, fps)
    questions = make_questions(script, rng)
    name = f"synth_{index:05d}"
    write_video(os.path.join(out, "videos", f"{name}.mp4"), render(script["objects"], frames, size),
                fps)
    with open(os.path.join(out, "scripts", f"{name}.json"), "w") as f:
        json.dump({**script, "questions": questions}, f, indent=1)
    return name, script, questions


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out: str, num_videos: int, frames: int = 64, size: int = 96, fps: int = 8,
             seed: int = 0, progress: bool = True, annotator_slip: float = 0.0) -> dict[str, int]:
    """Writes the whole set under `out`; returns the number of questions per output file.

    `annotator_slip`: how often sft.jsonl's chains of thought make the annotator's slips
    (`synthetic_script.ANNOTATOR_SLIPS`) on the forms it confuses; every other file keeps
    the ground truth (train.jsonl too)."""
    if size % 2:
        raise ValueError(f"--size must be even (H.264 with 4:2:0 chroma), got {size}")
    os.makedirs(os.path.join(out, "scripts"), exist_ok=True)
    rows = {split: [] for split in (*SPLITS, "sft", "rl", "test_eval")}
    splits = split_of_videos(num_videos, seed)
    split_by_video = {i: s for s, ids in splits.items() for i in ids}
    sft_videos = set(splits["train"][::3])
    for index in tqdm(range(num_videos), desc="synthetic videos", disable=not progress):
        name, script, questions = make_video(out, index, frames, size, fps, seed)
        split = split_by_video[index]
        annotator = np.random.default_rng([seed, 2, index])
        for number, question in enumerate(questions):
            rows[split].append(train_row(name, question, number))
            if split == "train" and index in sft_videos:
                rows["sft"].append(train_row(name, annotated(question, script, annotator,
                                                             annotator_slip), number))
            elif split == "train":
                rows["rl"].append(rows["train"][-1])
            if split == "test":
                rows["test_eval"].append(eval_row(name, question, number, frames / fps))
    for split, split_rows in rows.items():
        _write_jsonl(os.path.join(out, f"{split}.jsonl"), split_rows)
    return {split: len(split_rows) for split, split_rows in rows.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lvr_jax.data.synthetic",
        description="Generate the synthetic long-video reasoning set (videos, scripts, "
                    "train/val/test JSONL in the LongVideo-Reason format).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_videos", type=int, default=200)
    parser.add_argument("--frames", type=int, default=64, help="frames per video (>= 16)")
    parser.add_argument("--size", type=int, default=96, help="frame side in pixels (even)")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--annotator_slip", type=float, default=0.0,
                        help="how often sft.jsonl's chains of thought make the annotator's "
                             "slips on the two forms it confuses (0: ground truth)")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.num_videos, args.frames, args.size, args.fps, args.seed,
                      annotator_slip=args.annotator_slip)
    print(f"wrote {args.num_videos} videos to {args.out}/videos; questions per file: {counts}")


if __name__ == "__main__":
    main()

"""Shared fixtures: real videos written with PyAV, broken files of every kind, record files."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest

from lvr_jax.data.synthetic import generate
from lvr_jax.data.synthetic_render import write_video
from lvr_jax.tokenizer import build_tiny_tokenizer

SIZE = 64  # written frame side; tests read at SIZE or resize


def ramp_frames(num_frames: int, size: int = SIZE) -> np.ndarray:
    """Frame i is a flat grey of level 4*i (+ a bright corner), so decoded indices are checkable."""
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = (4 * i) % 256
        frames[i, : size // 4, : size // 4] = 255
    return frames


def write_faststart_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """An mp4 with the index (moov) first, so that truncating it keeps a readable header."""
    with av.open(path, "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def truncate(src: str, dst: str, fraction: float) -> None:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> str:
    """Good videos (mp4, webm) and every kind of bad one, by name."""
    root = str(tmp_path_factory.mktemp("videos"))
    frames = ramp_frames(40)
    write_video(os.path.join(root, "good.mp4"), frames)
    write_video(os.path.join(root, "good2.mp4"), ramp_frames(24)[::-1].copy())
    write_video(os.path.join(root, "good.webm"), frames)
    write_video(os.path.join(root, "short.mp4"), ramp_frames(6))
    write_faststart_mp4(os.path.join(root, "faststart.mp4"), frames)
    truncate(os.path.join(root, "good.mp4"), os.path.join(root, "truncated.mp4"), 0.5)
    truncate(os.path.join(root, "faststart.mp4"), os.path.join(root, "truncated_index_first.mp4"),
             0.6)
    open(os.path.join(root, "empty.mp4"), "wb").close()
    with open(os.path.join(root, "not_a_video.mp4"), "w") as f:
        f.write("this is a text file, not a video\n" * 20)
    return root


BAD_VIDEOS = {  # file -> words its error message must hold
    "missing.mp4": "does not exist",
    "empty.mp4": "is empty (0 bytes)",
    "truncated.mp4": "cannot be decoded",
    "truncated_index_first.mp4": "cannot be decoded",
    "not_a_video.mp4": "cannot be decoded",
    "short.mp4": "has 6 frames, fewer than the 16 requested",
}


def train_row(video: str, letter: str = "B", problem: str = "Which object appeared first?") -> dict:
    return {"problem": f"{problem}\nA. red\nB. green\nC. blue\nD. yellow",
            "answer": f"<think>It is the green one.</think><answer>{letter}</answer>",
            "videos": video}


def write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
    """A small synthetic set: 12 videos of 32 frames, 64 px."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    generate(out, num_videos=12, frames=32, size=64, fps=8, seed=3, progress=False)
    return out

"""Draws the synthetic scripts as frames and writes videos with PyAV (mp4/H.264 or webm/VP8)."""

from __future__ import annotations

import os

import av
import numpy as np

COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "magenta": (220, 60, 220), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (25, 25, 25)
RADIUS = 0.15  # of the frame side: big shapes, so that small models see them


def shape_mask(shape: str, size: int, centre_xy: tuple[float, float]) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at `centre_xy` (fractions of the side)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = centre_xy[0] * size, centre_xy[1] * size, RADIUS * size
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xs - cx) <= 0.85 * r) & (np.abs(ys - cy) <= 0.85 * r)
    if shape == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        half_width = (ys - top) / (bottom - top) * r
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def position_at(keyframes: list[tuple[int, tuple[float, float]]], t: int) -> tuple[float, float]:
    """Piecewise-linear position between (frame, (x, y)) keyframes; held before/after them."""
    if t <= keyframes[0][0]:
        return keyframes[0][1]
    for (t0, p0), (t1, p1) in zip(keyframes, keyframes[1:]):
        if t <= t1:
            w = (t - t0) / max(t1 - t0, 1)
            return (p0[0] + w * (p1[0] - p0[0]), p0[1] + w * (p1[1] - p0[1]))
    return keyframes[-1][1]


def _is_moving(track: dict, t: int) -> bool:
    return any(t0 < t <= t1 for (t0, _), (t1, _) in zip(track["path"], track["path"][1:]))


def draw_frame(tracks: list[dict], t: int, size: int) -> np.ndarray:
    """One RGB frame [size, size, 3] uint8; objects that are moving are drawn on top."""
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    visible = [tr for tr in tracks if tr["appear"] <= t < tr["vanish"]]
    for track in sorted(visible, key=lambda tr: _is_moving(tr, t)):
        mask = shape_mask(track["shape"], size, position_at(track["path"], t))
        frame[mask] = COLOURS[track["colour"]]
    return frame


def render(tracks: list[dict], num_frames: int, size: int) -> np.ndarray:
    """All frames of a script: [num_frames, size, size, 3] uint8."""
    return np.stack([draw_frame(tracks, t, size) for t in range(num_frames)])


def write_video(path: str, frames_fhwc: np.ndarray, fps: int = 8) -> None:
    """Writes uint8 RGB frames as .mp4 (H.264) or .webm (VP8), by the file's extension.

    H.264 is lossless (qp 0): decoding gives back the frames exactly (in yuv420p), so the
    same script makes the same pixels on every run. x264's lossy modes are not reproducible
    from run to run: two generations of the 3000-video demo set differed in 37 videos, by up
    to 2 levels, and training on either drifts apart like two seeds (README, the demo)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    codec = "libvpx" if path.endswith(".webm") else "libx264"
    height, width = frames_fhwc.shape[1:3]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qp": "0"} if codec == "libx264" else {"crf": "10", "b": "1M"}
        for frame in frames_fhwc:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

"""Frames per second of reading 64 uniformly sampled frames: decord vs PyAV vs the frame cache.

    python benchmarks/bench_video_decode.py [--seconds 60 --fps 30 --width 640 --height 360]

Writes one H.264 video (moving gradients and a moving box) to a temporary directory, then times
each reader on it (median of --repeats runs) and prints a table. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from lvr_jax.data.frame_cache import FrameCache
from lvr_jax.data.synthetic_render import write_video
from lvr_jax.data.video import read_decord, read_frames, read_pyav


def moving_frames(num_frames: int, width: int, height: int) -> np.ndarray:
    """Cheap-to-encode content that changes every frame."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = (xs + 3 * t) % 256
        frames[t, ..., 1] = (ys + 2 * t) % 256
        frames[t, ..., 2] = 128
        x0 = (5 * t) % (width - 40)
        frames[t, 40:80, x0:x0 + 40] = 255
    return frames


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--frames", type=int, default=64, help="frames sampled per read")
    parser.add_argument("--size", type=int, default=448, help="output resolution")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    total = args.seconds * args.fps
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.mp4")
        write_video(path, moving_frames(total, args.width, args.height), args.fps)
        cache = FrameCache(os.path.join(tmp, "cache"))
        read_frames(path, args.frames, args.size, cache=cache)  # fill the cache
        readers = {
            "decord": lambda: read_decord(path, args.frames, args.size),
            "PyAV": lambda: read_pyav(path, args.frames, args.size),
            "frame cache": lambda: read_frames(path, args.frames, args.size, cache=cache),
        }
        seconds = {name: median_seconds(fn, args.repeats) for name, fn in readers.items()}
    print(f"video: {total} frames {args.width}x{args.height} H.264 at {args.fps} fps; "
          f"reading {args.frames} uniformly sampled frames resized to {args.size}x{args.size}")
    print(f"{'reader':<12} {'s / video':>10} {'frames / s':>11} {'vs decord':>10}")
    for name, s in seconds.items():
        print(f"{name:<12} {s:>10.3f} {args.frames / s:>11.1f} {seconds['decord'] / s:>9.2f}x")


if __name__ == "__main__":
    main()

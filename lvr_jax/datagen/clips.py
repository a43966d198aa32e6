"""Splitting a long video into fixed-length clips and sampling a few frames from each.

Clips are windows of `clip_seconds` (a short tail joins the clip before it); inside a
window, frames are taken at the centres of `frames_per_clip` equal parts. Nothing is
re-encoded: frames are decoded once, clip by clip (decord, or PyAV when decord is missing
or fails), so memory holds one chunk of clips at a time. Failures are `BadVideoError`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import av
import numpy as np

from lvr_jax.data.video import BadVideoError, check_file, resize_frames

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip of a video: its place in time and its sampled frames."""

    index: int
    start: float  # seconds
    end: float  # seconds
    frames: np.ndarray  # [F, S, S, 3] uint8


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """Frame count and rate of a video, and the reader that can decode it."""

    total_frames: int
    fps: float
    backend: str  # "decord" or "pyav"

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def clip_windows(duration: float, clip_seconds: float, min_clip_seconds: float = 0.0
                 ) -> list[tuple[float, float]]:
    """(start, end) seconds of consecutive clips; a tail under min_clip_seconds joins the last."""
    if clip_seconds <= 0:
        raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
    count = max(1, int(np.ceil(duration / clip_seconds - 1e-9)))
    bounds = [min(i * clip_seconds, duration) for i in range(count)] + [duration]
    if count > 1 and bounds[-1] - bounds[-2] < min_clip_seconds:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def window_indices(start: float, end: float, fps: float, total_frames: int,
                   frames_per_clip: int) -> np.ndarray:
    """Frame indices at the centres of `frames_per_clip` equal parts of [start, end)."""
    times = start + (np.arange(frames_per_clip) + 0.5) * (end - start) / frames_per_clip
    return np.clip(np.floor(times * fps), 0, total_frames - 1).astype(np.int64)


def _probe_decord(path: str) -> VideoInfo:
    import decord  # optional dependency

    reader = decord.VideoReader(path, num_threads=1)
    return VideoInfo(len(reader), float(reader.get_avg_fps()), "decord")


def _probe_pyav(path: str) -> VideoInfo:
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    return VideoInfo(total, fps, "pyav")


def probe(path: str) -> VideoInfo:
    """Frame count and rate; BadVideoError when no reader can open the file."""
    check_file(path)
    errors = []
    for reader in (_probe_decord, _probe_pyav):
        try:
            info = reader(path)
        except ImportError:
            continue
        except Exception as error:  # decord/FFmpeg errors, or no video stream (IndexError)
            errors.append(f"{reader.__name__[7:]}: {type(error).__name__}: {error}".strip())
            continue
        if info.total_frames > 0 and info.fps > 0:
            return info
        errors.append(f"{info.backend}: {info.total_frames} frames at {info.fps} fps")
    raise BadVideoError(path, "cannot be opened (" + "; ".join(errors) + ")")


def _decode_decord(path: str, groups: list[np.ndarray]) -> Iterator[np.ndarray]:
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    for indices in groups:
        yield reader.get_batch(indices.tolist()).asnumpy()


def _decode_pyav(path: str, groups: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Decodes in order once, yielding each group's frames as soon as they are all seen."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        current, number = None, -1
        for indices in groups:
            kept = []
            for wanted in indices:
                while number < wanted:
                    current, number = next(frames, None), number + 1
                    if current is None:
                        raise BadVideoError(path, f"ends after {number} decodable frames")
                kept.append(current.to_ndarray(format="rgb24"))
            yield np.stack(kept)


def iter_clips(path: str, info: VideoInfo, clip_seconds: float, frames_per_clip: int,
               size: int, min_clip_seconds: float = 0.0) -> Iterator[Clip]:
    """Yields every clip of the video in order, with `frames_per_clip` frames of size x size."""
    windows = clip_windows(info.duration, clip_seconds, min_clip_seconds)
    groups = [window_indices(s, e, info.fps, info.total_frames, frames_per_clip)
              for s, e in windows]
    decode = _decode_decord if info.backend == "decord" else _decode_pyav
    try:
        for number, ((start, end), frames) in enumerate(zip(windows, decode(path, groups))):
            yield Clip(number, round(start, 3), round(end, 3), resize_frames(frames, size))
    except BadVideoError:
        raise
    except Exception as error:
        raise BadVideoError(path, f"cannot be decoded by {info.backend} "
                                  f"({type(error).__name__}: {error})") from error

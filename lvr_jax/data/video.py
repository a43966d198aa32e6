"""Video decoding: uniformly sampled frames, resized square, as uint8; decord first, PyAV as fallback.

Frames leave this module as uint8 `[F, S, S, 3]` (small to pass between processes);
`model.siglip.normalize_frames` is the one place that turns them into the tower's input.
Every failure is a `BadVideoError` whose message names the file and says what is wrong.

Memory: a video larger than `max_pixels` per frame is refused before decoding, and one larger
than twice the tower's resolution is scaled by the decoder itself (to `2 * size`, then
bicubic to `size`), so no frame is held at native resolution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Callable

import av
import numpy as np
from PIL import Image

from lvr_jax.data.frame_cache import FrameCache

log = logging.getLogger(__name__)

BACKENDS = ("auto", "decord", "pyav")
_CHUNK = 16  # frames decoded at once, to bound memory
DEFAULT_MAX_PIXELS = 4096 * 2160  # per frame: DCI 4K; larger videos are refused


class BadVideoError(RuntimeError):
    """A video that cannot give the requested frames; the message names the file and the reason.

    `where` names the record (e.g. "line 17 of train.jsonl"), `action` what the pipeline does.
    """

    def __init__(self, path: str, reason: str, where: str = "", action: str = ""):
        message = f"video {path!r} {reason}" + (f" ({where})" if where else "")
        super().__init__(message + (f"; {action}" if action else ""))
        self.path, self.reason, self.where, self.action = path, reason, where, action

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.where, self.action)


@dataclasses.dataclass(frozen=True)
class VideoFrames:
    """Decoded frames of one video and where they came from."""

    frames: np.ndarray  # [F, S, S, 3] uint8
    indices: np.ndarray  # [F] int32, indices into the video's frames
    total_frames: int
    backend: str  # "decord", "pyav" or "cache"

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the sampled frames (key for the embedding cache)."""
        return frames_fingerprint(self.frames)


def sample_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """Uniform sampling of REFERENCE.md §3: `linspace(0, N-1, num_frames)` rounded down."""
    return np.floor(np.linspace(0, total_frames - 1, num_frames)).astype(np.int32)


def resize_frames(frames_fhwc: np.ndarray, size: int) -> np.ndarray:
    """Resizes frames to `size` x `size` (bicubic, as SigLIP's image processor) as uint8."""
    if frames_fhwc.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames_fhwc, dtype=np.uint8)
    resized = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC))
               for f in frames_fhwc]
    return np.stack(resized).astype(np.uint8)


def frames_fingerprint(frames: np.ndarray) -> str:
    """blake2b of the frames' shape and bytes: equal frames give equal keys, whatever the path."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def check_file(path: str) -> None:
    """Raises BadVideoError for a missing, unreadable or empty file before any decoder sees it."""
    if not os.path.exists(path):
        raise BadVideoError(path, "does not exist (check the record's path and the video root)")
    if not os.path.isfile(path):
        raise BadVideoError(path, "is not a file")
    if os.path.getsize(path) == 0:
        raise BadVideoError(path, "is empty (0 bytes)")


def probe_dimensions(path: str) -> tuple[int, int] | None:
    """(width, height) from the container header, or None when PyAV cannot read it."""
    try:
        with av.open(path) as container:
            context = container.streams.video[0].codec_context
            return int(context.width), int(context.height)
    except Exception:  # the decoders name what is wrong with the file
        return None


def check_pixels(path: str, dimensions: tuple[int, int] | None, max_pixels: int) -> None:
    """Raises BadVideoError for frames above the pixel budget (0: no budget)."""
    if max_pixels and dimensions and dimensions[0] * dimensions[1] > max_pixels:
        width, height = dimensions
        raise BadVideoError(path, f"is {width}x{height}, {width * height} pixels per frame, above "
                                  f"the budget of {max_pixels} (data.max_video_pixels)")


def decode_size(dimensions: tuple[int, int] | None, size: int) -> tuple[int, int] | None:
    """The (width, height) the decoder scales to: None (native) unless a side exceeds 2 * size."""
    if dimensions is None or max(dimensions) <= 2 * size:
        return None
    return 2 * size, 2 * size


def _check_count(path: str, total_frames: int, num_frames: int) -> None:
    if total_frames <= 0:
        raise BadVideoError(path, "has 0 decodable frames")
    if total_frames < num_frames:
        raise BadVideoError(
            path, f"has {total_frames} frames, fewer than the {num_frames} requested "
                  "(lower num_frames or drop the record)")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def read_decord(path: str, num_frames: int, size: int,
                scaled: tuple[int, int] | None = None) -> VideoFrames:
    """Reads uniformly sampled frames with decord (raises ImportError when it is missing).

    `scaled` (width, height): decord scales each frame while decoding.
    """
    import decord  # optional dependency: no wheels on some platforms

    width, height = scaled or (-1, -1)
    try:
        reader = decord.VideoReader(path, num_threads=1, width=width, height=height)
        total = len(reader)
        _check_count(path, total, num_frames)
        indices = sample_indices(total, num_frames)
        chunks = [resize_frames(reader.get_batch(indices[i:i + _CHUNK].tolist()).asnumpy(), size)
                  for i in range(0, num_frames, _CHUNK)]
    except BadVideoError:
        raise
    except Exception as error:  # decord raises RuntimeError or its own DECORDError
        raise BadVideoError(path, f"cannot be decoded by decord ({_first_line(error)})") from error
    return VideoFrames(np.concatenate(chunks), indices, total, "decord")


def _count_frames_pyav(path: str) -> int:
    """The container's frame count, or the number of video packets when it has none (webm)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_wanted_pyav(path: str, indices: np.ndarray, total: int,
                        scaled: tuple[int, int] | None) -> list[np.ndarray]:
    """Decodes frames in order and keeps those at `indices` (repeats allowed), scaled if asked."""
    width, height = scaled or (None, None)
    wanted = np.bincount(indices, minlength=total)
    kept, decoded = [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if decoded < total and wanted[decoded]:
                image = frame.to_ndarray(format="rgb24", width=width, height=height)
                kept.extend([image] * int(wanted[decoded]))
            decoded += 1
            if len(kept) == len(indices):
                break
    if len(kept) < len(indices):
        raise BadVideoError(path, f"ends after {decoded} decodable frames though it claims {total}"
                                  " (truncated?)")
    return kept


def read_pyav(path: str, num_frames: int, size: int,
              scaled: tuple[int, int] | None = None) -> VideoFrames:
    """Reads uniformly sampled frames with PyAV by decoding in order (slower, but robust)."""
    try:
        total = _count_frames_pyav(path)
        _check_count(path, total, num_frames)
        indices = sample_indices(total, num_frames)
        kept = _decode_wanted_pyav(path, indices, total, scaled)
    except BadVideoError:
        raise
    except IndexError as error:
        raise BadVideoError(path, "has no video stream") from error
    except Exception as error:  # av.error.FFmpegError and friends
        raise BadVideoError(path, f"cannot be decoded by PyAV ({_first_line(error)})") from error
    frames = np.concatenate([resize_frames(np.stack(kept[i:i + _CHUNK]), size)
                             for i in range(0, num_frames, _CHUNK)])
    return VideoFrames(frames, indices, total, "pyav")


def _decode_auto(path: str, num_frames: int, size: int,
                 scaled: tuple[int, int] | None = None) -> VideoFrames:
    """decord when installed and able; PyAV otherwise, with both reasons when both fail."""
    try:
        return read_decord(path, num_frames, size, scaled)
    except ImportError:
        return read_pyav(path, num_frames, size, scaled)
    except BadVideoError as decord_error:
        if "fewer than" in decord_error.reason:
            raise
        log.info("decord failed on %r (%s); trying PyAV", path, decord_error.reason)
        try:
            return read_pyav(path, num_frames, size, scaled)
        except BadVideoError as pyav_error:
            raise BadVideoError(path, f"{decord_error.reason}; PyAV: {pyav_error.reason}") from None


_READERS: dict[str, Callable[..., VideoFrames]] = {
    "auto": _decode_auto, "decord": read_decord, "pyav": read_pyav}


def read_frames(path: str, num_frames: int, size: int, backend: str = "auto",
                cache: FrameCache | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoFrames:
    """Uniformly sampled frames `[num_frames, size, size, 3]` uint8, through the cache when given.

    A video above `max_pixels` per frame (0: no budget) raises BadVideoError before decoding.
    """
    if backend not in _READERS:
        raise ValueError(f"video backend {backend!r} is not one of {BACKENDS}")
    check_file(path)
    key = cache.key(path, num_frames, size) if cache is not None else None
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            frames, indices, total = hit
            return VideoFrames(frames, indices, total, "cache")
    dimensions = probe_dimensions(path)
    check_pixels(path, dimensions, max_pixels)
    video = _READERS[backend](path, num_frames, size, decode_size(dimensions, size))
    if cache is not None:
        cache.put(key, video.frames, video.indices, video.total_frames)
    return video

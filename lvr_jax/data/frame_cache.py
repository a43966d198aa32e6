"""On-disk cache of decoded frames, so that a second epoch reads arrays instead of decoding.

An entry is keyed by the video's absolute path, size and mtime (a changed file misses) and by
the sampling (frame count, resolution, sampling rule), which fix the frame indices.
Entries are uncompressed `.npz` files written atomically, so worker processes can share a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile

import numpy as np

log = logging.getLogger(__name__)

SAMPLING_RULE = "linspace-floor-v1"  # bump when frame sampling changes: old entries then miss


class FrameCache:
    """uint8 frames on disk under `directory`, one file per (video file, sampling)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def key(self, path: str, num_frames: int, size: int) -> str:
        """Hex key from the file's identity (path, size, mtime) and the sampling."""
        stat = os.stat(path)
        identity = (f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|"
                    f"{num_frames}|{size}|{SAMPLING_RULE}")
        return hashlib.sha256(identity.encode()).hexdigest()

    def path_of(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], f"{key}.npz")

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(frames, indices, total_frames) or None on a miss; an unreadable entry is a miss."""
        path = self.path_of(key)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as entry:
                return entry["frames"], entry["indices"], int(entry["total_frames"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("frame cache entry %s is unreadable (%s); decoding again", path, error)
            return None

    def put(self, key: str, frames: np.ndarray, indices: np.ndarray, total_frames: int) -> None:
        """Writes an entry atomically (temporary file, then rename)."""
        path = self.path_of(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as f:
                np.savez(f, frames=frames, indices=indices, total_frames=np.int64(total_frames))
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise

    def __len__(self) -> int:
        return sum(name.endswith(".npz") for _, _, names in os.walk(self.directory) for name in names)

    def __repr__(self) -> str:
        return f"FrameCache({self.directory!r})"

"""MR-SP stage 1: each video is encoded once and its embeddings reused everywhere.

Entries are keyed by the video's content fingerprint, the sampled frame indices and a
fingerprint of the frozen encoder's weights (and of the video encoder's pooling, when it is
not the basic one), so a hit is valid for as long as those weights
stay frozen: every rollout of a group, the old-policy, reference and update forwards, later
steps, later epochs and, through the optional disk store, resumed runs. The in-memory part
is an LRU bounded in bytes, kept where the encoder left it (on the devices) or, with
`on_host`, in host memory, out of the accelerators' way (a hit then copies the entry back).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import jax
import numpy as np
from safetensors.numpy import load_file, save_file


def weights_fingerprint(params) -> str:
    """A short hash of every array in a pytree (the frozen vision weights)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def entry_key(video_key: str, frame_indices: Sequence[int], weights: str) -> str:
    """Cache key of one video's embeddings."""
    indices = np.asarray(frame_indices, np.int64).tobytes()
    return hashlib.sha256(f"{video_key}|{weights}|".encode() + indices).hexdigest()[:32]


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    disk_hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.disk_hits + self.misses
        return (self.hits + self.disk_hits) / lookups if lookups else 0.0


class EmbeddingCache:
    """Video embeddings by key: an LRU of `budget_bytes` in memory plus an optional disk store."""

    def __init__(self, budget_bytes: int = 4 << 30, disk_dir: str | None = None,
                 on_host: bool = False):
        self.budget_bytes, self.disk_dir, self.on_host = budget_bytes, disk_dir, on_host
        self.entries: collections.OrderedDict[str, jax.Array] = collections.OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()
        if disk_dir:
            os.makedirs(disk_dir, exist_ok=True)

    @classmethod
    def of(cls, cache_config, disk: bool = True) -> "EmbeddingCache":
        """The cache a recipe's `cache` section asks for (`disk`: with its disk store)."""
        return cls(cache_config.budget_mb << 20, (cache_config.disk_dir or None) if disk else None,
                   bool(cache_config.on_host))

    def get(self, key: str, compute: Callable[[], jax.Array]) -> jax.Array:
        """The cached value of `key`, computing (and storing) it on a miss."""
        if key in self.entries:
            self.stats.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self._read_disk(key)
        if value is not None:
            self.stats.disk_hits += 1
        else:
            self.stats.misses += 1
            value = compute()
            self._write_disk(key, value)
        self._remember(key, value)
        return value

    def _remember(self, key: str, value: jax.Array) -> None:
        if value.nbytes > self.budget_bytes:
            return
        if self.on_host:
            value = np.asarray(jax.device_get(value))
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.budget_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes

    def _path(self, key: str) -> str:
        return os.path.join(self.disk_dir, f"{key}.safetensors")

    def _read_disk(self, key: str):
        if not self.disk_dir or not os.path.exists(self._path(key)):
            return None
        return jax.numpy.asarray(load_file(self._path(key))["embeddings"])

    def _write_disk(self, key: str, value: jax.Array) -> None:
        if not self.disk_dir:
            return
        tmp = self._path(key) + ".tmp"
        save_file({"embeddings": np.asarray(jax.device_get(value))}, tmp)
        os.replace(tmp, self._path(key))  # a crash never leaves a half-written entry

    def manifest(self) -> dict:
        """What a checkpoint records: the disk store and the counters."""
        return {"disk_dir": self.disk_dir, **dataclasses.asdict(self.stats)}


class CachedVideoEncoder:
    """Encodes a batch's videos through a frozen encoder, each distinct video once ever.

    `encode` maps one video's frames, as decoded, to an embedding array (normalising them
    is its business: `video_embeddings.VideoEmbedder`); `frozen_params` are the weights it
    depends on and `tag` names anything else it depends on (both are part of every key).
    """

    def __init__(self, encode: Callable[[np.ndarray], jax.Array], frozen_params,
                 cache: EmbeddingCache, tag: str = ""):
        self.encode, self.cache = encode, cache
        self.fingerprint = weights_fingerprint(frozen_params) + (f"|{tag}" if tag else "")

    def __call__(self, frames_bfhwc: np.ndarray, video_keys: Sequence[str],
                 frame_indices: np.ndarray) -> jax.Array:
        """Frames of B videos -> stacked embeddings [B, ...]."""
        outputs = []
        for frames, video_key, indices in zip(frames_bfhwc, video_keys, frame_indices):
            key = entry_key(video_key, indices, self.fingerprint)
            outputs.append(self.cache.get(key, lambda f=frames: self.encode(f)))
        return jax.numpy.stack(outputs)

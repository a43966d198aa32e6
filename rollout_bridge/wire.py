"""What crosses the network: safetensors bodies, content keys, JSON error shapes.

Imported by both sides, so it needs only numpy and safetensors (no jax, no torch):
the server runs in vLLM's own environment.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from safetensors.numpy import save

EMBEDS_NAME = "embeds"  # the one tensor of an embeddings upload
PROTOCOL_VERSION = 1  # bumped when a route or a body changes incompatibly


def content_key(body: bytes) -> str:
    """sha256 of an upload body: equal embeddings get equal keys on every host, and the
    server checks the body it received against the key it is stored under."""
    return hashlib.sha256(body).hexdigest()


def embeds_body(array: np.ndarray) -> bytes:
    """An embeddings upload: one safetensors tensor named `embeds` [N, D]."""
    return save({EMBEDS_NAME: np.ascontiguousarray(array)})


def safetensors_header(body: bytes) -> dict:
    """The JSON header of a safetensors body (names, dtypes, shapes), without reading data."""
    if len(body) < 8:
        raise ValueError("body is shorter than a safetensors header")
    size = int.from_bytes(body[:8], "little")
    if size > len(body) - 8:
        raise ValueError(f"safetensors header claims {size} bytes; the body has {len(body) - 8}")
    header = json.loads(body[8:8 + size])
    header.pop("__metadata__", None)
    return header

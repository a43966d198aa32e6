"""What crosses the network: safetensors bodies, content keys, JSON error shapes.

Imported by both sides, so it needs only numpy and safetensors (no jax, no torch):
the server runs in vLLM's own environment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import urllib.parse

import numpy as np
from safetensors.numpy import save

EMBEDS_NAME = "embeds"  # the one tensor of an embeddings upload
PROTOCOL_VERSION = 2  # bumped when a route or a body changes incompatibly (2: slot lends)
# Weight chunks may name, in their safetensors __metadata__, tensors sent as the transpose
# of their Hugging Face layout (a JAX [in, out] kernel as is); the server reads them as `.T`.
TRANSPOSED_KEY = "transposed"
ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


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
    header = json.loads(bytes(body[8:8 + size]))
    header.pop("__metadata__", None)
    return header


def weight_chunk(tensors: list[tuple[str, np.ndarray, bool]]) -> list:
    """A safetensors body of (name, array, transposed) as [header, data views...], so that an
    upload sends the arrays' own memory; `b"".join(...)` is the same body as bytes."""
    header, offset, views = {}, 0, []
    for name, array, _ in tensors:
        array = np.ascontiguousarray(array)
        header[name] = {"dtype": ST_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        views.append(memoryview(array.reshape(-1).view(np.uint8)))
    transposed = [name for name, _, t in tensors if t]
    if transposed:
        header["__metadata__"] = {TRANSPOSED_KEY: json.dumps(transposed)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return [len(text).to_bytes(8, "little") + text, *views]


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine through loopback (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether a server URL is on this host by loopback, the only one whose slots we write."""
    return is_loopback(urllib.parse.urlsplit(url).hostname or "")

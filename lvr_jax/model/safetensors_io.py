"""Safetensors component folders: headers, tensor-at-a-time reads, sharded writes.

bfloat16 (every released VILA checkpoint) and float8 tensors are read through ml_dtypes,
since numpy has no such dtypes and safetensors' numpy reader refuses them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lvr_jax.model.vila_config import CheckpointError, read_json

# safetensors dtype names that numpy lacks -> the ml_dtypes type of the same bits.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2}


def canonical_name(component: str, name: str) -> str:
    """transformers 5 saves SigLIP without the `vision_model.` prefix that VILA files carry."""
    if component == "vision_tower" and not name.startswith("vision_model."):
        return "vision_model." + name
    return name


class SafetensorsDir:
    """Headers of the safetensors files of one component folder: name -> (file, shape).

    Names are as stored, except that a `vision_tower` gets the `vision_model.` prefix.
    """

    def __init__(self, directory: str, component: str = ""):
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        files = safetensors_files(directory, index_path)
        self.entries: dict[str, tuple[str, tuple]] = {}  # canonical name -> (file, shape)
        self.stored_names: dict[str, str] = {}  # canonical name -> name in the file
        self.dtypes: dict[str, str] = {}  # canonical name -> safetensors dtype ("BF16", ...)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path!r} lists {name!r}, which does not exist")
            with open_safetensors(path) as f:
                for key in f.keys():
                    canonical = canonical_name(component, key)
                    self.entries[canonical] = (path, tuple(f.get_slice(key).get_shape()))
                    self.stored_names[canonical] = key
                    self.dtypes[canonical] = f.get_slice(key).get_dtype()

    def read(self, name: str) -> np.ndarray:
        """One tensor, in its stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        path, stored = self.entries[name][0], self.stored_names[name]
        if self.dtypes[name] in _ML_DTYPES:
            return _read_raw(path, stored)
        # Opened per tensor so the mapping is released at once: file pages touched while
        # loading never accumulate in this process's resident memory.
        with open_safetensors(path) as f:
            return f.get_tensor(stored)


def _read_raw(path: str, name: str) -> np.ndarray:
    """A tensor of a dtype numpy lacks, read from the file's header offsets (the layout:
    8-byte little-endian header size, JSON header, then the data)."""
    with open(path, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(header_size))[name]
        begin, end = entry["data_offsets"]
        f.seek(8 + header_size + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, _ML_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def safetensors_files(directory: str, index_path: str) -> list[str]:
    """The weight files of a component folder: those its index lists, else every one there."""
    if not os.path.exists(index_path):
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    else:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"field 'weight_map' of {index_path!r} is missing or not an "
                                  "object mapping tensor names to files")
        files = sorted(set(weight_map.values()))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory!r}")
    return files


def open_safetensors(path: str):
    """`safe_open` of one file; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as error:
        raise CheckpointError(f"{path!r} is not a readable safetensors file ({error}); it is "
                              "probably truncated or corrupt: download or copy it again") from None


def _shards(tensors: Iterator[tuple[str, np.ndarray]], max_bytes: int):
    """Groups (name, tensor) pairs into dicts of at most max_bytes (a bigger tensor alone)."""
    shard, size = {}, 0
    for name, tensor in tensors:
        if shard and size + tensor.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name], size = tensor, size + tensor.nbytes
    if shard:
        yield shard


def write_component(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
                    max_bytes: int) -> None:
    """Writes model.safetensors, or numbered shards and their index, one shard in memory."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # stale shards of an earlier save would shadow these
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(directory, name))
    written = []
    for n, shard in enumerate(_shards(tensors, max_bytes)):
        tmp = os.path.join(directory, f".shard-{n:05d}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        written.append((tmp, {k: v.nbytes for k, v in shard.items()}))
    weight_map, total_size = {}, 0
    for n, (tmp, sizes) in enumerate(written):
        name = (f"model-{n + 1:05d}-of-{len(written):05d}.safetensors" if len(written) > 1
                else "model.safetensors")
        os.replace(tmp, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(sizes, name))
        total_size += sum(sizes.values())
    if len(written) > 1:
        write_json(os.path.join(directory, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)



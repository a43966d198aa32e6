"""NNX state -> Hugging Face tensors for a rollout server or a directory.

The name table is `lvr_jax.model.checkpoint.tensor_specs` (read through `iter_hf_tensors`);
this module only selects components, converts dtypes and groups tensors into safetensors
byte chunks small enough for one HTTP request each.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np
from safetensors.numpy import save, save_file

from lvr_jax.model import config as cfg_lib
from lvr_jax.model.checkpoint import COMPONENTS, iter_hf_tensors, iter_hf_views, save_pretrained
from lvr_jax.model.vlm import LongVILA
from lvr_jax.tokenizer import Tokenizer
from rollout_bridge import wire

LLM_ONLY = ("llm",)  # what a rollout server needs while the vision side is frozen
DTYPES = (None, "float32", "bfloat16")


def _check_dtype(dtype: Optional[str]) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {DTYPES}")


def iter_tensors(model: LongVILA, components: Sequence[str] = LLM_ONLY,
                 dtype: Optional[str] = None) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, tensor) one at a time; vision names carry their component prefix."""
    _check_dtype(dtype)
    for component, name, tensor in iter_hf_tensors(model, tuple(components), dtype):
        yield (name if component == "llm" else f"{component}.{name}"), tensor


def to_hf_state_dict(model: LongVILA, components: Sequence[str] = LLM_ONLY,
                     dtype: Optional[str] = None) -> dict[str, np.ndarray]:
    """The whole selection as a dict (fine for small models; stream big ones)."""
    return dict(iter_tensors(model, components, dtype))


def iter_chunks(model: LongVILA, chunk_bytes: int = 256 << 20,
                components: Sequence[str] = LLM_ONLY,
                dtype: Optional[str] = None) -> Iterator[bytes]:
    """safetensors bodies of at most `chunk_bytes` of tensor data (a bigger tensor alone)."""
    group, size = {}, 0
    for name, tensor in iter_tensors(model, components, dtype):
        if group and size + tensor.nbytes > chunk_bytes:
            yield save(group)
            group, size = {}, 0
        group[name], size = tensor, size + tensor.nbytes
    if group:
        yield save(group)


def iter_weight_chunks(model: LongVILA, chunk_bytes: int = 64 << 20,
                       components: Sequence[str] = LLM_ONLY,
                       dtype: Optional[str] = None) -> Iterator[list]:
    """What a push sends: chunks as in `iter_chunks`, each a list of buffers (header, then
    views of the parameters' own memory; kernels in their [in, out] layout, marked
    transposed), so f32 costs no copy and bf16 one conversion on the device."""
    _check_dtype(dtype)
    group, size = [], 0
    for component, name, tensor, transposed in iter_hf_views(model, tuple(components), dtype):
        if group and size + tensor.nbytes > chunk_bytes:
            yield wire.weight_chunk(group)
            group, size = [], 0
        name = name if component == "llm" else f"{component}.{name}"
        group.append((name, tensor, transposed))
        size += tensor.nbytes
    if group:
        yield wire.weight_chunk(group)


def save_llm_dir(model: LongVILA, path: str, tokenizer: Optional[Tokenizer] = None,
                 dtype: Optional[str] = None) -> None:
    """A Hugging Face Qwen2ForCausalLM directory (what a rollout server starts from)."""
    os.makedirs(path, exist_ok=True)
    save_file(to_hf_state_dict(model, LLM_ONLY, dtype), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    hf_config = cfg_lib.qwen2_to_hf(model.config.llm, dtype or "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)


def export_dir(model: LongVILA, path: str, tokenizer: Optional[Tokenizer] = None,
               dtype: Optional[str] = None, llm_only: bool = True) -> str:
    """Writes the LLM alone, or a full VILA directory (llm/, vision_tower/, mm_projector/)."""
    _check_dtype(dtype)
    if llm_only:
        save_llm_dir(model, path, tokenizer, dtype)
    else:
        save_pretrained(model, path, tokenizer=tokenizer, dtype=dtype)
    return path


__all__ = ["COMPONENTS", "LLM_ONLY", "iter_tensors", "to_hf_state_dict", "iter_chunks",
           "iter_weight_chunks",
           "save_llm_dir", "export_dir"]

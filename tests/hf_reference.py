"""Independent references built with transformers and torch, offline and tiny.

`write_vila_dir` lays out a VILA checkpoint the way the released one is: llm/ and
vision_tower/ written by transformers' save_pretrained, mm_projector/ as `layers.{i}`
tensors of a torch nn.Sequential written from the formula of REFERENCE.md §2.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from lvr_jax.tokenizer import Tokenizer


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random values in every parameter (biases and norms too), so no term hides at zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise * (4 if p.ndim < 2 else 1))


def qwen2(vocab_size=512, hidden=64, heads=4, kv_heads=2, layers=2, tied=False, theta=1e4,
          seed=0) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        rope_theta=theta, tie_word_embeddings=tied, max_position_embeddings=4096)
    model = transformers.Qwen2ForCausalLM(config).eval()
    randomize(model, seed)
    if tied:
        model.tie_weights()
    return model


def siglip(hidden=64, heads=2, layers=3, image_size=70, patch=14, seed=1,
           use_head=False, intermediate=None) -> transformers.SiglipVisionModel:
    """A tiny SigLIP tower; `use_head=None` leaves vision_use_head at transformers' default."""
    head = {} if use_head is None else {"vision_use_head": use_head}
    config = transformers.SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
        patch_size=patch, **head)
    model = transformers.SiglipVisionModel(config).eval()
    randomize(model, seed)
    return model


def downsample_reference(x_fnc: torch.Tensor, k: int) -> torch.Tensor:
    """The projector's block flattening written out from the formula, one block at a time."""
    f, n, c = x_fnc.shape
    g = math.isqrt(n)
    grid = x_fnc.reshape(f, g, g, c)
    padded = -(-g // k) * k
    grid = torch.nn.functional.pad(grid, (0, 0, 0, padded - g, 0, padded - g))
    blocks = []
    for i in range(padded // k):
        for j in range(padded // k):
            blocks.append(torch.cat([grid[:, k * i + a, k * j + b]
                                     for a in range(k) for b in range(k)], dim=-1))
    return torch.stack(blocks, dim=1)


class ProjectorReference(torch.nn.Module):
    """VILA's projector as an nn.Sequential whose parameter names are `layers.{i}.*`."""

    def __init__(self, projector_type: str, c: int, h: int):
        super().__init__()
        self.k = 2 if "2x2" in projector_type else 3
        gelu = torch.nn.GELU()  # exact erf GELU, as in VILA
        if self.k == 2:
            mods = [torch.nn.Identity(), torch.nn.LayerNorm(4 * c), torch.nn.Linear(4 * c, h),
                    gelu, torch.nn.Linear(h, h)]
        else:
            mods = [torch.nn.Identity(), torch.nn.LayerNorm(9 * c), torch.nn.Linear(9 * c, 3 * c),
                    gelu, torch.nn.LayerNorm(3 * c), torch.nn.Linear(3 * c, h), gelu,
                    torch.nn.Linear(h, h)]
        self.layers = torch.nn.Sequential(*mods)

    def forward(self, features_fnc):
        return self.layers(downsample_reference(features_fnc, self.k))


def write_vila_dir(path: str, llm, vision, projector: ProjectorReference, projector_type: str,
                   tokenizer: Tokenizer) -> None:
    """A VILA directory from reference modules, as the released checkpoints are laid out."""
    llm.save_pretrained(os.path.join(path, "llm"))
    tokenizer.save(os.path.join(path, "llm"))
    vision.save_pretrained(os.path.join(path, "vision_tower"))
    os.makedirs(os.path.join(path, "mm_projector"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()},
              os.path.join(path, "mm_projector", "model.safetensors"))
    with open(os.path.join(path, "mm_projector", "config.json"), "w") as f:
        json.dump({"model_type": "v2l_projector", "architectures": ["MultimodalProjector"],
                   "mm_projector_type": projector_type}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "vila", "architectures": ["VILAForCausalLM"],
                   "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
                   "hidden_size": llm.config.hidden_size,
                   "mm_hidden_size": vision.config.hidden_size}, f)


def rel_err(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def copy_vila_dir(make_vila_dir, tmp_path):
    """A copy of the reference VILA directory (tmp_path/ckpt) that a test may change."""
    path, _, _, _ = make_vila_dir()
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    return target

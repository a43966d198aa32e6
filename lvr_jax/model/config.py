"""Model shapes: SigLIP vision tower, projector and Qwen2 LLM, with named presets.

Field names follow the Hugging Face configs so `from_hf` / `to_hf` are plain renames.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PROJECTOR_TYPES = ("mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False
    select_layer: int = -2  # hidden_states index used as features (VILA: second-to-last)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_feature_layers(self) -> int:
        """Encoder layers that run to produce hidden_states[select_layer]."""
        return (self.num_hidden_layers + 1 + self.select_layer) % (self.num_hidden_layers + 1)


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LongVILAConfig:
    """The whole model; `dtype` is the compute dtype, parameters stay `param_dtype`."""

    vision: SiglipConfig = SiglipConfig()
    llm: Qwen2Config = Qwen2Config()
    projector_type: str = "mlp_downsample_2x2_fix"
    video_token_id: int = 151650
    newline_token_id: int = 198
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}")

    @property
    def downsample(self) -> int:
        return 2 if self.projector_type.endswith("2x2_fix") else 3

    @property
    def tokens_per_frame(self) -> int:
        """Projector tokens per frame plus the trailing "\\n" embedding."""
        side = -(-self.vision.grid // self.downsample)
        return side * side + 1

    def replace(self, **kw) -> "LongVILAConfig":
        return dataclasses.replace(self, **kw)


# ---- named presets ------------------------------------------------------------------------

def longvila_r1_7b(**kw) -> LongVILAConfig:
    """LongVILA-R1-7B: SigLIP so400m at 448 px, 2x2 downsample projector, Qwen2-7B."""
    return LongVILAConfig(**kw)


def tiny(vocab_size: int = 1024, **kw) -> LongVILAConfig:
    """A model of a few hundred thousand parameters for tests and the CPU demo."""
    vision = SiglipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=2, image_size=56, patch_size=14)
    llm = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                      bos_token_id=0, eos_token_id=2)
    return LongVILAConfig(vision=vision, llm=llm, **kw)


PRESETS = {"longvila_r1_7b": longvila_r1_7b, "tiny": tiny}


# ---- Hugging Face config dicts ------------------------------------------------------------

_QWEN2_FIELDS = [f.name for f in dataclasses.fields(Qwen2Config)]
_SIGLIP_FIELDS = [f.name for f in dataclasses.fields(SiglipConfig) if f.name != "select_layer"]


def qwen2_from_hf(d: dict[str, Any]) -> Qwen2Config:
    d = dict(d)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "rope_theta" not in d and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"llm rope_type {rope['rope_type']!r} is not supported (only 'default')")
    return Qwen2Config(**{k: d[k] for k in _QWEN2_FIELDS if k in d and d[k] is not None})


def qwen2_to_hf(c: Qwen2Config) -> dict[str, Any]:
    d = {k: getattr(c, k) for k in _QWEN2_FIELDS}
    d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
             attention_dropout=0.0, use_sliding_window=False, torch_dtype="float32")
    return d


def siglip_from_hf(d: dict[str, Any], select_layer: int = -2) -> SiglipConfig:
    d = d.get("vision_config", d)  # a full SiglipConfig nests the vision part
    fields = {k: d[k] for k in _SIGLIP_FIELDS if k in d and d[k] is not None}
    return SiglipConfig(select_layer=select_layer, **fields)


def siglip_to_hf(c: SiglipConfig) -> dict[str, Any]:
    d = {k: getattr(c, k) for k in _SIGLIP_FIELDS}
    d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
             attention_dropout=0.0, torch_dtype="float32")
    return d

"""Model shapes: SigLIP vision tower, projector and Qwen2 LLM, with named presets.

Field names follow the Hugging Face configs so `from_hf` / `to_hf` are plain renames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from lvr_jax.model import video_encoders
from lvr_jax.model.video_encoders import VideoEncoderConfig

PROJECTOR_TYPES = ("mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix")
# VILA's mm_vision_select_feature: "cls_patch" keeps every token, "patch" drops the first.
SELECT_FEATURES = ("cls_patch", "patch")


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
    vision_use_head: bool = False  # the pooling head: kept for round trips, never in features
    select_layer: int = -2  # hidden_states index used as features (VILA: second-to-last)
    select_feature: str = "cls_patch"  # one of SELECT_FEATURES

    def replace(self, **kw) -> "SiglipConfig":
        return dataclasses.replace(self, **kw)

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
    # With remat, the LLM's backward keeps the input of one layer in `remat_group` and
    # recomputes the others' from it (1: every layer's input kept; see layers.scan_layers)
    remat_group: int = 1
    video_encoder: VideoEncoderConfig = VideoEncoderConfig()
    # Frame sampling the checkpoint was trained with (top-level `num_video_frames`, `fps`);
    # read and written back, while the data config decides the frames of a run.
    num_video_frames: Optional[int] = None
    fps: Optional[float] = None

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type {self.projector_type!r} is not one of {PROJECTOR_TYPES}")
        video_encoders.check_grid(self.video_encoder, self.token_grid)

    @property
    def downsample(self) -> int:
        return 2 if self.projector_type.endswith("2x2_fix") else 3

    @property
    def token_grid(self) -> int:
        """Side of the square grid of projector tokens per frame."""
        return -(-self.vision.grid // self.downsample)

    def num_video_tokens(self, num_frames: int) -> int:
        """Embeddings a video of `num_frames` frames becomes: the one count all callers use."""
        return video_encoders.num_video_tokens(self.video_encoder, num_frames, self.token_grid,
                                               self.newline_token_id)

    @property
    def tokens_per_frame(self) -> int:
        """Embeddings per frame of the basic encoder (projector tokens, then "\\n")."""
        if self.video_encoder.kind != "basic":
            raise ValueError(f"tokens_per_frame is not defined for the {self.video_encoder.kind!r} "
                             "video encoder; use num_video_tokens(num_frames)")
        return self.num_video_tokens(1)

    def replace(self, **kw) -> "LongVILAConfig":
        return dataclasses.replace(self, **kw)


# ---- named presets ------------------------------------------------------------------------

def longvila_r1_7b(**kw) -> LongVILAConfig:
    """LongVILA-R1-7B: SigLIP so400m at 448 px, 2x2 downsample projector, Qwen2-7B."""
    return LongVILAConfig(**kw)


def longvila_3b(**kw) -> LongVILAConfig:
    """A 3B-class sibling: SigLIP so400m at 448 px, the 3x3 downsample projector (121 tokens
    per frame), Qwen2.5-3B (hidden 2048, 36 layers, 16 heads, 2 KV heads, tied embeddings)."""
    llm = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                      num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                      tie_word_embeddings=True)
    return LongVILAConfig(llm=llm, projector_type="mlp_downsample_3x3_fix", **kw)


def tiny(vocab_size: int = 1024, **kw) -> LongVILAConfig:
    """A model of a few hundred thousand parameters for tests and the CPU demo."""
    vision = SiglipConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=2, image_size=56, patch_size=14)
    llm = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                      bos_token_id=0, eos_token_id=2)
    return LongVILAConfig(vision=vision, llm=llm, **kw)


PRESETS = {"longvila_r1_7b": longvila_r1_7b, "longvila_3b": longvila_3b, "tiny": tiny}


# ---- Hugging Face config dicts ------------------------------------------------------------

_QWEN2_FIELDS = [f.name for f in dataclasses.fields(Qwen2Config)]
_SIGLIP_FIELDS = [f.name for f in dataclasses.fields(SiglipConfig)
                  if f.name not in ("select_layer", "select_feature")]
# Fields that decide parameter shapes: a config.json must state each as a positive integer,
# since a default (the 7B model's) would only fail later, as a tensor of the wrong shape.
QWEN2_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads")
SIGLIP_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "image_size", "patch_size")
_JSON_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
               "bool": ((bool,), "true or false"), "str": ((str,), "a string")}


class HFConfigError(ValueError):
    """A Hugging Face config dict that cannot describe the model; names the field and source."""


def _checked_value(field: dataclasses.Field, value: Any, source: str) -> Any:
    """`value` if it has the JSON type of the field's annotation; token ids are not read."""
    if field.name.endswith("_token_id") or field.type not in _JSON_TYPES:
        return value
    kinds, expected = _JSON_TYPES[field.type]
    if not isinstance(value, kinds) or (isinstance(value, bool) and field.type != "bool"):
        raise HFConfigError(f"field {field.name!r} of {source} is {value!r} "
                            f"({type(value).__name__}); it must be {expected}")
    return value


def _hf_fields(cls, d: dict[str, Any], names: list[str], shape_fields: tuple[str, ...],
               source: str) -> dict[str, Any]:
    """The fields of `cls` among `names` that `d` sets, type-checked; shape fields required."""
    values = {f.name: _checked_value(f, d[f.name], source) for f in dataclasses.fields(cls)
              if f.name in names and d.get(f.name) is not None}
    for name in shape_fields:
        if name not in values:
            raise HFConfigError(f"field {name!r} of {source} is missing; it decides parameter "
                                "shapes, so there is no default")
        if values[name] <= 0:
            raise HFConfigError(f"field {name!r} of {source} is {values[name]}; it must be "
                                "positive")
    return values


def qwen2_from_hf(d: dict[str, Any], source: str = "the llm config") -> Qwen2Config:
    """Qwen2Config from a Hugging Face Qwen2 config dict; `source` names it in errors."""
    d = dict(d)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "rope_theta" not in d and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") not in ("default", None):
        raise HFConfigError(f"rope_type {rope['rope_type']!r} of {source} is not supported "
                            "(only 'default')")
    return Qwen2Config(**_hf_fields(Qwen2Config, d, _QWEN2_FIELDS, QWEN2_SHAPE_FIELDS, source))


def qwen2_to_hf(c: Qwen2Config, dtype: str = "float32") -> dict[str, Any]:
    d = {k: getattr(c, k) for k in _QWEN2_FIELDS}
    d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
             attention_dropout=0.0, use_sliding_window=False, **_dtype_fields(dtype))
    return d


def siglip_from_hf(d: dict[str, Any], select_layer: int = -2,
                   source: str = "the vision config") -> SiglipConfig:
    """SiglipConfig from a Hugging Face SigLIP (vision) config dict; `source` names it in errors."""
    d = dict(d.get("vision_config", d))  # a full SiglipConfig nests the vision part
    # transformers reads an absent key as true: older VILA towers carry the head without it.
    d.setdefault("vision_use_head", True)
    fields = _hf_fields(SiglipConfig, d, _SIGLIP_FIELDS, SIGLIP_SHAPE_FIELDS, source)
    return SiglipConfig(select_layer=select_layer, **fields)


def siglip_to_hf(c: SiglipConfig, dtype: str = "float32") -> dict[str, Any]:
    d = {k: getattr(c, k) for k in _SIGLIP_FIELDS}
    d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
             attention_dropout=0.0, **_dtype_fields(dtype))
    return d


def _dtype_fields(dtype: str) -> dict[str, str]:
    """The stored dtype as transformers 5 (`dtype`) and earlier (`torch_dtype`) read it."""
    return {"dtype": dtype, "torch_dtype": dtype}

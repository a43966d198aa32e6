"""VILA-format checkpoints <-> LongVILA (NNX), streamed tensor by tensor.

A VILA directory holds `config.json`, `llm/` (Qwen2ForCausalLM), `vision_tower/`
(SiglipVisionModel) and `mm_projector/`, each with single or sharded safetensors.
`tensor_specs` is the one table that maps every Hugging Face tensor to its NNX parameter;
loading, saving and export (rollout_bridge) all read it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax.model import config as cfg_lib
from lvr_jax.model.config import LongVILAConfig
from lvr_jax.model.layers import logical_axes
from lvr_jax.model.projector import layer_names
from lvr_jax.model.safetensors_io import SafetensorsDir, write_component, write_json
from lvr_jax.model.video_encoders import to_vila
from lvr_jax.model.vila_config import BASIC_ENCODERS, CheckpointError, read_config, read_json
from lvr_jax.model.vlm import LongVILA
from lvr_jax.tokenizer import Tokenizer

__all__ = ["CheckpointError", "check_checkpoint", "load_pretrained", "read_config",
           "save_pretrained", "tensor_specs", "iter_hf_tensors", "iter_hf_views"]

COMPONENTS = ("llm", "vision_tower", "mm_projector")
# (path, logical axes) -> sharding of that parameter; None places on the default device.
ShardingFn = Callable[[tuple, tuple], jax.sharding.Sharding]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor (per layer for stacked parameters) and its NNX parameter."""

    component: str
    hf_name: str  # holds "{i}" for per-layer tensors
    path: tuple  # path of the nnx.Param in the LongVILA module tree
    kind: str  # "copy" | "linear" (HF [out, in]) | "conv" (HF [D, C, p, p])
    hf_shape: tuple
    num_layers: Optional[int] = None  # stacked: parameter has a leading layer axis

    def hf_names(self) -> list[str]:
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]

    def to_nnx(self, hf: np.ndarray, shape: tuple) -> np.ndarray:
        if self.kind == "linear":
            hf = hf.T
        elif self.kind == "conv":
            hf = hf.transpose(2, 3, 1, 0)
        return hf.reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return np.ascontiguousarray(value.reshape(self.hf_shape[::-1]).T)
        if self.kind == "conv":
            d, c, p, _ = self.hf_shape
            return np.ascontiguousarray(value.reshape(p, p, c, d).transpose(3, 2, 0, 1))
        return value.reshape(self.hf_shape)


def _llm_specs(c: cfg_lib.Qwen2Config) -> list[TensorSpec]:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    n = c.num_hidden_layers
    layer = lambda name, path, kind, shape: TensorSpec(  # noqa: E731
        "llm", f"model.layers.{{i}}.{name}", ("llm", "layers", *path), kind, shape, n)
    specs = [TensorSpec("llm", "model.embed_tokens.weight", ("llm", "embed_tokens"), "copy", (v, d))]
    for proj, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        specs += [layer(f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), "linear", (width, d)),
                  layer(f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), "copy", (width,))]
    specs += [
        layer("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "linear", (d, q)),
        layer("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear", (f, d)),
        layer("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear", (f, d)),
        layer("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear", (d, f)),
        layer("input_layernorm.weight", ("input_layernorm", "scale"), "copy", (d,)),
        layer("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "copy", (d,)),
        TensorSpec("llm", "model.norm.weight", ("llm", "norm", "scale"), "copy", (d,)),
    ]
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("llm", "lm_head.weight", ("llm", "lm_head"), "linear", (v, d)))
    return specs


def _vision_specs(c: cfg_lib.SiglipConfig) -> list[TensorSpec]:
    d, f, p = c.hidden_size, c.intermediate_size, c.patch_size
    pre = "vision_model."
    layer = lambda name, path, kind, shape: TensorSpec(  # noqa: E731
        "vision_tower", f"{pre}encoder.layers.{{i}}.{name}", ("vision_tower", "layers", *path),
        kind, shape, c.num_hidden_layers)
    vt = lambda name, path, kind, shape: TensorSpec("vision_tower", pre + name,  # noqa: E731
                                                    ("vision_tower", *path), kind, shape)
    specs = [
        vt("embeddings.patch_embedding.weight", ("patch_embedding", "kernel"), "conv",
           (d, c.num_channels, p, p)),
        vt("embeddings.patch_embedding.bias", ("patch_embedding", "bias"), "copy", (d,)),
        vt("embeddings.position_embedding.weight", ("position_embedding",), "copy",
           (c.num_patches, d)),
        vt("post_layernorm.weight", ("post_layernorm", "scale"), "copy", (d,)),
        vt("post_layernorm.bias", ("post_layernorm", "bias"), "copy", (d,)),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        specs += [layer(f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), "linear", (d, d)),
                  layer(f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), "copy", (d,))]
    for ln in ("layer_norm1", "layer_norm2"):
        specs += [layer(f"{ln}.weight", (ln, "scale"), "copy", (d,)),
                  layer(f"{ln}.bias", (ln, "bias"), "copy", (d,))]
    for fc, shape in (("fc1", (f, d)), ("fc2", (d, f))):
        specs += [layer(f"mlp.{fc}.weight", ("mlp", fc, "kernel"), "linear", shape),
                  layer(f"mlp.{fc}.bias", ("mlp", fc, "bias"), "copy", shape[:1])]
    return specs + (_pooling_head_specs(c) if c.vision_use_head else [])


def _pooling_head_specs(c: cfg_lib.SiglipConfig) -> list[TensorSpec]:
    """The 11 `vision_model.head.*` tensors of a tower saved with `vision_use_head`."""
    d, f = c.hidden_size, c.intermediate_size
    head = lambda name, path, kind, shape: TensorSpec(  # noqa: E731
        "vision_tower", f"vision_model.head.{name}", ("vision_tower", "head", *path), kind, shape)
    return [
        head("probe", ("probe",), "copy", (1, 1, d)),
        head("attention.in_proj_weight", ("in_proj", "kernel"), "linear", (3 * d, d)),
        head("attention.in_proj_bias", ("in_proj", "bias"), "copy", (3 * d,)),
        head("attention.out_proj.weight", ("out_proj", "kernel"), "linear", (d, d)),
        head("attention.out_proj.bias", ("out_proj", "bias"), "copy", (d,)),
        head("layernorm.weight", ("layernorm", "scale"), "copy", (d,)),
        head("layernorm.bias", ("layernorm", "bias"), "copy", (d,)),
        head("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear", (f, d)),
        head("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy", (f,)),
        head("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear", (d, f)),
        head("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy", (d,)),
    ]


def _projector_specs(config: LongVILAConfig) -> list[TensorSpec]:
    c, h = config.vision.hidden_size, config.llm.hidden_size
    k2 = config.downsample**2
    widths = {"mlp_downsample_2x2_fix": {1: 4 * c, 2: (h, 4 * c), 4: (h, h)},
              "mlp_downsample_3x3_fix": {1: 9 * c, 2: (3 * c, 9 * c), 4: 3 * c, 5: (h, 3 * c),
                                         7: (h, h)}}[config.projector_type]
    assert widths[1] == k2 * c
    specs = []
    for index, kind in layer_names(config.projector_type):
        path = ("mm_projector", f"layer{index}")
        if kind == "ln":
            specs += [TensorSpec("mm_projector", f"layers.{index}.weight", (*path, "scale"), "copy",
                                 (widths[index],)),
                      TensorSpec("mm_projector", f"layers.{index}.bias", (*path, "bias"), "copy",
                                 (widths[index],))]
        else:
            specs += [TensorSpec("mm_projector", f"layers.{index}.weight", (*path, "kernel"),
                                 "linear", widths[index]),
                      TensorSpec("mm_projector", f"layers.{index}.bias", (*path, "bias"), "copy",
                                 widths[index][:1])]
    return specs


def tensor_specs(config: LongVILAConfig, components=COMPONENTS) -> list[TensorSpec]:
    """Every checkpoint tensor of the model, in a fixed order."""
    table = {"llm": lambda: _llm_specs(config.llm),
             "vision_tower": lambda: _vision_specs(config.vision),
             "mm_projector": lambda: _projector_specs(config)}
    return [s for comp in components for s in table[comp]()]


# ---- reading --------------------------------------------------------------------------------

def _check(specs: list[TensorSpec], dirs: dict[str, SafetensorsDir]) -> None:
    """Missing, unexpected and mis-shaped tensors, each named with its file."""
    problems = []
    for comp, d in dirs.items():
        expected = {n: s for s in specs if s.component == comp for n in s.hf_names()}
        for name, spec in expected.items():
            if name not in d.entries:
                problems.append(f"missing tensor {name!r} in {d.directory!r}")
            elif d.entries[name][1] != spec.hf_shape:
                problems.append(f"tensor {name!r} in {d.entries[name][0]!r} has shape "
                                f"{d.entries[name][1]}, the config needs {spec.hf_shape}")
        problems += [f"unexpected tensor {name!r} in {path!r}"
                     for name, (path, _) in d.entries.items() if name not in expected]
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  "
                              + "\n  ".join(problems + _pooling_head_hint(specs, problems)))


def _pooling_head_hint(specs: list[TensorSpec], problems: list[str]) -> list[str]:
    """Why head tensors are missing or unexpected: the tower config's `vision_use_head`."""
    if not any("'vision_model.head." in p for p in problems):
        return []
    has_head = any(".head." in s.hf_name for s in specs)
    return [f"(vision_tower/config.json has vision_use_head {str(has_head).lower()}"
            + (" or lacks the key, which transformers reads as true" if has_head else "")
            + "; it must say whether the tower has its 11 vision_model.head.* tensors)"]


def _params_by_path(model: nnx.Module) -> dict[tuple, nnx.Param]:
    return {tuple(str(p) for p in path): v for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)}


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, 0)


def _place(spec: TensorSpec, var: nnx.Param, d: SafetensorsDir, sharding) -> jax.Array:
    """Reads one parameter's tensors and puts them on their devices, a layer at a time.

    A stacked parameter is allocated in place and filled layer by layer (the old buffer is
    donated), so host memory never holds more than one layer's tensor beside the model.
    """
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if spec.num_layers is None:
        return jax.device_put(spec.to_nnx(d.read(spec.hf_name), shape).astype(dtype), sharding)
    stacked = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    for i, name in enumerate(spec.hf_names()):
        stacked = _set_layer(stacked, spec.to_nnx(d.read(name), shape[1:]), i)
    return stacked


def _component_dirs(path: str) -> dict[str, SafetensorsDir]:
    return {comp: SafetensorsDir(os.path.join(path, comp), comp) for comp in COMPONENTS}


def check_checkpoint(path: str) -> LongVILAConfig:
    """The config of a VILA directory whose tensors all match it by name and shape; reads
    configs and safetensors headers only (a CheckpointError names what does not fit)."""
    config = read_config(path)
    _check(tensor_specs(config), _component_dirs(path))
    return config


def load_pretrained(path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                    sharding_fn: Optional[ShardingFn] = None, **overrides) -> LongVILA:
    """Reads a VILA directory into a LongVILA, placing each tensor as it is read.

    `dtype` is the compute dtype, `param_dtype` the stored one (default f32);
    `sharding_fn(path, logical_axes)` gives each parameter's sharding on a mesh.
    """
    config = read_config(path)
    config = config.replace(**{k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype,
                                                      **overrides).items() if v is not None})
    model = nnx.eval_shape(lambda: LongVILA(config, rngs=nnx.Rngs(0)))
    specs = tensor_specs(config)
    dirs = _component_dirs(path)
    _check(specs, dirs)
    params = _params_by_path(model)
    for spec in specs:
        var = params[spec.path]
        sharding = (sharding_fn(spec.path, logical_axes(var)) if sharding_fn
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        var.set_value(_place(spec, var, dirs[spec.component], sharding))
    return model


# ---- writing --------------------------------------------------------------------------------

def iter_hf_tensors(model: LongVILA, components=COMPONENTS,
                    dtype: Optional[str] = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(component, Hugging Face name, tensor) for every tensor, one at a time."""
    params = _params_by_path(model)
    for spec in tensor_specs(model.config, components):
        value = np.asarray(jax.device_get(params[spec.path].get_value()))
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        if spec.num_layers is None:
            yield spec.component, spec.hf_name, spec.to_hf(value)
        else:
            for i, name in enumerate(spec.hf_names()):
                yield spec.component, name, spec.to_hf(value[i])


def iter_hf_views(model: LongVILA, components=COMPONENTS, dtype: Optional[str] = None
                  ) -> Iterator[tuple[str, str, np.ndarray, bool]]:
    """(component, HF name, tensor, transposed) without copying f32 parameters: a "linear"
    kernel comes as its [in, out] NNX layout (transposed=True; the HF tensor is its `.T`),
    so the reader can fuse the transpose into a copy it makes anyway. A dtype conversion
    runs on an accelerator before the transfer (fewer bytes), on the host per layer (numpy's
    cast is faster than XLA's on CPU, and each layer is converted only when it is sent)."""
    params, target = _params_by_path(model), jnp.dtype(dtype or "float32")
    for spec in tensor_specs(model.config, components):
        value = params[spec.path].get_value()
        if dtype is not None and value.dtype != target and _on_accelerator(value):
            value = value.astype(target)
        value = np.asarray(jax.device_get(value))
        layers = [value] if spec.num_layers is None else list(value)
        if dtype is not None and value.dtype != target:
            layers = (layer.astype(target) for layer in layers)
        for name, layer in zip(spec.hf_names(), layers):
            if spec.kind == "linear":
                yield spec.component, name, layer.reshape(spec.hf_shape[::-1]), True
            else:
                yield spec.component, name, spec.to_hf(layer), False


def _on_accelerator(value: jax.Array) -> bool:
    return any(d.platform != "cpu" for d in value.devices())


def save_pretrained(model: LongVILA, path: str, *, tokenizer: Optional[Tokenizer] = None,
                    dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes a VILA directory that load_pretrained and transformers (llm/, vision_tower/) read.

    Tensors are stored in `dtype` (default: the parameters' dtype) and the configs say so.
    """
    c = model.config
    for comp in COMPONENTS:
        tensors = ((name, t) for _, name, t in iter_hf_tensors(model, (comp,), dtype))
        write_component(os.path.join(path, comp), tensors, max_shard_bytes)
    stored = jnp.dtype(dtype or c.param_dtype).name
    write_configs(path, c, cfg_lib.qwen2_to_hf(c.llm, stored),
                  cfg_lib.siglip_to_hf(c.vision, stored))
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "llm"))


def write_configs(path: str, c: LongVILAConfig, llm_cfg: dict, vision_cfg: dict) -> None:
    """The component configs, the tower's preprocessor config and the top-level config."""
    proj_cfg = {"model_type": "v2l_projector", "architectures": ["MultimodalProjector"],
                "mm_projector_type": c.projector_type}
    write_json(os.path.join(path, "llm", "config.json"), llm_cfg)
    write_json(os.path.join(path, "vision_tower", "config.json"), vision_cfg)
    write_json(os.path.join(path, "mm_projector", "config.json"), proj_cfg)
    write_json(os.path.join(path, "vision_tower", "preprocessor_config.json"), {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "rescale_factor": 1 / 255, "resample": 3,
        "size": {"height": c.vision.image_size, "width": c.vision.image_size}})
    write_json(os.path.join(path, "config.json"), _top_config(c, llm_cfg, vision_cfg, proj_cfg))


def _top_config(c: LongVILAConfig, llm_cfg: dict, vision_cfg: dict, proj_cfg: dict) -> dict:
    """VILA's top-level config.json; the encoders as JSON strings, as VILA's defaults are."""
    sampling = {k: v for k, v in (("num_video_frames", c.num_video_frames), ("fps", c.fps))
                if v is not None}
    return {
        "model_type": "vila", "architectures": ["VILAForCausalLM"],
        "llm_cfg": llm_cfg, "vision_tower_cfg": vision_cfg, "mm_projector_cfg": proj_cfg,
        "hidden_size": c.llm.hidden_size, "mm_hidden_size": c.vision.hidden_size,
        "mm_vision_select_layer": c.vision.select_layer,
        "mm_vision_select_feature": c.vision.select_feature, "image_aspect_ratio": "resize",
        **sampling, "image_encoder": json.dumps({"_target_": BASIC_ENCODERS["image_encoder"]}),
        "video_encoder": to_vila(c.video_encoder),
        "lvr_jax": {"video_token_id": c.video_token_id, "newline_token_id": c.newline_token_id}}

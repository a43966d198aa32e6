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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lvr_jax.model import config as cfg_lib
from lvr_jax.model.config import LongVILAConfig
from lvr_jax.model.projector import layer_names
from lvr_jax.model.video_encoders import to_vila
from lvr_jax.model.vlm import LongVILA
from lvr_jax.tokenizer import Tokenizer, VIDEO_TOKEN

COMPONENTS = ("llm", "vision_tower", "mm_projector")
# (path, logical axes) -> sharding of that parameter; None places on the default device.
ShardingFn = Callable[[tuple, tuple], jax.sharding.Sharding]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names tensor/field and file."""


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
    return specs


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

def canonical_name(component: str, name: str) -> str:
    """transformers 5 saves SigLIP without the `vision_model.` prefix that VILA files carry."""
    if component == "vision_tower" and not name.startswith("vision_model."):
        return "vision_model." + name
    return name


class SafetensorsDir:
    """Headers of the safetensors files of one component folder: name -> (file, shape)."""

    def __init__(self, directory: str, component: str):
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        files = _safetensors_files(directory, index_path)
        self.entries: dict[str, tuple[str, tuple]] = {}  # canonical name -> (file, shape)
        self.stored_names: dict[str, str] = {}  # canonical name -> name in the file
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path!r} lists {name!r}, which does not exist")
            with _open_safetensors(path) as f:
                for key in f.keys():
                    canonical = canonical_name(component, key)
                    self.entries[canonical] = (path, tuple(f.get_slice(key).get_shape()))
                    self.stored_names[canonical] = key

    def read(self, name: str) -> np.ndarray:
        # Opened per tensor so the mapping is released at once: file pages touched while
        # loading never accumulate in this process's resident memory.
        with _open_safetensors(self.entries[name][0]) as f:
            return f.get_tensor(self.stored_names[name])


def _safetensors_files(directory: str, index_path: str) -> list[str]:
    """The weight files of a component folder: those its index lists, else every one there."""
    if not os.path.exists(index_path):
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    else:
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"field 'weight_map' of {index_path!r} is missing or not an "
                                  "object mapping tensor names to files")
        files = sorted(set(weight_map.values()))
    if not files:
        raise CheckpointError(f"no .safetensors files in {directory!r}")
    return files


def _open_safetensors(path: str):
    """`safe_open` of one file; a truncated or corrupt file is a CheckpointError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as error:
        raise CheckpointError(f"{path!r} is not a readable safetensors file ({error}); it is "
                              "probably truncated or corrupt: download or copy it again") from None


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
                              + "\n  ".join(problems))


def _params_by_path(model: nnx.Module) -> dict[tuple, nnx.Param]:
    return {tuple(str(p) for p in path): v for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)}


def logical_axes(var: nnx.Param) -> tuple:
    """Logical axis names of a parameter, with "layers" for the stacking axis."""
    axes = tuple(var.get_metadata().get("axes", ()))
    return ("layers",) * (var.get_value().ndim - len(axes)) + axes


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
    dirs = {comp: SafetensorsDir(os.path.join(path, comp), comp) for comp in COMPONENTS}
    _check(specs, dirs)
    params = _params_by_path(model)
    for spec in specs:
        var = params[spec.path]
        sharding = (sharding_fn(spec.path, logical_axes(var)) if sharding_fn
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        var.set_value(_place(spec, var, dirs[spec.component], sharding))
    return model


def _read_json(path: str) -> dict:
    """A JSON object from `path`; a missing, undecodable or non-object file names the file."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path!r} is missing; a VILA checkpoint directory needs it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:  # the message holds the place
        raise CheckpointError(f"{path!r} is not valid UTF-8 JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path!r} holds a JSON {type(value).__name__}; expected an object")
    return value


def _token_ids(path: str, top: dict) -> dict:
    """Video placeholder and "\\n" ids from the checkpoint's tokenizer (or its config)."""
    if os.path.exists(os.path.join(path, "llm", "tokenizer.json")):
        from lvr_jax.tokenizer import load_tokenizer
        tok = load_tokenizer(os.path.join(path, "llm"))
        return dict(video_token_id=tok.token_id(VIDEO_TOKEN), newline_token_id=tok.newline_id)
    ids = top.get("lvr_jax", {})
    return {k: ids[k] for k in ("video_token_id", "newline_token_id") if k in ids}


def read_config(path: str) -> LongVILAConfig:
    """LongVILAConfig from a VILA directory's config.json and its component configs."""
    top_path = os.path.join(path, "config.json")
    top = _read_json(top_path)
    if top.get("model_type") not in ("vila", "llava_llama"):
        raise CheckpointError(f"field 'model_type' of {top_path!r} is {top.get('model_type')!r}; "
                              "a VILA checkpoint has 'vila' or 'llava_llama'")
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature != "cls_patch":
        raise CheckpointError(f"field 'mm_vision_select_feature' of {top_path!r} is {feature!r}; "
                              "only 'cls_patch' (all SigLIP patches) is supported")
    proj_path = os.path.join(path, "mm_projector", "config.json")
    projector_type = _read_json(proj_path).get("mm_projector_type")
    if projector_type not in cfg_lib.PROJECTOR_TYPES:
        raise CheckpointError(f"field 'mm_projector_type' of {proj_path!r} is {projector_type!r}; "
                              f"supported: {', '.join(cfg_lib.PROJECTOR_TYPES)}")
    select_layer = top.get("mm_vision_select_layer", -2)
    if not isinstance(select_layer, int) or isinstance(select_layer, bool):
        raise CheckpointError(f"field 'mm_vision_select_layer' of {top_path!r} is "
                              f"{select_layer!r}; it must be an integer (VILA uses -2)")
    llm = _component_config(path, "llm", cfg_lib.qwen2_from_hf)
    vision = _component_config(path, "vision_tower", functools.partial(
        cfg_lib.siglip_from_hf, select_layer=select_layer))
    return LongVILAConfig(vision=vision, llm=llm, projector_type=projector_type,
                          **_token_ids(path, top))


def _component_config(path: str, component: str, from_hf: Callable):
    """A component's config.json read by `from_hf`; a bad field is a CheckpointError."""
    config_path = os.path.join(path, component, "config.json")
    try:
        return from_hf(_read_json(config_path), source=repr(config_path))
    except cfg_lib.HFConfigError as error:
        raise CheckpointError(str(error)) from None


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


def _write_component(directory: str, tensors: Iterator[tuple[str, np.ndarray]],
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
        _write_json(os.path.join(directory, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_pretrained(model: LongVILA, path: str, *, tokenizer: Optional[Tokenizer] = None,
                    dtype: Optional[str] = None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes a VILA directory that load_pretrained and transformers (llm/, vision_tower/) read."""
    c = model.config
    for comp in COMPONENTS:
        tensors = ((name, t) for _, name, t in iter_hf_tensors(model, (comp,), dtype))
        _write_component(os.path.join(path, comp), tensors, max_shard_bytes)
    llm_cfg, vision_cfg = cfg_lib.qwen2_to_hf(c.llm), cfg_lib.siglip_to_hf(c.vision)
    proj_cfg = {"model_type": "v2l_projector", "architectures": ["MultimodalProjector"],
                "mm_projector_type": c.projector_type}
    _write_json(os.path.join(path, "llm", "config.json"), llm_cfg)
    _write_json(os.path.join(path, "vision_tower", "config.json"), vision_cfg)
    _write_json(os.path.join(path, "mm_projector", "config.json"), proj_cfg)
    _write_json(os.path.join(path, "vision_tower", "preprocessor_config.json"), {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "rescale_factor": 1 / 255, "resample": 3,
        "size": {"height": c.vision.image_size, "width": c.vision.image_size}})
    _write_json(os.path.join(path, "config.json"), {
        "model_type": "vila", "architectures": ["VILAForCausalLM"],
        "llm_cfg": llm_cfg, "vision_tower_cfg": vision_cfg, "mm_projector_cfg": proj_cfg,
        "hidden_size": c.llm.hidden_size, "mm_hidden_size": c.vision.hidden_size,
        "mm_vision_select_layer": c.vision.select_layer, "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize", "video_encoder": to_vila(c.video_encoder),
        "lvr_jax": {"video_token_id": c.video_token_id, "newline_token_id": c.newline_token_id}})
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "llm"))

"""The configs of a VILA directory -> LongVILAConfig, refusing what the model cannot honour.

The top-level `config.json` (model_type "vila") names the vision feature selection, the
frame sampling and the image/video encoders; `llm/`, `vision_tower/` and `mm_projector/`
hold their own configs. A field whose value this project cannot honour is an error naming
the field, the file and the value, never ignored.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

from lvr_jax.model import config as cfg_lib
from lvr_jax.model.config import LongVILAConfig
from lvr_jax.model.video_encoders import VideoEncoderError, parse_video_encoder
from lvr_jax.tokenizer import VIDEO_TOKEN

MODEL_TYPES = ("vila", "llava_llama")
COMPONENT_FIELDS = {"llm": "llm_cfg", "vision_tower": "vision_tower_cfg",
                    "mm_projector": "mm_projector_cfg"}
BASIC_ENCODERS = {"image_encoder": "llava.model.encoders.BasicImageEncoder",
                  "video_encoder": "llava.model.encoders.BasicVideoEncoder"}
# BasicImageEncoder / BasicVideoEncoder arguments as VILA defaults them: nothing before a
# frame, "\n" after it, which is what `LongVILA.encode_video` does.
_BASIC_ENCODER_ARGS = {"start_tokens": None, "end_tokens": "\n"}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names tensor/field and file."""


def read_json(path: str) -> dict:
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


def json_field(top: dict, field: str, source: str) -> Any:
    """A field that VILA stores as a JSON object or as a JSON-encoded string of one."""
    value = top.get(field)
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"field {field!r} of {source} is a string that is not valid "
                                  f"JSON ({error}): {value!r}") from None
    return value


def _encoder_target(top: dict, field: str, source: str) -> dict:
    """The encoder object of `field` ({} when absent); anything but an object is refused."""
    value = json_field(top, field, source)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"field {field!r} of {source} is {value!r}; expected an object "
                              "such as {\"_target_\": \"" + BASIC_ENCODERS[field] + "\"}")
    return value


def _check_basic_encoder(encoder: dict, field: str, source: str) -> None:
    """Refuses an encoder other than VILA's basic one, or basic with other arguments."""
    target = encoder.get("_target_", BASIC_ENCODERS[field])
    if target != BASIC_ENCODERS[field]:
        raise CheckpointError(f"field {field!r} of {source} has _target_ {target!r}; this "
                              f"project supports {BASIC_ENCODERS[field]!r} only")
    for arg, value in encoder.items():
        if arg != "_target_" and _BASIC_ENCODER_ARGS.get(arg, object()) != value:
            raise CheckpointError(f"field {field!r} of {source} sets {arg!r} to {value!r}; "
                                  f"supported: {_BASIC_ENCODER_ARGS}")


def video_encoder_from_vila(top: dict, source: str) -> dict:
    """LongVILAConfig fields for the `video_encoder` of a top-level config: VILA's basic
    encoder (also when the field is absent) or TSP pooling; anything else is refused naming
    the field and its value."""
    value = _encoder_target(top, "video_encoder", source) or None  # absent: basic
    try:
        return {"video_encoder": parse_video_encoder(value, source=f"field 'video_encoder' of "
                                                                  f"{source}")}
    except VideoEncoderError as error:
        raise CheckpointError(str(error)) from None


def _check_image_encoder(top: dict, source: str) -> None:
    _check_basic_encoder(_encoder_target(top, "image_encoder", source), "image_encoder", source)


def _check_component_field(top: dict, component: str, source: str) -> None:
    """`llm_cfg` & co. as VILA reads them: an object means the folder beside config.json;
    a plain string is a path or hub name elsewhere, which this loader does not follow."""
    field = COMPONENT_FIELDS[component]
    value = json_field(top, field, source)
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"field {field!r} of {source} is {value!r}; VILA reads a string "
                              f"there as a model path, and this loader reads the {component}/ "
                              "folder beside config.json only: point the field at that "
                              "folder's config (an object) or copy the component there")


def _select_layer(top: dict, source: str) -> int:
    select_layer = top.get("mm_vision_select_layer", -2)
    if not isinstance(select_layer, int) or isinstance(select_layer, bool):
        raise CheckpointError(f"field 'mm_vision_select_layer' of {source} is "
                              f"{select_layer!r}; it must be an integer (VILA uses -2)")
    return select_layer


def _select_feature(top: dict, source: str, vision: cfg_lib.SiglipConfig,
                    projector_type: str) -> str:
    """`mm_vision_select_feature`: "cls_patch" keeps every token, "patch" drops the first.

    SigLIP has no CLS token, so "patch" drops a real patch and leaves g*g - 1 tokens, which
    no downsample projector can view as a square grid (VILA fails on it too).
    """
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature not in cfg_lib.SELECT_FEATURES:
        raise CheckpointError(f"field 'mm_vision_select_feature' of {source} is {feature!r}; "
                              f"VILA knows {', '.join(cfg_lib.SELECT_FEATURES)}")
    if feature == "patch":
        raise CheckpointError(
            f"field 'mm_vision_select_feature' of {source} is 'patch': it drops the first of "
            f"the {vision.num_patches} SigLIP patch tokens (SigLIP has no CLS token), leaving "
            f"{vision.num_patches - 1}, which projector {projector_type!r} cannot view as a "
            "square grid; SigLIP-based VILA checkpoints use 'cls_patch'")
    return feature


def _frame_sampling(top: dict, source: str) -> dict:
    """`num_video_frames` (a positive integer) and `fps` (a number >= 0; 0 = uniform)."""
    out = {}
    frames, fps = top.get("num_video_frames"), top.get("fps")
    if frames is not None:
        if not isinstance(frames, int) or isinstance(frames, bool) or frames <= 0:
            raise CheckpointError(f"field 'num_video_frames' of {source} is {frames!r}; it "
                                  "must be a positive integer")
        out["num_video_frames"] = frames
    if fps is not None:
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps < 0:
            raise CheckpointError(f"field 'fps' of {source} is {fps!r}; it must be a number "
                                  ">= 0 (0 samples num_video_frames uniformly)")
        out["fps"] = float(fps)
    return out


def _token_ids(path: str, top: dict) -> dict:
    """Video placeholder and "\\n" ids from the checkpoint's tokenizer (or its config)."""
    if os.path.exists(os.path.join(path, "llm", "tokenizer.json")):
        from lvr_jax.tokenizer import load_tokenizer
        tok = load_tokenizer(os.path.join(path, "llm"))
        return dict(video_token_id=tok.token_id(VIDEO_TOKEN), newline_token_id=tok.newline_id)
    ids = top.get("lvr_jax", {})
    return {k: ids[k] for k in ("video_token_id", "newline_token_id") if k in ids}


def _projector_type(path: str) -> str:
    proj_path = os.path.join(path, "mm_projector", "config.json")
    projector_type = read_json(proj_path).get("mm_projector_type")
    if projector_type not in cfg_lib.PROJECTOR_TYPES:
        raise CheckpointError(f"field 'mm_projector_type' of {proj_path!r} is {projector_type!r}; "
                              f"supported: {', '.join(cfg_lib.PROJECTOR_TYPES)}")
    return projector_type


def read_top_config(path: str) -> dict:
    """The top-level config.json of a VILA directory, with its model_type checked."""
    top_path = os.path.join(path, "config.json")
    top = read_json(top_path)
    if top.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(f"field 'model_type' of {top_path!r} is {top.get('model_type')!r}; "
                              f"a VILA checkpoint has {' or '.join(map(repr, MODEL_TYPES))}")
    return top


def read_config(path: str) -> LongVILAConfig:
    """LongVILAConfig from a VILA directory's config.json and its component configs."""
    top = read_top_config(path)
    source = repr(os.path.join(path, "config.json"))
    for component in COMPONENT_FIELDS:
        _check_component_field(top, component, source)
    _check_image_encoder(top, source)
    projector_type = _projector_type(path)
    llm = component_config(path, "llm", cfg_lib.qwen2_from_hf)
    vision = component_config(path, "vision_tower", functools.partial(
        cfg_lib.siglip_from_hf, select_layer=_select_layer(top, source)))
    feature = _select_feature(top, source, vision, projector_type)
    vision = vision.replace(select_feature=feature)
    return LongVILAConfig(vision=vision, llm=llm, projector_type=projector_type,
                          **_frame_sampling(top, source), **video_encoder_from_vila(top, source),
                          **_token_ids(path, top))


def component_config(path: str, component: str, from_hf: Callable):
    """A component's config.json read by `from_hf`; a bad field is a CheckpointError."""
    config_path = os.path.join(path, component, "config.json")
    try:
        return from_hf(read_json(config_path), source=repr(config_path))
    except cfg_lib.HFConfigError as error:
        raise CheckpointError(str(error)) from None

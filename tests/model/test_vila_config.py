"""The top-level VILA config.json as released: every field read, or refused by name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lvr_jax.model import CheckpointError, load_pretrained, read_config, save_pretrained
from lvr_jax.model.siglip import SiglipVisionTower
from lvr_jax.model.vila_config import read_json
from tests.hf_reference import copy_vila_dir, rel_err

BASIC_VIDEO = {"_target_": "llava.model.encoders.BasicVideoEncoder"}
BASIC_IMAGE = {"_target_": "llava.model.encoders.BasicImageEncoder"}
TSP_VIDEO = {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}


def released_top_config(path, as_strings: bool) -> dict:
    """config.json as VILA writes it: component configs inline, encoders, frame sampling."""
    encode = json.dumps if as_strings else (lambda d: d)
    return {
        "model_type": "vila", "architectures": ["VILAForCausalLM"],
        "llm_cfg": read_json(str(path / "llm" / "config.json")),
        "vision_tower_cfg": read_json(str(path / "vision_tower" / "config.json")),
        "mm_projector_cfg": read_json(str(path / "mm_projector" / "config.json")),
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
        "num_video_frames": 256, "fps": 0.0, "image_aspect_ratio": "resize",
        "image_encoder": encode(BASIC_IMAGE), "video_encoder": encode(BASIC_VIDEO),
    }


@pytest.fixture
def vila_copy(make_vila_dir, tmp_path):
    """A copy of the reference VILA directory whose config.json is the released one."""
    return copy_vila_dir(make_vila_dir, tmp_path)


def write_top(path, top):
    (path / "config.json").write_text(json.dumps(top))


@pytest.mark.parametrize("as_strings", [True, False], ids=["json-strings", "objects"])
def test_released_top_config_is_read_with_encoders_as_strings_or_objects(vila_copy, as_strings):
    write_top(vila_copy, released_top_config(vila_copy, as_strings))
    config = read_config(str(vila_copy))
    assert (config.num_video_frames, config.fps) == (256, 0.0)
    assert config.vision.select_feature == "cls_patch" and config.vision.select_layer == -2


def test_component_configs_as_json_strings_are_read(vila_copy):
    top = released_top_config(vila_copy, as_strings=True)
    top.update({k: json.dumps(top[k]) for k in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg")})
    write_top(vila_copy, top)
    assert read_config(str(vila_copy)).llm.hidden_size == 64


def test_absent_encoders_mean_the_basic_ones(vila_copy):
    top = released_top_config(vila_copy, as_strings=True)
    del top["image_encoder"], top["video_encoder"], top["num_video_frames"], top["fps"]
    write_top(vila_copy, top)
    config = read_config(str(vila_copy))
    assert (config.num_video_frames, config.fps) == (None, None)


@pytest.mark.parametrize("value", [TSP_VIDEO, json.dumps(TSP_VIDEO)])
def test_a_tsp_video_encoder_is_read_as_an_object_or_a_string(vila_copy, value):
    top = released_top_config(vila_copy, as_strings=True)
    top["video_encoder"] = value
    write_top(vila_copy, top)
    encoder = read_config(str(vila_copy)).video_encoder
    assert (encoder.kind, encoder.pool_sizes) == ("tsp", ((8, 1, 1),))


@pytest.mark.parametrize("field, value, message", [
    ("video_encoder", {"_target_": "llava.model.encoders.FooVideoEncoder"},
     r"field '_target_' of field 'video_encoder' of .* is 'llava.model.encoders.FooVideoEncoder'"),
    ("video_encoder", json.dumps({**TSP_VIDEO, "stride": 2}), r"field 'stride' of .* is 2"),
    ("video_encoder", '{"_target_": ', r"'video_encoder' .* is a string that is not valid JSON"),
    ("video_encoder", 3, r"'video_encoder' of .* is 3; expected an object"),
    ("image_encoder", {"_target_": "llava.model.encoders.TSPImageEncoder"},
     r"'image_encoder' .* 'llava.model.encoders.TSPImageEncoder'"),
    ("llm_cfg", "Efficient-Large-Model/qwen2-7b", r"field 'llm_cfg' of .* is "
                                                  r"'Efficient-Large-Model/qwen2-7b'; VILA reads a string"),
    ("mm_vision_select_feature", "cls", r"'mm_vision_select_feature' of .* is 'cls'; VILA knows"),
    ("num_video_frames", 0, r"field 'num_video_frames' of .* is 0; it must be a positive integer"),
    ("num_video_frames", 8.0, r"'num_video_frames' of .* is 8.0"),
    ("fps", "2", r"field 'fps' of .* is '2'; it must be a number >= 0"),
])
def test_field_that_cannot_be_honoured_is_refused_by_name_and_value(vila_copy, field, value,
                                                                    message):
    top = released_top_config(vila_copy, as_strings=True)
    top[field] = value
    write_top(vila_copy, top)
    with pytest.raises(CheckpointError, match=message):
        read_config(str(vila_copy))


def test_select_feature_patch_is_refused_since_siglip_has_no_cls_token(vila_copy):
    top = released_top_config(vila_copy, as_strings=True)
    top["mm_vision_select_feature"] = "patch"
    write_top(vila_copy, top)
    with pytest.raises(CheckpointError, match=r"'mm_vision_select_feature' of .* is 'patch': it "
                                              r"drops the first of the 25 SigLIP patch tokens .*"
                                              r"leaving 24, which projector "
                                              r"'mlp_downsample_2x2_fix' cannot view as a square"):
        read_config(str(vila_copy))


def test_patch_feature_drops_the_first_token_as_vila_does(make_vila_dir):
    path, _, hf_vision, _ = make_vila_dir()
    model = load_pretrained(path)
    config = model.config.vision.replace(select_feature="patch")
    tower = SiglipVisionTower(config, rngs=nnx.Rngs(0))
    nnx.update(tower, nnx.state(model.vision_tower, nnx.Param))
    frames = np.random.default_rng(2).uniform(-1, 1, (1, 70, 70, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = hf_vision(torch.from_numpy(frames).permute(0, 3, 1, 2),
                           output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    features = tower(jnp.asarray(frames))
    assert features.shape == (1, 24, 64)
    assert rel_err(features, hidden) < 1e-5


def test_save_writes_the_fields_back_as_vila_reads_them(vila_copy, tmp_path):
    write_top(vila_copy, released_top_config(vila_copy, as_strings=False))
    model = load_pretrained(str(vila_copy))
    save_pretrained(model, str(tmp_path / "out"))
    top = read_json(str(tmp_path / "out" / "config.json"))
    assert (top["num_video_frames"], top["fps"]) == (256, 0.0)
    assert json.loads(top["video_encoder"]) == BASIC_VIDEO
    assert json.loads(top["image_encoder"]) == BASIC_IMAGE
    assert read_config(str(tmp_path / "out")) == model.config


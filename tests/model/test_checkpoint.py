"""VILA directories: exact round trips, transformers compatibility, clear errors."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from lvr_jax.model import (PRESETS, CheckpointError, LongVILA, load_pretrained, read_config,
                           save_pretrained)
from tests.hf_reference import rel_err


def params_of(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def all_tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def test_released_layout_round_trips_exactly(make_vila_dir, tmp_path):
    path, _, _, _ = make_vila_dir()
    model = load_pretrained(path)
    save_pretrained(model, str(tmp_path))
    for comp in ("llm", "vision_tower", "mm_projector"):
        original, written = all_tensors(os.path.join(path, comp)), all_tensors(tmp_path / comp)
        prefix = "vision_model." if comp == "vision_tower" else ""
        original = {k if k.startswith(prefix) else prefix + k: v for k, v in original.items()}
        assert original.keys() == written.keys(), comp
        for name in original:
            np.testing.assert_array_equal(original[name], written[name], err_msg=name)
    again = load_pretrained(str(tmp_path))
    for a, b in zip(params_of(model), params_of(again)):
        np.testing.assert_array_equal(a, b)


def test_sharded_save_writes_an_index_and_loads(tmp_path, tokenizer):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    model = LongVILA(config, rngs=nnx.Rngs(3))
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer, max_shard_bytes=64 << 10)
    index = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_pretrained(str(tmp_path))
    assert loaded.config == config
    for a, b in zip(params_of(model), params_of(loaded)):
        np.testing.assert_array_equal(a, b)


def test_saved_directory_loads_in_transformers_with_the_same_outputs(tmp_path, tokenizer):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    config = config.replace(llm=dataclasses.replace(config.llm, tie_word_embeddings=False))
    model = LongVILA(config, rngs=nnx.Rngs(4))
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer)
    hf_llm = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "llm").eval()
    hf_vision = transformers.SiglipVisionModel.from_pretrained(tmp_path / "vision_tower").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "llm")
    ids = np.asarray([hf_tok.encode("<think> the red circle </think><answer>B</answer>")])
    frames = np.random.default_rng(0).uniform(-1, 1, (2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        logits = hf_llm(torch.from_numpy(ids)).logits.numpy()
        hidden = hf_vision(torch.from_numpy(frames).permute(0, 3, 1, 2),
                           output_hidden_states=True).hidden_states[-2].numpy()
    assert rel_err(model.llm(jnp.asarray(ids)), logits) < 1e-5
    assert rel_err(model.vision_tower(jnp.asarray(frames)), hidden) < 1e-5


def broken_copy(make_vila_dir, tmp_path):
    path, _, _, _ = make_vila_dir()
    target = tmp_path / "ckpt"
    shutil.copytree(path, target)
    return target


def edit_tensors(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_tensor_is_named_with_its_folder(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_tensors(ckpt / "llm" / "model.safetensors",
                 lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*llm"):
        load_pretrained(str(ckpt))


def test_unexpected_tensor_is_named_with_its_file(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_tensors(ckpt / "mm_projector" / "model.safetensors",
                 lambda t: t.update({"layers.9.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers.9.weight'.*mm_projector/model.safetensors"):
        load_pretrained(str(ckpt))


def test_shape_mismatch_names_tensor_and_shapes(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_tensors(ckpt / "mm_projector" / "model.safetensors",
                 lambda t: t.update({"layers.2.bias": t["layers.2.bias"][:-1]}))
    with pytest.raises(CheckpointError, match=r"'layers.2.bias'.*has shape \(63,\), the config needs \(64,\)"):
        load_pretrained(str(ckpt))


def test_wrong_projector_type_names_field_and_file(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    (ckpt / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(CheckpointError, match=r"'mm_projector_type'.*mm_projector/config.json.*'mlp2x_gelu'"):
        read_config(str(ckpt))


def test_missing_component_config_is_named(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    os.remove(ckpt / "vision_tower" / "config.json")
    with pytest.raises(CheckpointError, match=r"vision_tower/config.json' is missing"):
        read_config(str(ckpt))


def edit_json(file, edit):
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def test_truncated_safetensors_file_is_named(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    weights = ckpt / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"llm/model.safetensors' is not a readable "
                                              r"safetensors file .*incomplete metadata.*truncated"):
        load_pretrained(str(ckpt))


def test_index_without_weight_map_is_named(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    (ckpt / "llm" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"field 'weight_map' of '.*llm/model.safetensors"
                                              r".index.json' is missing"):
        load_pretrained(str(ckpt))


@pytest.mark.parametrize("text", ['{"hidden_size": 64,', "\xff\xfe{}"])
def test_config_that_is_not_json_is_named(make_vila_dir, tmp_path, text):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    (ckpt / "llm" / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"llm/config.json' is not valid UTF-8 JSON"):
        load_pretrained(str(ckpt))


@pytest.mark.parametrize("component, field, value, problem", [
    ("llm", "hidden_size", "128", r"is '128' \(str\); it must be an integer"),
    ("llm", "num_hidden_layers", 2.0, r"is 2.0 \(float\); it must be an integer"),
    ("llm", "vocab_size", True, r"is True \(bool\); it must be an integer"),
    ("llm", "intermediate_size", 0, "is 0; it must be positive"),
    ("llm", "rope_theta", "1e4", r"is '1e4' \(str\); it must be a number"),
    ("llm", "tie_word_embeddings", "false", r"is 'false' \(str\); it must be true or false"),
    ("vision_tower", "patch_size", "14", r"is '14' \(str\); it must be an integer"),
])
def test_config_field_of_the_wrong_type_is_named(make_vila_dir, tmp_path, component, field,
                                                 value, problem):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_json(ckpt / component / "config.json", lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=f"^field '{field}' of '.*{component}/config.json' "
                                              + problem):
        load_pretrained(str(ckpt))


@pytest.mark.parametrize("component, field", [
    ("llm", "hidden_size"), ("llm", "num_key_value_heads"), ("llm", "vocab_size"),
    ("vision_tower", "image_size"), ("vision_tower", "num_hidden_layers")])
def test_missing_shape_field_is_an_error_not_the_7b_default(make_vila_dir, tmp_path, component,
                                                           field):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_json(ckpt / component / "config.json", lambda c: c.pop(field))
    with pytest.raises(CheckpointError, match=f"^field '{field}' of '.*{component}/config.json' "
                                              "is missing; it decides parameter shapes"):
        load_pretrained(str(ckpt))


def test_select_layer_that_is_not_an_integer_is_named(make_vila_dir, tmp_path):
    ckpt = broken_copy(make_vila_dir, tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.update(mm_vision_select_layer="-2"))
    with pytest.raises(CheckpointError, match=r"'mm_vision_select_layer' of '.*ckpt/config.json'"
                                              r" is '-2'; it must be an integer"):
        read_config(str(ckpt))


def test_longvila_r1_7b_parameter_count():
    model = nnx.eval_shape(lambda: LongVILA(PRESETS["longvila_r1_7b"](), rngs=nnx.Rngs(0)))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    # Qwen2-7B (untied head, vocab 152064) + SigLIP so400m at 448 px without its pooling head
    # + the 2x2 projector (LayerNorm(4608), Linear(4608, 3584), Linear(3584, 3584)).
    assert count(model.llm) == 7_615_616_512
    assert count(model.vision_tower) == 413_327_088
    assert count(model.mm_projector) == 4608 * 2 + 4608 * 3584 + 3584 + 3584 * 3584 + 3584
    assert count(model) == 8_058_320_112
    assert model.config.tokens_per_frame == 257


def test_streaming_load_stays_under_one_and_a_half_times_the_checkpoint(tmp_path):
    import subprocess
    import sys

    from benchmarks.checkpoint_memory import build_checkpoint

    size = build_checkpoint(str(tmp_path), size_mb=120)
    out = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_memory", "--measure",
                          str(tmp_path), "streaming"], check=True, capture_output=True, text=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert (rss["peak"] - rss["baseline"]) / size < 1.5

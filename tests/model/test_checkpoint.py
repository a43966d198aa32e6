"""VILA directories: exact round trips, transformers compatibility, clear errors."""

import dataclasses
import json
import os

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
from lvr_jax.model.checkpoint import iter_hf_tensors
from tests import hf_reference
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


broken_copy = hf_reference.copy_vila_dir


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


# ---- SigLIP towers with and without the pooling head, bf16 checkpoints ---------------------

def tower_vila_dir(path, tokenizer, vision, dtype=torch.float32, **llm_kwargs):
    """A VILA directory around `vision`, with a small LLM and projector, stored in `dtype`."""
    llm = hf_reference.qwen2(vocab_size=tokenizer.vocab_size, hidden=48, heads=4, kv_heads=2,
                             **llm_kwargs)
    projector = hf_reference.ProjectorReference("mlp_downsample_2x2_fix",
                                                vision.config.hidden_size, 48)
    hf_reference.randomize(projector, seed=5)
    llm, vision, projector = (m.to(dtype) for m in (llm, vision, projector))
    hf_reference.write_vila_dir(str(path), llm, vision, projector, "mlp_downsample_2x2_fix",
                                tokenizer)
    return llm, vision, projector


def head_tower(use_head):
    """A tiny tower unlike the suite's others: 42 px (an odd 3x3 grid), 3 heads, 2 layers."""
    return hf_reference.siglip(hidden=48, heads=3, layers=2, image_size=42, intermediate=80,
                               use_head=use_head, seed=7)


@pytest.mark.parametrize("use_head, key", [(None, "true"), (True, "absent"), (False, "false")])
def test_siglip_tower_with_or_without_pooling_head_loads_and_writes_back_what_it_read(
        tmp_path, tokenizer, use_head, key):
    vision = head_tower(use_head)
    tower_vila_dir(tmp_path / "in", tokenizer, vision)
    if key == "absent":  # older VILA towers: no key, which transformers reads as true
        edit_json(tmp_path / "in" / "vision_tower" / "config.json", lambda c: c.pop("vision_use_head"))
    model = load_pretrained(str(tmp_path / "in"))
    assert model.config.vision.vision_use_head == (key != "false")
    frames = np.random.default_rng(1).uniform(-1, 1, (2, 42, 42, 3)).astype(np.float32)
    with torch.no_grad():
        hf = vision(torch.from_numpy(frames).permute(0, 3, 1, 2), output_hidden_states=True)
    assert rel_err(model.vision_tower(jnp.asarray(frames)), hf.hidden_states[-2]) < 1e-5
    if key != "false":  # the head's layout is checked by running it, not only copied
        assert rel_err(model.vision_tower.pooled_output(jnp.asarray(frames)), hf.pooler_output) < 1e-5
    save_pretrained(model, str(tmp_path / "out"))
    original = all_tensors(tmp_path / "in" / "vision_tower")
    written = all_tensors(tmp_path / "out" / "vision_tower")
    assert {"vision_model." + k for k in original} == written.keys()
    assert len([k for k in written if ".head." in k]) == (11 if key != "false" else 0)
    for name in original:
        np.testing.assert_array_equal(original[name], written["vision_model." + name], err_msg=name)
    again = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out" / "vision_tower").eval()
    assert again.config.vision_use_head == (key != "false")
    with torch.no_grad():
        hf_again = again(torch.from_numpy(frames).permute(0, 3, 1, 2))
    output = "pooler_output" if key != "false" else "last_hidden_state"
    np.testing.assert_array_equal(getattr(hf_again, output).numpy(), getattr(hf, output).numpy())


@pytest.mark.parametrize("use_head, say", [(True, False), (False, True)])
def test_head_flag_that_contradicts_the_tensors_is_explained(tmp_path, tokenizer, use_head, say):
    tower_vila_dir(tmp_path, tokenizer, head_tower(use_head))
    edit_json(tmp_path / "vision_tower" / "config.json", lambda c: c.update(vision_use_head=say))
    problem = "unexpected" if use_head else "missing"
    with pytest.raises(CheckpointError, match=rf"(?s){problem} tensor 'vision_model.head.probe'.*"
                                              rf"has vision_use_head {str(say).lower()}"):
        load_pretrained(str(tmp_path))


def reference_tensors(llm, vision, projector):
    """component -> {Hugging Face name: float32 numpy} of the torch modules."""
    as_np = lambda sd: {k: v.float().numpy() for k, v in sd.items()}  # noqa: E731
    towers = {k.removeprefix("vision_model."): v for k, v in as_np(vision.state_dict()).items()}
    return {"llm": as_np(llm.state_dict()),
            "vision_tower": {"vision_model." + k: v for k, v in towers.items()},
            "mm_projector": as_np(projector.state_dict())}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_checkpoint_loads_into_f32_or_bf16_params_with_the_torch_values(
        tmp_path, tokenizer, param_dtype):
    llm, vision, projector = tower_vila_dir(tmp_path, tokenizer, head_tower(None), torch.bfloat16)
    llm.save_pretrained(tmp_path / "llm", max_shard_size="40KB")  # sharded, with an index
    assert (tmp_path / "llm" / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "llm" / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_pretrained(str(tmp_path), param_dtype=param_dtype)
    assert {str(p.dtype) for p in params_of(model)} == {param_dtype}
    reference = reference_tensors(llm, vision, projector)
    for component, name, value in iter_hf_tensors(model):
        np.testing.assert_array_equal(value.astype(np.float32), reference[component][name],
                                      err_msg=name)
    assert sum(len(r) for r in reference.values()) == len(list(iter_hf_tensors(model)))


def test_bf16_params_save_as_bf16_that_transformers_reads(tmp_path, tokenizer):
    llm, _, _ = tower_vila_dir(tmp_path / "in", tokenizer, head_tower(False), torch.bfloat16)
    model = load_pretrained(str(tmp_path / "in"), param_dtype="bfloat16")
    save_pretrained(model, str(tmp_path / "out"))
    again = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out" / "llm")
    assert again.dtype == torch.bfloat16
    for name, value in llm.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name

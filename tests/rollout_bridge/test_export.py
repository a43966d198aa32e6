"""Export: Hugging Face names and layouts that transformers loads to the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load
from safetensors.torch import load as load_torch

from rollout_bridge import export
from tests.rollout_bridge.servers import tiny_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def jax_logits(model, ids):
    return np.asarray(model.llm(jnp.asarray([ids])))[0]


def test_llm_dir_round_trips_through_transformers_to_the_same_logits(model, tokenizer, tmp_path):
    export.export_dir(model, str(tmp_path), tokenizer)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = tokenizer.encode("a long video of a cat, then a dog")
    with torch.no_grad():
        ours = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, jax_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_chunks_are_safetensors_bodies_within_the_size_holding_every_tensor_once(model):
    whole = export.to_hf_state_dict(model)
    chunks = list(export.iter_chunks(model, chunk_bytes=20_000))
    assert len(chunks) > 3
    seen = {}
    for body in chunks:
        tensors = load(body)
        if len(tensors) > 1:  # only a single tensor bigger than the chunk size may exceed it
            assert sum(t.nbytes for t in tensors.values()) <= 20_000
        assert not set(tensors) & set(seen)
        seen.update(tensors)
    assert seen.keys() == whole.keys()
    for name in whole:
        np.testing.assert_array_equal(seen[name], whole[name])


def test_streamed_bf16_chunks_are_the_f32_weights_rounded(model):
    state = {}
    for body in export.iter_chunks(model, 1 << 16, dtype="bfloat16"):
        state.update(load_torch(body))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    f32 = export.to_hf_state_dict(model)
    assert state.keys() == f32.keys()
    for name, value in f32.items():
        torch.testing.assert_close(state[name], torch.from_numpy(value).bfloat16(), rtol=0, atol=0)


def test_llm_only_selection_and_full_vila_names(model):
    llm = export.to_hf_state_dict(model)
    assert all(n.startswith(("model.", "lm_head.")) for n in llm)
    assert "lm_head.weight" in llm
    full = export.to_hf_state_dict(model, export.COMPONENTS)
    assert set(llm) < set(full)
    assert any(n.startswith("vision_tower.vision_model.") for n in full)
    assert any(n.startswith("mm_projector.layers.") for n in full)


def test_full_vila_directory_reloads(model, tokenizer, tmp_path):
    from lvr_jax.model import load_pretrained
    export.export_dir(model, str(tmp_path), tokenizer, llm_only=False)
    again = load_pretrained(str(tmp_path))
    ids = tokenizer.encode("cat")
    np.testing.assert_allclose(jax_logits(again, ids), jax_logits(model, ids), atol=1e-6)


def test_unknown_dtype_is_refused(model):
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        list(export.iter_chunks(model, dtype="int8"))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_push_chunks_are_safetensors_whose_transposed_kernels_read_as_the_hf_tensors(model,
                                                                                      dtype):
    from rollout_bridge.store import parse_weight_chunk
    state = {}
    for parts in export.iter_weight_chunks(model, 20_000, dtype=dtype):
        body = b"".join(parts)
        assert load_torch(body).keys() == parse_weight_chunk(bytearray(body)).keys()
        state.update(parse_weight_chunk(bytearray(body)))
    f32 = export.to_hf_state_dict(model)
    assert state.keys() == f32.keys()
    for name, value in f32.items():
        want = torch.from_numpy(value).to(torch.bfloat16 if dtype else torch.float32)
        torch.testing.assert_close(state[name], want, rtol=0, atol=0)

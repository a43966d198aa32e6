"""A LongVILA assembled from a SigLIP folder and a Qwen2 folder loads here and in transformers."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from lvr_jax.model import load_pretrained
from lvr_jax.model.assemble import VILA_TOKENS, assemble
from lvr_jax.model.checkpoint import CheckpointError
from tests import hf_reference
from tests.hf_reference import rel_err

QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["The red circle moves left.\n", "Which object appeared first?\n", "0 1 2 3 4 5\n"] * 4


def qwen2_tokenizer(directory):
    """A tiny byte-level BPE with Qwen2's chat tokens and none of VILA's, as a Qwen2 has."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=QWEN2_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def qwen2_dir(path, tied: bool):
    tok = qwen2_tokenizer(path)
    llm = hf_reference.qwen2(vocab_size=len(tok), hidden=32, heads=4, kv_heads=1, tied=tied,
                             seed=11).to(torch.bfloat16)
    llm.save_pretrained(path)
    return llm, tok


def siglip_dir(path, full: bool):
    """A SiglipVisionModel with its head, or a whole SiglipModel (text tower too)."""
    vision = hf_reference.siglip(hidden=24, heads=2, layers=2, image_size=28, use_head=None,
                                 seed=12)
    if not full:
        vision.save_pretrained(path)
        return vision
    config = transformers.SiglipConfig(
        vision_config=vision.config.to_dict(),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1))
    model = transformers.SiglipModel(config).eval()
    hf_reference.randomize(model, seed=13)
    model.save_pretrained(path)
    return model.vision_model


def features(vision, frames):
    with torch.no_grad():
        return vision(torch.from_numpy(frames).permute(0, 3, 1, 2),
                      output_hidden_states=True).hidden_states[-2].numpy()


@pytest.mark.parametrize("full_siglip, tied", [(False, False), (True, True)],
                         ids=["vision-model+untied", "siglip-model+tied"])
def test_assembled_longvila_loads_here_and_in_transformers(tmp_path, full_siglip, tied):
    vision = siglip_dir(tmp_path / "siglip", full_siglip)
    llm, tok = qwen2_dir(tmp_path / "qwen2", tied)
    config = assemble(str(tmp_path / "siglip"), str(tmp_path / "qwen2"), str(tmp_path / "out"),
                      seed=3)
    known = len(tok)
    assert config.llm.vocab_size == known + len(VILA_TOKENS)

    model = load_pretrained(str(tmp_path / "out"))
    hf_llm = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out" / "llm")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "llm")
    hf_vision = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out" / "vision_tower")
    assert hf_llm.dtype == torch.bfloat16 and hf_tok.convert_tokens_to_ids(
        "<vila/video>") == model.config.video_token_id == known + 2
    assert hf_tok.encode("<vila/video>\n<image>", add_special_tokens=False)[:1] == [known + 2]

    ids = np.asarray([tok.encode("Which object appeared first?")])
    with torch.no_grad():
        before = llm(torch.from_numpy(ids)).logits.float().numpy()
        after = hf_llm(torch.from_numpy(ids)).logits.float().numpy()
    for name, value in llm.state_dict().items():  # every old weight and row as it was
        assert torch.equal(hf_llm.state_dict()[name][:value.shape[0]], value), name
    assert rel_err(after[..., :known], before) < 2e-2  # bf16 matmuls of other shapes
    assert rel_err(model.llm(jnp.asarray(ids))[..., :known], before) < 2e-2  # bf16 weights

    tables = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if not tied or "embed" in n]
    written = load_file(tmp_path / "out" / "llm" / "model.safetensors")
    for name in tables:
        table = written[name].astype(np.float32)
        mean = llm.state_dict()[name].float().numpy().mean(0)
        np.testing.assert_allclose(table[known:], np.broadcast_to(mean, (3, mean.size)),
                                   rtol=1e-2, atol=1e-3)

    frames = np.random.default_rng(4).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
    np.testing.assert_array_equal(features(hf_vision.eval(), frames), features(vision, frames))
    assert rel_err(model.vision_tower(jnp.asarray(frames)), features(vision, frames)) < 1e-5
    assert model.encode_video(jnp.asarray(frames)).shape == (2 * config.tokens_per_frame, 32)


def test_projector_is_fresh_and_seeded(tmp_path):
    siglip_dir(tmp_path / "siglip", full=False)
    qwen2_dir(tmp_path / "qwen2", tied=True)
    outs = []
    for seed, name in ((5, "a"), (5, "b"), (6, "c")):
        assemble(str(tmp_path / "siglip"), str(tmp_path / "qwen2"), str(tmp_path / name), seed=seed)
        outs.append(load_file(tmp_path / name / "mm_projector" / "model.safetensors"))
    assert outs[0].keys() == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    np.testing.assert_array_equal(outs[0]["layers.2.weight"], outs[1]["layers.2.weight"])
    assert not np.array_equal(outs[0]["layers.2.weight"], outs[2]["layers.2.weight"])
    assert str(outs[0]["layers.2.weight"].dtype) == "bfloat16"  # the LLM's stored dtype


def test_llm_folder_that_is_not_qwen2_is_named(tmp_path):
    siglip_dir(tmp_path / "siglip", full=False)
    qwen2_dir(tmp_path / "qwen2", tied=True)
    config = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    (tmp_path / "qwen2" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"'model_type' of '.*qwen2/config.json' is 'llama'"):
        assemble(str(tmp_path / "siglip"), str(tmp_path / "qwen2"), str(tmp_path / "out"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lvr_jax.model.assemble", *args],
                          capture_output=True, text=True, timeout=300)


def test_command_line_writes_a_loadable_directory_and_names_bad_inputs(tmp_path):
    siglip_dir(tmp_path / "siglip", full=True)
    qwen2_dir(tmp_path / "qwen2", tied=False)
    out = run_cli("--vision", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen2"),
                  "--projector", "mlp_downsample_3x3_fix", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert "added ['<vila/sentinel>', '<image>', '<vila/video>']" in out.stderr
    assert load_pretrained(str(tmp_path / "out")).config.projector_type == "mlp_downsample_3x3_fix"
    again = run_cli("--vision", str(tmp_path / "nowhere"), "--llm", str(tmp_path / "qwen2"),
                    "--out", str(tmp_path / "out2"))
    assert again.returncode == 2
    assert f"--vision '{tmp_path / 'nowhere'}' is not a folder with a config.json" in again.stderr
    taken = run_cli("--vision", str(tmp_path / "siglip"), "--llm", str(tmp_path / "qwen2"),
                    "--out", str(tmp_path / "out"))
    assert taken.returncode == 2 and "already holds files" in taken.stderr

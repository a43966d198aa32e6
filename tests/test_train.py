"""The training entrypoint end to end: resume after SIGKILL, NaN handling, GRPO mechanics."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from lvr_jax import train
from lvr_jax.model import save_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(workdir, data, steps):
    overrides = [f"--config.data.records={data}/train.jsonl", f"--config.data.video_root={data}",
                 f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
                 "--config.model.llm.hidden_size=64", "--config.model.llm.num_hidden_layers=2",
                 "--config.model.llm.intermediate_size=128", "--config.data.num_frames=8",
                 "--config.data.batch_size=4", "--config.drills.steps=0"]
    return [sys.executable, "-m", "lvr_jax.train", "--config=configs/demo.py:sft",
            f"--workdir={workdir}", *overrides]


def exported(workdir):
    return load_file(os.path.join(workdir, "model", "llm", "model.safetensors"))


def steps_logged(workdir):
    path = os.path.join(workdir, "sft_metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max((json.loads(line)["step"] for line in f if line.strip()), default=0)


def test_sigkill_mid_run_then_resume_ends_with_identical_parameters(tmp_path, synthetic_set):
    steps = 7
    straight = tmp_path / "straight"
    subprocess.run(train_command(straight, synthetic_set, steps), cwd=ROOT, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(killed, synthetic_set, steps), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while steps_logged(killed) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert steps_logged(killed) < steps, "the run finished before it could be killed"
    out = subprocess.run(train_command(killed, synthetic_set, steps), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed sft from step" in out.stderr
    a, b = exported(straight), exported(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_nonfinite_loss_skips_updates_then_stops_with_a_checkpoint(tmp_path, tiny_train_config):
    config = tiny_train_config("sft", 10)
    tokenizer, model = train.build_model(config)
    norm = model.llm.norm.scale
    norm.set_value(norm.get_value().at[0].set(jnp.nan))  # a corrupt weight: every loss is NaN
    save_pretrained(model, str(tmp_path / "corrupt"), tokenizer=tokenizer)
    config.model.init = str(tmp_path / "corrupt")
    config.train.max_nonfinite_steps = 3
    with pytest.raises(SystemExit, match="3 non-finite steps in a row at step 3; stopped with a checkpoint"):
        train.run(config, str(tmp_path / "run"))
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
    rows = [json.loads(line) for line in open(tmp_path / "run" / "sft_metrics.jsonl")]
    assert [r["finite"] for r in rows] == [0.0, 0.0, 0.0]


def test_grpo_rollout_logprobs_match_the_training_forward_and_only_the_llm_moves(tiny_train_config):
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("grpo", 1)
    config.rl.temperature = 0.8
    tokenizer, model = train.build_model(config)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(train.data_config(config, model), tokenizer)))
    rollout, metrics = learner.rollout(batch, jax.random.key(0))
    rollout, logprob_metrics = learner.add_logprobs(rollout)
    mask = np.asarray(rollout["response_mask"]) > 0
    np.testing.assert_allclose(np.asarray(rollout["old_logp"])[mask],
                               np.asarray(rollout["rollout_logp"])[mask], atol=2e-5)
    assert logprob_metrics["logprob_mismatch"] < 2e-5
    assert rollout["tokens"].shape == (4 * 4, 24)
    learner.update(rollout, jax.random.key(1))
    after = jax.tree.map(np.asarray, nnx.state(learner.state.model(), nnx.Param))
    moved = {jax.tree_util.keystr(p): not np.array_equal(x, y) for (p, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves_with_path(after))}
    assert not any(v for k, v in moved.items() if "vision_tower" in k or "mm_projector" in k)
    assert not moved["['llm']['embed_tokens'].value"]
    assert any(v for k, v in moved.items() if "['llm']['layers']" in k)


def test_grpo_logs_heldout_accuracy_every_eval_every_steps(tmp_path, tiny_train_config,
                                                           synthetic_set):
    from lvr_jax.data.schema import load_eval_records
    from lvr_jax.eval.evaluate import evaluate
    from lvr_jax.model import load_pretrained

    config = tiny_train_config("grpo", 3)
    config.eval.update(every=2, val_size=6, max_new_tokens=24, batch_size=4)
    train.run(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "grpo_metrics.jsonl")]
    logged = {r["step"]: r["val_accuracy"] for r in rows if "val_accuracy" in r}
    assert sorted(logged) == [0, 2, 3]  # before training, every 2 steps, and the last step
    assert "update_alignment" in rows[-1] and "mixed_groups" in rows[-1]
    # The last figure is the exported model's greedy accuracy on the first 6 val questions.
    model = load_pretrained(str(tmp_path / "run" / "model"))
    tokenizer, _ = train.build_model(config)
    records = load_eval_records(os.path.join(synthetic_set, "val.jsonl"))[:6]
    result = evaluate(model, tokenizer, train.data_config(config, model), 24, progress=False,
                      records=records)
    assert logged[3] == pytest.approx(result.accuracy)

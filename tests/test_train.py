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

from lvr_jax import build, trainer
from lvr_jax.eval.validation import Validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STAGE_OVERRIDES = {
    "sft": ["--config.drills.steps=0"],
    "grpo": ["--config.model.allow_random_init=True", "--config.eval.every=0",
             "--config.rl.num_generations=4", "--config.rl.max_new_tokens=24",
             "--config.rl.update_batch_size=2"],
}


def train_command(workdir, data, steps, stage="sft"):
    overrides = [f"--config.data.records={data}/train.jsonl", f"--config.data.video_root={data}",
                 f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
                 "--config.model.llm.hidden_size=64", "--config.model.llm.num_hidden_layers=2",
                 "--config.model.llm.intermediate_size=128", "--config.data.num_frames=8",
                 "--config.data.batch_size=4", *STAGE_OVERRIDES[stage]]
    return [sys.executable, "-m", "lvr_jax.train", f"--config=configs/demo.py:{stage}",
            f"--workdir={workdir}", *overrides]


def exported(workdir):
    return load_file(os.path.join(workdir, "model", "llm", "model.safetensors"))


def logged_steps(workdir, stage="sft"):
    path = os.path.join(workdir, f"{stage}_metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]


@pytest.mark.parametrize("stage, steps", [("sft", 7), ("grpo", 5)])
def test_sigkill_mid_run_then_resume_ends_with_identical_parameters(tmp_path, synthetic_set,
                                                                    stage, steps):
    """GRPO resumes its data iterator, its per-step RNG and (from model.init) its reference."""
    straight = tmp_path / "straight"
    subprocess.run(train_command(straight, synthetic_set, steps, stage), cwd=ROOT, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(killed, synthetic_set, steps, stage), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while max(logged_steps(killed, stage), default=0) < steps - 3 and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(logged_steps(killed, stage)) < steps, "the run finished before it could be killed"
    out = subprocess.run(train_command(killed, synthetic_set, steps, stage), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed {stage} from step" in out.stderr
    assert logged_steps(killed, stage) == list(range(1, steps + 1))  # re-run steps once
    a, b = exported(straight), exported(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _host_copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _trees_equal(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nonfinite_batches_skip_the_update_reset_after_a_finite_step_and_stop_after_k(
        tmp_path, tiny_train_config):
    """Healthy weights; a batch whose video features are NaN (as a damaged cache entry would
    give) makes the loss non-finite."""
    config = tiny_train_config("sft", 10)
    config.train.max_nonfinite_steps = 3
    run = trainer.Run(config, str(tmp_path / "run"))
    clean_batch, poisoned = run.learner.device_batch, {"on": False}

    def device_batch(batch):
        out = clean_batch(batch)
        return {**out, "video_features": out["video_features"] * jnp.nan} if poisoned["on"] else out

    run.learner.device_batch = device_batch
    state = run.learner.state
    for finite in (False, False, True):  # two skipped, then a good step resets the count
        poisoned["on"] = not finite
        before = _host_copy((state.trainable, state.opt_state))
        out = run.step_once()
        after = _host_copy((state.trainable, state.opt_state))
        assert bool(out["finite"]) == finite and _trees_equal(before, after) == (not finite)
        assert np.isfinite(jax.tree.leaves(after)[0]).all()
    assert run.guard.in_a_row == 0 and state.step == 3
    poisoned["on"] = True
    with pytest.raises(SystemExit, match="3 non-finite steps in a row at step 6; stopped with a "
                                         "checkpoint"):
        run.run()
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "6")


def test_grpo_rollout_logprobs_match_the_training_forward_and_only_the_llm_moves(tiny_train_config):
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("grpo", 1)
    config.rl.temperature = 0.8
    tokenizer, model = build.build_model(config)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    rollout, metrics = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
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
    trainer.run(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "grpo_metrics.jsonl")]
    logged = {r["step"]: r["val_accuracy"] for r in rows if "val_accuracy" in r}
    assert sorted(logged) == [0, 2, 3]  # before training, every 2 steps, and the last step
    assert "update_alignment" in rows[-1] and "mixed_groups" in rows[-1]
    # The last figure is the exported model's greedy accuracy on the first 6 val questions.
    model = load_pretrained(str(tmp_path / "run" / "model"))
    tokenizer, _ = build.build_model(config)
    records = load_eval_records(os.path.join(synthetic_set, "val.jsonl"))[:6]
    result = evaluate(model, tokenizer, build.data_config(config, model), 24, progress=False,
                      records=records)
    assert logged[3] == pytest.approx(result.accuracy)


def test_validation_during_training_grades_with_eval_scorer(tiny_train_config):
    from lvr_jax.config import ConfigError

    config = tiny_train_config("grpo", 1)
    config.eval.update(every=1, val_size=2, scorer="official")
    tokenizer, model = build.build_model(config)
    validation = Validation(config, model, tokenizer)
    assert validation.evaluator.scorer == "official"
    assert 0 <= validation(model)["val_accuracy"] <= 1
    config.eval.scorer = "exact"
    with pytest.raises(ConfigError, match="eval.scorer"):
        Validation(config, model, tokenizer)


def _cut_largest_array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _cut_meta(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty_state_metadata(step_dir):
    open(os.path.join(step_dir, "state", "_METADATA"), "w").close()


@pytest.fixture(scope="module")
def straight_sft_run(tmp_path_factory, synthetic_set):
    """4 SFT steps with checkpoints at 2 and 4: the reference for the damaged-checkpoint runs."""
    from lvr_jax.config import demo_config

    def config():
        c = demo_config("sft", synthetic_set, 4)
        c.model.llm.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        c.data.update(num_frames=8, batch_size=4)
        c.train.update(checkpoint_every=2, keep_checkpoints=10)
        c.drills.steps = 0
        return c

    workdir = str(tmp_path_factory.mktemp("straight"))
    trainer.run(config(), workdir)
    return workdir, config


@pytest.mark.parametrize("damage", [_cut_largest_array_file, _cut_meta, _empty_state_metadata])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
        tmp_path, straight_sft_run, damage, caplog):
    import shutil

    straight, config = straight_sft_run
    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(straight, "checkpoints"), workdir / "checkpoints")
    shutil.copy(os.path.join(straight, "sft_metrics.jsonl"), workdir / "sft_metrics.jsonl")
    damage(str(workdir / "checkpoints" / "4"))
    with caplog.at_level("WARNING"):
        trainer.run(config(), str(workdir))
    assert f"checkpoint step 4 ({workdir}/checkpoints/4) cannot be read" in caplog.text
    assert "resumed sft from step 2" in caplog.text
    (aside,) = os.listdir(tmp_path / "run" / "checkpoints_damaged")
    assert aside.startswith("4-") and os.listdir(workdir / "checkpoints_damaged" / aside)
    a, b = exported(straight), exported(workdir)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [json.loads(line)["step"] for line in open(workdir / "sft_metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # steps 3 and 4 were logged again, once


def test_grpo_without_an_init_model_is_refused_unless_asked_for(tmp_path, tiny_train_config):
    config = tiny_train_config("grpo", 1)
    config.model.allow_random_init = False
    with pytest.raises(ValueError, match="stage 'grpo' has no model.init"):
        trainer.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_run_whose_videos_are_all_missing_stops_with_the_records_and_root(tmp_path,
                                                                             tiny_train_config):
    config = tiny_train_config("sft", 3)
    config.data.video_root = str(tmp_path / "one_folder_too_deep")
    with pytest.raises(SystemExit) as stop:
        trainer.run(config, str(tmp_path / "run"))
    message = str(stop.value)
    assert "yielded no usable record" in message and config.data.records in message
    assert config.data.video_root in message and "does not exist" in message
    assert "stopped at step 0" in message


TSP_ENCODER = ('{"_target_": "llava.model.encoders.TSPVideoEncoder", '
               '"pool_sizes": [[4, 1, 1], [8, 2, 2]]}')


def test_dynamic_sampling_runs_the_log_prob_and_update_passes_on_mixed_groups_only(
        tiny_train_config):
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("grpo", 1)
    config.rl.update(dynamic_sampling=True, update_batch_size=1)
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    train, metrics = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    prompts, g = len(batch["ground_truth"]), config.rl.num_generations
    mixed = round(metrics["kept_groups"] * prompts)
    assert train["tokens"].shape[0] == max(mixed, 1) * g
    assert (np.asarray(train["loss_mask"]).sum() > 0) == (mixed > 0)
    train, _ = learner.add_logprobs(train)
    assert np.isfinite(float(learner.update(train, jax.random.key(1))["loss"]))


def test_token_mis_leaves_out_the_tokens_the_engine_made_too_unlikely(tiny_train_config):
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("grpo", 1)
    config.rl.update(rollout_correction="token-mis", correction_threshold=1.5)
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    train, _ = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    # as if the engine gave every other token 1 nat less: r = e > 1.5 there, about 1 elsewhere
    train["rollout_logp"] = train["rollout_logp"].at[:, ::2].add(-1.0)
    train, metrics = learner.add_logprobs(train)
    valid = np.asarray(train["response_mask"]) > 0
    kept = np.asarray(train["loss_mask"]) > 0
    assert not kept[:, ::2].any() and (kept[:, 1::2] == valid[:, 1::2]).all()
    assert metrics["corrected_tokens"] == pytest.approx(valid[:, ::2].sum() / valid.sum())
    assert metrics["mismatch_kl"] > 0.1 and metrics["ppl_ratio"] < 1.0
    assert np.isfinite(float(learner.update(train, jax.random.key(1))["loss"]))


def test_a_recipe_with_the_tsp_video_encoder_rolls_out_and_updates_on_pooled_videos(
        tiny_train_config):
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.rl.learner import GRPOLearner, abstract_batch
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = tiny_train_config("grpo", 1)
    config.model.video_encoder = TSP_ENCODER
    tokenizer, model = build.build_model(config)
    assert model.config.video_encoder.pools == ((4, 1, 1), (8, 2, 2))
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    rollout, _ = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    # 8 frames of a 2x2 token grid: 2 pooled frames of 4 cells + "\n", then 1 of 1 cell + "\n"
    video_tokens = model.config.num_video_tokens(8)
    assert video_tokens == 2 * 5 + 1 * 2
    prompt_len = np.asarray(batch["prompt_ids"]).shape[1] - 1 + video_tokens
    assert rollout["prompt_embeds"].shape[1] == prompt_len
    assert abstract_batch(config, model.config)["prompt_embeds"].shape[1] == (
        config.data.max_length - 1 + video_tokens)
    rollout, _ = learner.add_logprobs(rollout)
    metrics = learner.update(rollout, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("value, message", [
    (TSP_ENCODER.replace("[4, 1, 1]", "[3, 1, 1]"),
     r"config.data.num_frames: pool size \[3, 1, 1\] needs a multiple of 3 frames; the "
     r"video has 8"),
    ('{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]], "sep": 1}',
     "field 'sep' of config.model.video_encoder is 1"),
])
def test_a_video_encoder_the_recipe_cannot_run_is_a_usage_error(tiny_train_config, value,
                                                                 message):
    from lvr_jax.cli import CommandLineError

    config = tiny_train_config("grpo", 1)
    config.model.video_encoder = value
    with pytest.raises(CommandLineError, match=message):
        build.build_model(config)


class CountingData:
    """A grain-like iterator over 0, 1, 2, ... with get_state / set_state."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return self.position - 1

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_lookahead_saves_the_state_of_the_batches_handed_out_not_the_one_peeked():
    data = trainer.Lookahead(CountingData())
    assert [next(data), next(data)] == [0, 1] and data.peek() == 2
    state = data.get_state()
    assert state == {"position": 2}
    resumed = trainer.Lookahead(CountingData())
    resumed.set_state(state)
    assert next(resumed) == 2 and resumed.peek() == 3


def test_grpo_at_temperature_0_is_refused_before_it_starts(tiny_train_config):
    from lvr_jax.config import ConfigError
    from lvr_jax.rl.stage import check_sampling
    config = tiny_train_config("grpo", 1)
    config.rl.temperature = 0.0
    with pytest.raises(ConfigError, match="rl.temperature must be above 0"):
        check_sampling(config)
    config.rl.temperature = 0.7
    check_sampling(config)


def test_off_policy_needs_rollout_servers(tiny_train_config):
    from lvr_jax.config import ConfigError
    from lvr_jax.rl.stage import check_off_policy
    config = tiny_train_config("grpo", 1)
    config.rl.off_policy_steps = 1
    with pytest.raises(ConfigError, match="rl.off_policy_steps=1 .*rl.rollout.backend=server"):
        check_off_policy(config)
    config.rl.off_policy_steps = 2
    with pytest.raises(ConfigError, match="must be 0 or 1, got 2"):
        check_off_policy(config)
    config.rl.update(off_policy_steps=1)
    config.rl.rollout.update(backend="server", urls=["http://127.0.0.1:9"])
    check_off_policy(config)

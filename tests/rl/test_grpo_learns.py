"""GRPO optimises its reward: a loop that did not (a flipped advantage, a missing loss mask,
a skipped optimizer step) fails these tests.

1. From a short SFT that teaches the answer format with the true letters (so the model's
   letters are spread over A-D), GRPO on the same prompts whose ground truth is always "A"
   must raise the training reward from about chance to at least 0.8 in a bounded number
   of steps: the only way up is to write "A", which the reward alone teaches.
2. One `GRPOLearner.update` raises the log-probs of the responses with positive advantage
   and lowers those of the responses with negative advantage.
"""

import json
import os

import jax
import numpy as np
import pytest

from lvr_jax import build, trainer
from lvr_jax.data.pipeline import rl_dataset
from lvr_jax.metrics import read_metrics
from lvr_jax.rl.learner import GRPOLearner
from lvr_jax.sharding.embedding_cache import EmbeddingCache

GRPO_STEPS = 20  # the reward passes 0.8 near step 11 (seed 0) and stays there


def write_records(path, rows, answer_of):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "answer": answer_of(row)}) + "\n")


def letter_of(row) -> str:
    return row["answer"].split("<answer>")[1][0]


@pytest.fixture(scope="module")
def always_a(tmp_path_factory, synthetic_set):
    """(SFT records with short answers and true letters, RL records whose truth is 'A')."""
    out = tmp_path_factory.mktemp("always_a")
    rows = [json.loads(line) for line in open(os.path.join(synthetic_set, "train.jsonl"))]
    sft, rl = str(out / "sft.jsonl"), str(out / "rl.jsonl")
    write_records(sft, rows, lambda r: f"<think>It is {letter_of(r)}.</think>"
                                       f"<answer>{letter_of(r)}</answer>")
    write_records(rl, rows, lambda r: "<think>.</think><answer>A</answer>")
    return sft, rl


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, always_a, synthetic_set):
    """The tiny demo model after a short SFT: the format, letters spread over A-D."""
    from lvr_jax.config import demo_config

    workdir = str(tmp_path_factory.mktemp("sft"))
    config = tiny(demo_config("sft", synthetic_set, 60), always_a[0])
    config.optim.update(lr=3e-3, warmup_steps=10, decay_steps=60)
    trainer.run(config, workdir)
    return os.path.join(workdir, "model")


def tiny(config, records):
    config.data.update(records=records, num_frames=8, batch_size=8)
    config.model.llm.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    config.drills.steps = 0
    config.data.categories = ()  # the records of every category (the demo's GRPO: three)
    config.train.update(checkpoint_every=1000, keep_checkpoints=1)
    return config


def grpo_config(synthetic_set, records, init, steps=GRPO_STEPS):
    from lvr_jax.config import demo_config

    config = tiny(demo_config("grpo", synthetic_set, steps), records)
    config.model.init = init
    config.optim.update(lr=1e-3, schedule="constant", warmup_steps=0)
    config.rl.update(num_generations=8, max_new_tokens=64, update_batch_size=4, kl_coef=0.0)
    return config


def test_grpo_learns_to_answer_a_when_a_is_always_right(tmp_path, always_a, sft_model,
                                                          synthetic_set):
    config = grpo_config(synthetic_set, always_a[1], sft_model)
    trainer.run(config, str(tmp_path))
    rows = read_metrics(str(tmp_path / "grpo_metrics.jsonl"))
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.55, f"the SFT model already answers A: reward {first:.2f}"
    assert last >= 0.8, f"reward {first:.2f} -> {last:.2f} in {GRPO_STEPS} steps: {rewards}"
    assert np.mean([r["update_alignment"] for r in rows if "update_alignment" in r]) > 0


def test_one_update_raises_positive_and_lowers_negative_advantage_responses(always_a, sft_model,
                                                                          synthetic_set):
    config = grpo_config(synthetic_set, always_a[1], sft_model, steps=1)
    config.optim.lr = 3e-4
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    rollout, metrics = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    assert 0 < metrics["mixed_groups"] and metrics["pass_at_g"] > 0, metrics
    rollout, _ = learner.add_logprobs(rollout)
    metrics = learner.update(rollout, jax.random.key(1))
    metrics.update(learner.measure_update(rollout))
    new_logp = np.asarray(learner.sequence_logprobs(learner.state.trainable, rollout))
    mask = np.asarray(rollout["response_mask"])
    shift = ((new_logp - np.asarray(rollout["old_logp"])) * mask).sum(1) / mask.sum(1)
    advantages = np.asarray(rollout["advantages"])
    assert shift[advantages > 0].mean() > 0 > shift[advantages < 0].mean(), (shift, advantages)
    np.testing.assert_allclose(metrics["update_alignment"],
                               shift[advantages > 0].mean() - shift[advantages < 0].mean(),
                               rtol=1e-4)


def test_tokens_outside_the_loss_mask_do_not_change_the_update(always_a, sft_model, synthetic_set):
    """Whatever stands after a response's stop token (or in a group dynamic sampling drops)
    carries no gradient: the update is the same when those tokens are replaced."""
    import jax.numpy as jnp

    config = grpo_config(synthetic_set, always_a[1], sft_model, steps=1)
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    rollout, _ = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    rollout, _ = learner.add_logprobs(rollout)
    outside = np.asarray(rollout["loss_mask"]) == 0
    assert outside.any()
    noise = np.random.default_rng(0).integers(0, tokenizer.vocab_size, outside.shape)
    changed = {**rollout, "tokens": jnp.asarray(np.where(outside, noise, rollout["tokens"]))}
    start = jax.tree.map(jnp.copy, (learner.state.trainable, learner.state.opt_state))

    def updated(train_batch):
        learner.state.trainable, learner.state.opt_state = jax.tree.map(jnp.copy, start)
        learner.update(train_batch, jax.random.key(1))
        return jax.tree.map(np.asarray, learner.state.trainable)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 updated(rollout), updated(changed))

"""The shortened demo: SFT teaches the answer format, then GRPO's update follows the scores.

Twelve small GRPO updates of a model near chance mostly sharpen its sampling, whatever the
scores say, and which way that moves the mean reward differs between machines (the same
seed on two machines: +0.091 on one, -0.040 on another, where the float sums differ). So the
test is a controlled experiment run side by side: GRPO with the real scores against GRPO
with each rollout batch's scores shuffled among its responses (the same update machinery,
advantages unrelated to the answers), from the same SFT model with the same seeds, both
measured on the same training prompts with the same sampling seed. Only the scores differ
between the two arms, so the sharpening cancels and what remains is what the scores taught.
"""

import dataclasses
import os

import jax
import numpy as np

from lvr_jax import build, trainer
from lvr_jax.data.pipeline import rl_dataset
from lvr_jax.rl import rewards as reward_lib
from lvr_jax.rl.learner import GRPOLearner
from lvr_jax.sharding.embedding_cache import EmbeddingCache


# The real-score arm's mean reward must beat the shuffled-score arm's by this much. Measured
# on this test (2026-12-06, 8 simulated devices), seeds 0-3: real 0.186, 0.345, 0.218,
# 0.280 against shuffled 0.092, 0.004, 0.000, 0.178 (gaps 0.09 to 0.34; the test runs 0).
SCORES_MARGIN = 0.05
SEED = 0


def mean_training_reward(config, batches: int = 3, seed: int = 7) -> float:
    """Mean reward of G samples for each of the first training prompts, fixed seed."""
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    data = build.data_config(config, model)
    data = dataclasses.replace(data, shuffle=False, num_workers=0)
    rewards = []
    for i, batch in zip(range(batches), rl_dataset(data, tokenizer)):
        metrics = learner.rollout.collect(learner.state.model(), batch, jax.random.key(seed + i))[1]
        rewards.append(metrics["reward"])
    return float(np.mean(rewards))


def shuffle_scores(monkeypatch, seed: int = 0) -> None:
    """From now on each rollout batch's scores are permuted among its responses (their mean,
    what `mean_training_reward` reads, stays the batch's true mean reward)."""
    order = np.random.default_rng(seed)
    score_responses = reward_lib.score_responses

    def shuffled(*args, **kwargs):
        parts = score_responses(*args, **kwargs)
        return {**parts, "score": order.permutation(parts["score"])}
    monkeypatch.setattr(reward_lib, "score_responses", shuffled)


def grpo_arm(config, sft_model: str, workdir) -> float:
    """GRPO from the SFT model; the mean training reward after it."""
    config.model.init = sft_model
    trainer.run(config, str(workdir))
    config.model.init = str(workdir / "model")
    return mean_training_reward(config)


def test_grpo_raises_the_mean_reward_over_shuffled_scores(tmp_path, tiny_train_config,
                                                          monkeypatch):
    sft = tiny_train_config("sft", 120)
    sft.seed = SEED
    sft.optim.update(lr=3e-3, warmup_steps=10, decay_steps=120)
    trainer.run(sft, str(tmp_path / "sft"))

    def grpo():
        config = tiny_train_config("grpo", 12)
        config.seed = SEED
        config.optim.update(lr=1e-3)
        config.rl.update(num_generations=8, max_new_tokens=96, update_batch_size=4,
                         kl_coef=1e-2)
        return config
    sft_model = str(tmp_path / "sft" / "model")
    real = grpo_arm(grpo(), sft_model, tmp_path / "grpo")
    assert os.path.exists(tmp_path / "grpo" / "grpo_curves.png")
    shuffle_scores(monkeypatch)
    shuffled = grpo_arm(grpo(), sft_model, tmp_path / "shuffled")
    print(f"seed {SEED}: mean training reward after GRPO, real scores {real:.3f}, "
          f"shuffled {shuffled:.3f}")
    assert real - shuffled >= SCORES_MARGIN, (real, shuffled)

"""Gradient accumulation inside the jitted step (`optim.micro_batch_size`): an update over
micro-batches is the update over the whole batch (loss, metrics, gradient norm, weights),
for SFT and for GRPO under every loss aggregation."""

import jax
import numpy as np
import pytest
from flax import nnx

from lvr_jax import build
from lvr_jax.data.pipeline import rl_dataset, sft_dataset
from lvr_jax.rl.learner import GRPOLearner
from lvr_jax.sft.learner import SFTLearner
from lvr_jax.sharding.embedding_cache import EmbeddingCache


def params(learner):
    return [np.asarray(x, np.float64) for x in
            jax.tree.leaves(nnx.state(learner.state.model(), nnx.Param))]


def assert_same_update(whole, micro, metrics_whole, metrics_micro, keys):
    for k in keys:
        assert metrics_micro[k] == pytest.approx(metrics_whole[k], rel=1e-5, abs=1e-7), k
    # 1e-6 absolute: a thousandth of one Adam step at lr 1e-3 (a near-zero gradient's sign
    # follows the summation order; the streamed passes also recompute the old log-probs)
    for a, b in zip(params(whole), params(micro)):
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a) + 1e-6


def test_sft_micro_batches_give_the_whole_batch_update(tiny_train_config):
    learners, metrics = [], []
    for size in (0, 2):  # the tiny recipe's batch holds 4 sequences
        config = tiny_train_config("sft", 2)
        config.optim.update(micro_batch_size=size, warmup_steps=0)
        tokenizer, model = build.build_model(config)
        learner = SFTLearner(model, config, EmbeddingCache())
        batch = next(iter(sft_dataset(build.data_config(config, model), tokenizer)))
        metrics.append(learner.step(batch))
        learners.append(learner)
    for micro, m in zip(learners[1:], metrics[1:]):
        assert_same_update(learners[0], micro, metrics[0], m, ("loss", "grad_norm",
                                                               "target_tokens"))


def grpo_pass(config, update: bool):
    """One rollout (+ log-probs, + an update with random advantages) of the tiny recipe."""
    tokenizer, model = build.build_model(config)
    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    batch = next(iter(rl_dataset(build.data_config(config, model), tokenizer)))
    train, _ = learner.rollout.collect(learner.state.model(), batch, jax.random.key(0))
    # advantages that are not zero (a random model's rewards all equal): the update moves
    train["advantages"] = jax.random.normal(jax.random.key(1), train["advantages"].shape)
    train, _ = learner.add_logprobs(train)
    metrics = learner.update(train, jax.random.key(2)) if update else {}
    return train, metrics, learner


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_micro_batches_give_the_whole_batch_update(tiny_train_config, agg):
    """In the step (`lax.scan`) and streamed (`rl.offload_prompts`: each micro-batch a pass
    of its own, its prompts copied from host memory, `training.StreamedUpdate`)."""
    runs = []
    # updates of 2 prompts x 4 samples: two sequences at a time (the in-step split is the same
    # function whatever the aggregation: tested once)
    ways = ((0, False), (2, False), (2, True)) if agg == "token-mean" else ((0, False), (2, True))
    for size, offload in ways:
        config = tiny_train_config("grpo", 1)
        config.rl.update(temperature=1.0, loss_agg=agg, kl_coef=0.1, offload_prompts=offload)
        config.optim.update(micro_batch_size=size, warmup_steps=0, lr=1e-3)
        runs.append(grpo_pass(config, update=True))
    (_, whole_metrics, whole), *micro_runs = runs
    assert whole_metrics["grad_norm"] > 0
    assert [run[2].streamed is not None for run in runs] == [offload for _, offload in ways]
    for _, micro_metrics, micro in micro_runs:
        assert_same_update(whole, micro, whole_metrics, micro_metrics,
                           ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "grad_norm"))


def test_a_batch_that_does_not_split_is_refused(tiny_train_config):
    config = tiny_train_config("sft", 1)
    config.optim.micro_batch_size = 3
    tokenizer, model = build.build_model(config)
    learner = SFTLearner(model, config, EmbeddingCache())
    batch = next(iter(sft_dataset(build.data_config(config, model), tokenizer)))
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        learner.step(batch)


def test_rollouts_and_passes_in_chunks_with_prompts_on_the_host_equal_the_whole(
        tiny_train_config):
    """`rl.rollout.prompts_per_chunk` and `rl.logprob_prompts`: greedy samples and old-policy
    log-probs of a rollout batch embedded and sampled a prompt at a time are those of the
    whole batch at once; `rl.offload_prompts`: with the prompt embeddings kept in host
    memory between passes the samples, log-probs and update are those kept on the device."""
    def config(chunk, offload, temperature):
        c = tiny_train_config("grpo", 1)
        c.rl.update(temperature=temperature, logprob_prompts=chunk, offload_prompts=offload)
        c.rl.rollout.prompts_per_chunk = chunk
        c.optim.update(warmup_steps=0, lr=1e-3)
        return c

    whole, _, _ = grpo_pass(config(0, False, 0.0), update=False)
    chunked, _, _ = grpo_pass(config(1, False, 0.0), update=False)
    np.testing.assert_array_equal(np.asarray(chunked["tokens"]), np.asarray(whole["tokens"]))
    mask = np.asarray(whole["response_mask"]) > 0
    np.testing.assert_allclose(np.asarray(chunked["old_logp"])[mask],
                               np.asarray(whole["old_logp"])[mask], atol=1e-5)

    (on_device, m_device, l_device), (on_host, m_host, l_host) = (
        grpo_pass(config(1, offload, 1.0), update=True) for offload in (False, True))
    assert isinstance(on_host["prompt_embeds"], np.ndarray)
    assert not isinstance(on_device["prompt_embeds"], np.ndarray)
    np.testing.assert_array_equal(np.asarray(on_host["tokens"]), np.asarray(on_device["tokens"]))
    assert_same_update(l_device, l_host, m_device, m_host, ("loss", "kl", "grad_norm"))

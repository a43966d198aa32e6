"""GRPO learner: a step is rollout -> log-probs -> update -> measure, read top to bottom.

Per rollout batch of P prompts (`rl/rollout.py`): each video is encoded once (embedding
cache), each prompt prefilled once and sampled G times by the rollout engine (whose weights
the rollout syncs first), the responses scored and advantages taken per group; then the
old-policy and reference log-probs and the optimizer steps run over the passes of
`rl/passes.py`, which reuse the same prompt embeddings. Only the LLM trains; vision tower,
projector and token embeddings stay frozen.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax import training
from lvr_jax.model.vlm import LongVILA
from lvr_jax.rl import grpo
from lvr_jax.rl.engines import JaxEngine, RolloutEngine
from lvr_jax.rl.passes import Passes, groups_per_micro_batch, split_micro_batches
from lvr_jax.rl.rollout import Rollout, step_rng
from lvr_jax.sharding import forwards
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.prompts import PromptPlacement
from lvr_jax.sharding.video_embeddings import VideoEmbedder
from lvr_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static knobs of the GRPO loss, taken from a recipe's `rl` section by `of`."""

    temperature: float
    clip_low: float
    clip_high: float
    dual_clip: float | None
    loss_agg: str
    norm_length: int | None  # Dr.GRPO's `*-norm` aggregation divides by rl.max_new_tokens
    kl_coef: float
    kl_kind: str

    @classmethod
    def of(cls, rl) -> "LossConfig":
        return cls(temperature=rl.temperature, clip_low=rl.clip_low, clip_high=rl.clip_high,
                   dual_clip=rl.dual_clip, loss_agg=rl.loss_agg,
                   norm_length=rl.max_new_tokens if rl.loss_agg.endswith("norm") else None,
                   kl_coef=rl.kl_coef, kl_kind=rl.kl_kind)


def batch_logprobs(logprobs_fn, llm, batch: dict, temperature: float):
    """`forwards.response_logprobs_fn`'s function on a pass's batch (prompts, prompt_index,
    tokens, response_mask)."""
    return logprobs_fn(llm, batch["prompt_embeds"], batch["prompt_valid"], batch["prompt_index"],
                       batch["tokens"], batch["response_mask"], temperature)


def grpo_loss(model: LongVILA, batch: dict, cfg: LossConfig, logprobs_fn):
    """Clipped surrogate (weighted by the rollout correction) plus k3 KL to the reference,
    over the response tokens the loss keeps."""
    logp, entropy = batch_logprobs(logprobs_fn, model.llm, batch, cfg.temperature)
    mask = batch["loss_mask"]
    totals = batch.get("totals")  # the whole batch's, in a micro-batch (passes.loss_totals)
    terms, clipped = grpo.policy_loss_terms(logp, batch["old_logp"], batch["advantages"],
                                            cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    # pg_weight: the rollout correction (1 without one; rejected tokens are out of the mask)
    pg_loss = grpo.aggregate(terms * batch["pg_weight"], mask, cfg.loss_agg, cfg.norm_length,
                             totals)
    token_mean = lambda x: grpo.aggregate(x.astype(jnp.float32), mask, totals=totals)  # noqa: E731
    kl = token_mean(grpo.kl_penalty(logp, batch["ref_logp"], cfg.kl_kind))
    return pg_loss + cfg.kl_coef * kl, {"pg_loss": pg_loss, "kl": kl,
                                        "clip_fraction": token_mean(clipped),
                                        "entropy": token_mean(entropy)}


def trainable_filter(config):
    """Only the LLM trains, its token embeddings frozen unless `rl.freeze_embeddings` is off."""
    return training.param_filter(["llm"],
                                 ["llm.embed_tokens"] if config.rl.freeze_embeddings else [])


def micro_batches(config) -> training.MicroBatches | None:
    return training.micro_batching(config.optim, split_micro_batches)


def streams_update(config) -> bool:
    """Whether the update's micro-batches are passes of their own, each copying its prompts
    from host memory (`training.StreamedUpdate`): under `rl.offload_prompts` with
    `optim.micro_batch_size` set (an update's prompts at 4,096 frames would take 115 GiB of
    each of 8 devices); else the micro-batches are summed inside one jitted step."""
    return config.rl.offload_prompts and micro_batches(config) is not None


def make_loss_fn(config, mesh=None):
    return functools.partial(grpo_loss, cfg=LossConfig.of(config.rl),
                             logprobs_fn=forwards.response_logprobs_fn(mesh, config.mesh))


def abstract_batch(config, model_config, mesh=None, prompts: int = 0,
                   micro: bool = False) -> dict:
    """Shapes of one update mini-batch of `prompts` prompts (default update_batch_size) with
    their G samples each, for compiling a recipe without data; `micro`: one streamed
    micro-batch (its whole groups, with the whole update's loss denominators)."""
    rl = config.rl
    if micro:
        prompts = groups_per_micro_batch(config.optim.micro_batch_size, rl.num_generations)
    p, m = prompts or rl.update_batch_size, rl.max_new_tokens
    n = p * rl.num_generations
    t = config.data.max_length - 1 + model_config.num_video_tokens(config.data.num_frames)
    t = PromptPlacement(mesh, config.mesh.rules).length(t)
    sds = jax.ShapeDtypeStruct
    per_token = {k: sds((n, m), jnp.float32) for k in
                 ("response_mask", "loss_mask", "old_logp", "ref_logp", "pg_weight")}
    batch = {"prompt_embeds": sds((p, t, model_config.llm.hidden_size),
                                  jnp.dtype(model_config.dtype)),
             "prompt_valid": sds((p, t), jnp.bool_), "prompt_index": None,  # in groups
             "tokens": sds((n, m), jnp.int32), "advantages": sds((n,), jnp.float32), **per_token}
    if micro:
        batch["totals"] = (sds((), jnp.float32), sds((), jnp.float32))
    return batch


def _logprob_pass(logprobs_fn, temperature, trainable, frozen, graphdef, batch):
    llm = nnx.merge(graphdef, trainable, frozen).llm
    return batch_logprobs(logprobs_fn, llm, batch, temperature)[0]


class GRPOLearner:
    """`step(batch, upcoming=None)`: one rollout batch, then its updates; the step's metrics.

    `engine` samples the policy (default: the embedded JAX sampler on the learner's mesh)."""

    def __init__(self, model: LongVILA, config, tokenizer: Tokenizer, cache: EmbeddingCache,
                 mesh=None, engine: RolloutEngine | None = None):
        self.rl, self.seed = config.rl, config.seed
        self.tx = training.make_optimizer(config.optim)
        self.state = training.TrainState.create(model, trainable_filter(config), self.tx)
        # The frozen initial policy: a copy, since each update donates the trainable buffers.
        self.reference = jax.tree.map(jnp.copy, self.state.trainable)
        placement = PromptPlacement(mesh, config.mesh.rules, config.rl.offload_prompts)
        self.videos = VideoEmbedder(model, cache, mesh, config.mesh.rules)
        engine = engine or JaxEngine(tokenizer.pad_id,
                                     forwards.sampler_forwards(mesh, config.mesh))
        self.rollout = Rollout(config, tokenizer, self.videos, engine, placement)
        self.micro, loss_fn = micro_batches(config), make_loss_fn(config, mesh)
        self.passes = Passes(config.rl, placement, self.micro, streams_update(config))
        self._update = training.jit_update(self.tx, loss_fn, micro=self.micro)
        self.streamed = (training.StreamedUpdate(self.tx, loss_fn) if self.passes.streamed
                         else None)
        self._logprobs = jax.jit(functools.partial(
            _logprob_pass, forwards.response_logprobs_fn(mesh, config.mesh),
            config.rl.temperature), static_argnames="graphdef")

    @property
    def looks_ahead(self) -> bool:
        """Whether `step` wants the next batch early (`rl.off_policy_steps`: it generates
        while this one trains)."""
        return bool(self.rl.off_policy_steps)

    def step(self, batch: dict, upcoming: dict | None = None) -> dict:
        """Rollout of `batch` (see `Rollout` for `upcoming`), log-probs, update, measure."""
        s = self.state
        train, metrics = self.rollout(s.model(), s.step, batch, upcoming)
        train, logprob_metrics = self.add_logprobs(train)
        metrics = {**metrics, **logprob_metrics,
                   **self.update(train, jax.random.fold_in(step_rng(self.seed, s.step), 1))}
        if self.rl.measure_update:
            metrics.update(self.measure_update(train))
        return metrics

    def add_logprobs(self, train: dict) -> tuple[dict, dict]:
        """Old-policy and reference log-probs, computed once per rollout batch, and the
        rollout correction they give (`rl.rollout_correction`, `grpo.rollout_correction`).

        Also measures how far the rollout engine's log-probs are from the training
        forward's (a mismatch that grows means the engine and trainer disagree).
        """
        train["old_logp"] = self.sequence_logprobs(self.state.trainable, train)
        if self.rl.kl_coef > 0:
            train["ref_logp"] = self.sequence_logprobs(self.reference, train)
        else:
            train["ref_logp"] = train["old_logp"]
        old, engine, mask = train["old_logp"], train["rollout_logp"], train["loss_mask"]
        mode, threshold = self.rl.rollout_correction, self.rl.correction_threshold
        weights, keep = grpo.rollout_correction(old, engine, mask, mode, threshold)
        valid = mask > 0
        corrected = valid & (~keep | (weights >= threshold)) if mode != "none" else ~valid
        train["pg_weight"], train["loss_mask"] = weights, mask * keep
        metrics = grpo.mismatch_stats(old, engine, train["response_mask"])
        metrics["corrected_tokens"] = jnp.sum(corrected) / jnp.maximum(jnp.sum(valid), 1)
        return train, {k: float(v) for k, v in metrics.items()}

    def update(self, train: dict, rng) -> dict:
        """ppo_epochs passes over the prompts, shuffled, in chunks of update_batch_size
        prompts with their G samples each: one optimizer step per chunk."""
        s, history = self.state, []
        for epoch in range(self.rl.ppo_epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch),
                                                      self.passes.num_prompts(train)))
            for batch in self.passes.update_batches(train, order):
                if self.streamed is not None:
                    s.trainable, s.opt_state, m = self.streamed.step(
                        s.trainable, s.frozen, s.opt_state, s.graphdef, batch)
                else:
                    s.trainable, s.opt_state, m = self._update(
                        s.trainable, s.frozen, s.opt_state, graphdef=s.graphdef, batch=batch)
                history.append(m)
        s.step += 1
        return {k: np.mean([np.asarray(m[k]) for m in history]) for k in history[0]}

    def measure_update(self, train: dict) -> dict:
        """One more forward after the updates: did the responses with positive advantage
        gain log-prob and those with negative advantage lose it? (`grpo.update_alignment`)"""
        new_logp = self.sequence_logprobs(self.state.trainable, train)
        shift = grpo.update_alignment(train["old_logp"], new_logp, train["advantages"],
                                      train["loss_mask"])
        return {k: float(v) for k, v in shift.items()}

    def sequence_logprobs(self, trainable, train: dict) -> jax.Array:
        """Log-probs [N, M] of every sampled response under the LLM weights `trainable`,
        pass by pass (`Passes.logprob_batches`)."""
        s = self.state
        return jnp.concatenate([self._logprobs(trainable, s.frozen, graphdef=s.graphdef, batch=b)
                                for b in self.passes.logprob_batches(train)])

"""GRPO learner: rollouts from cached video embeddings, rule rewards, clipped updates.

Per rollout batch of P prompts: each video is encoded once (embedding cache), each prompt
prefilled once and sampled G times, responses scored, advantages taken per group, then
old-policy and reference log-probs and several optimizer steps reuse the same prompt
embeddings. Only the LLM trains; vision tower, projector and token embeddings stay frozen.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax import training
from lvr_jax.data.video import normalize_frames
from lvr_jax.model.sampler import Generation, SamplingParams, generate
from lvr_jax.model.vlm import LongVILA
from lvr_jax.rl import grpo, rewards
from lvr_jax.sharding import forwards, sequence
from lvr_jax.sharding.embedding_cache import EmbeddingCache, model_video_encoder
from lvr_jax.sharding.mesh import rules_of
from lvr_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static knobs of the GRPO loss (hashable: part of the jitted step)."""

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    loss_agg: str = "token-mean"
    norm_length: int | None = None
    kl_coef: float = 1e-2
    kl_kind: str = "k3"


def make_response_logprobs(mesh=None, mesh_config=None):
    """(llm, prompt_embeds, prompt_valid, tokens, response_mask, temperature) -> log-probs and
    entropies [N, M] of the response tokens under logits / temperature.

    Without a mesh a plain forward; with one the sequence runs sharded over `sp` and only the
    response window reaches the vocabulary projection, vocabulary-parallel and in chunks
    (`sharding.sequence.response_logprobs`), so no device holds [T, vocab] logits.
    """
    hidden_fn = forwards.hidden_fn(mesh, mesh_config)

    def response_logprobs(llm, prompt_embeds, prompt_valid, tokens, response_mask, temperature):
        t, m = prompt_embeds.shape[1], tokens.shape[1]
        x = jnp.concatenate([jax.lax.stop_gradient(prompt_embeds), llm.embed(tokens)], axis=1)
        valid = jnp.concatenate([prompt_valid, response_mask.astype(bool)], axis=1)
        hidden = hidden_fn(llm, x, valid)
        if mesh is None:
            logits = llm.logits(hidden[:, t - 1:t - 1 + m]) / temperature
            return sequence.logprobs_and_entropy(logits, tokens)
        return sequence.response_logprobs(llm, hidden, t - 1, tokens, mesh,
                                          rules_of(mesh_config), temperature)
    return response_logprobs


def gather_prompts(batch):
    """Prompt embeddings per sequence: [P, T, D] indexed by each sequence's prompt."""
    return batch["prompt_embeds"][batch["prompt_index"]], batch["prompt_valid"][batch["prompt_index"]]


def grpo_loss(model: LongVILA, batch: dict, cfg: LossConfig, logprobs_fn):
    """Clipped surrogate plus k3 KL to the reference, over the valid response tokens."""
    embeds, valid = gather_prompts(batch)
    logp, entropy = logprobs_fn(model.llm, embeds, valid, batch["tokens"],
                                batch["response_mask"], cfg.temperature)
    mask = batch["loss_mask"]
    terms, clipped = grpo.policy_loss_terms(logp, batch["old_logp"], batch["advantages"],
                                            cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    pg_loss = grpo.aggregate(terms, mask, cfg.loss_agg, cfg.norm_length)
    kl = grpo.aggregate(grpo.kl_penalty(logp, batch["ref_logp"], cfg.kl_kind), mask)
    token_mean = lambda x: grpo.aggregate(x.astype(jnp.float32), mask)  # noqa: E731
    return pg_loss + cfg.kl_coef * kl, {"pg_loss": pg_loss, "kl": kl,
                                        "clip_fraction": token_mean(clipped),
                                        "entropy": token_mean(entropy)}


def response_texts(tokenizer: Tokenizer, gen: Generation, stop_ids) -> list[str]:
    """Decoded responses without their stop token."""
    texts = []
    for tokens, length in zip(np.asarray(gen.tokens), np.asarray(gen.lengths)):
        tokens = tokens[:length]
        if length and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        texts.append(tokenizer.decode(tokens.tolist()))
    return texts


def score_responses(texts, lengths, truths, rl) -> dict[str, np.ndarray]:
    """Reward parts per response; `score` is what the advantages see."""
    acc = np.array([rewards.accuracy_reward(t, a) for t, a in zip(texts, truths)])
    fmt = np.array([rewards.format_reward(t) for t in texts])
    score = (1.0 - rl.format_weight) * acc + rl.format_weight * fmt
    if rl.overlong_buffer > 0:
        score = score + np.array([rewards.overlong_penalty(int(n), rl.max_new_tokens,
                                                           rl.overlong_buffer) for n in lengths])
    return {"score": score, "accuracy": acc, "format": fmt}


def trainable_filter(config):
    """Only the LLM trains, its token embeddings frozen unless `rl.freeze_embeddings` is off."""
    return training.param_filter(["llm"],
                                 ["llm.embed_tokens"] if config.rl.freeze_embeddings else [])


def loss_config(rl) -> LossConfig:
    norm_length = rl.max_new_tokens if rl.loss_agg.endswith("norm") else None
    return LossConfig(rl.temperature, rl.clip_low, rl.clip_high, rl.dual_clip, rl.loss_agg,
                      norm_length, rl.kl_coef, rl.kl_kind)


def make_loss_fn(config, mesh=None):
    return functools.partial(grpo_loss, cfg=loss_config(config.rl),
                             logprobs_fn=make_response_logprobs(mesh, config.mesh))


def abstract_batch(config, model_config) -> dict:
    """Shapes of one update mini-batch (for compiling a recipe without data)."""
    rl = config.rl
    p, n, m = rl.update_batch_size, rl.update_batch_size * rl.num_generations, rl.max_new_tokens
    t = config.data.max_length - 1 + model_config.num_video_tokens(config.data.num_frames)
    sds = jax.ShapeDtypeStruct
    per_token = {k: sds((n, m), jnp.float32) for k in
                 ("response_mask", "loss_mask", "old_logp", "ref_logp")}
    return {"prompt_embeds": sds((p, t, model_config.llm.hidden_size), jnp.dtype(model_config.dtype)),
            "prompt_valid": sds((p, t), jnp.bool_), "prompt_index": sds((n,), jnp.int32),
            "tokens": sds((n, m), jnp.int32), "advantages": sds((n,), jnp.float32), **per_token}


class GRPOLearner:
    """Rollout, score and update; `step(batch)` does one rollout batch and returns metrics."""

    def __init__(self, model: LongVILA, config, tokenizer: Tokenizer, cache: EmbeddingCache,
                 mesh=None, rollout_engine=None):
        self.config, self.rl, self.tokenizer = config, config.rl, tokenizer
        self.tx = training.make_optimizer(config.optim)
        self.state = training.TrainState.create(model, trainable_filter(config), self.tx)
        # The frozen initial policy: a copy, since each update donates the trainable buffers.
        self.reference = jax.tree.map(jnp.copy, self.state.trainable)
        self.encoder = model_video_encoder(model, cache)
        self.loss_cfg = loss_config(self.rl)
        self.response_logprobs = make_response_logprobs(mesh, config.mesh)
        self.prefill = forwards.prefill_fn(mesh, config.mesh)
        self._update = jax.jit(functools.partial(training.guarded_update, self.tx,
                                                 make_loss_fn(config, mesh)),
                               static_argnames="graphdef", donate_argnums=(0, 2))
        self._logprobs = jax.jit(self._logprobs_fn, static_argnames="graphdef")
        self._embed = jax.jit(lambda m, ids, video, valid: m.embed_inputs(ids, video, valid))
        self.rollout_engine = rollout_engine or self._jax_rollout
        self.stop_ids = (tokenizer.eos_id,)

    def sampling(self) -> SamplingParams:
        rl = self.rl
        return SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                              top_p=rl.top_p, top_k=rl.top_k, stop_token_ids=self.stop_ids,
                              num_samples=rl.num_generations)

    def _jax_rollout(self, model, prompt_embeds, prompt_valid, params, rng) -> Generation:
        return generate(model.llm, prompt_embeds, prompt_valid, params, rng,
                        pad_id=self.tokenizer.pad_id, prefill=self.prefill)

    def _logprobs_fn(self, trainable, frozen, graphdef, batch):
        llm = nnx.merge(graphdef, trainable, frozen).llm
        embeds, valid = gather_prompts(batch)
        return self.response_logprobs(llm, embeds, valid, batch["tokens"], batch["response_mask"],
                                      self.loss_cfg.temperature)[0]

    def _encode_each(self, frames_bfhwc) -> jax.Array:
        """Each video through the frozen encoder, bypassing the embedding cache."""
        return jnp.stack([self.encoder.encode(normalize_frames(f)) for f in frames_bfhwc])

    def _prompts_of(self, train: dict, prompt_index) -> dict:
        """Prompt embeddings and indices for a forward over the sequences of `prompt_index`.

        Shared rollout embeddings; with `rl.reencode_video` (the reference implementation's
        baseline) every sequence is its own prompt and its video is encoded again.
        """
        if not self.rl.reencode_video:
            return {"prompt_embeds": train["prompt_embeds"], "prompt_valid": train["prompt_valid"],
                    "prompt_index": prompt_index}
        index = np.asarray(prompt_index)
        embeds, valid = self._embed(self.state.model(), jnp.asarray(train["prompt_ids"][index]),
                                    self._encode_each(train["frames"][index]),
                                    jnp.asarray(train["prompt_mask"][index]))
        return {"prompt_embeds": embeds, "prompt_valid": valid,
                "prompt_index": jnp.arange(len(index))}

    def rollout(self, batch: dict, rng) -> tuple[dict, dict]:
        """Samples G responses per prompt and scores them: (training batch, metrics)."""
        s, g = self.state, self.rl.num_generations
        model = s.model()
        video = (self._encode_each(batch["frames"]) if self.rl.reencode_video
                 else self.encoder(batch["frames"], batch["video_key"], batch["frame_indices"]))
        embeds, valid = self._embed(model, jnp.asarray(batch["prompt_ids"]), video,
                                    jnp.asarray(batch["prompt_mask"]).astype(bool))
        start = time.perf_counter()
        gen = jax.block_until_ready(self.rollout_engine(model, embeds, valid, self.sampling(), rng))
        seconds = time.perf_counter() - start
        lengths = np.asarray(gen.lengths)
        texts = response_texts(self.tokenizer, gen, self.stop_ids)
        truths = [t for t in batch["ground_truth"] for _ in range(g)]
        parts = score_responses(texts, lengths, truths, self.rl)
        scores = parts["score"]
        advantages = np.asarray(grpo.group_advantages(jnp.asarray(scores), g,
                                                      scale_by_std=self.rl.scale_by_std))
        groups = {k: float(v) for k, v in grpo.group_stats(scores, parts["accuracy"], g).items()}
        varied = scores.reshape(-1, g).std(axis=1) > 0
        keep = np.repeat(varied if self.rl.dynamic_sampling else np.ones_like(varied), g)
        response_mask = (np.arange(gen.tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
        train = {"prompt_embeds": embeds, "prompt_valid": valid,
                 "prompt_index": jnp.repeat(jnp.arange(embeds.shape[0]), g),
                 "tokens": gen.tokens, "rollout_logp": gen.logprobs,
                 "response_mask": jnp.asarray(response_mask),
                 "loss_mask": jnp.asarray(response_mask * keep[:, None]),
                 "advantages": jnp.asarray(advantages, jnp.float32)}
        if self.rl.reencode_video:  # what each later forward needs to encode its video again
            train.update(frames=batch["frames"], prompt_ids=np.asarray(batch["prompt_ids"]),
                         prompt_mask=np.asarray(batch["prompt_mask"]).astype(bool))
        metrics = {"reward": scores.mean(), "accuracy": parts["accuracy"].mean(),
                   "format": parts["format"].mean(), "response_length": lengths.mean(),
                   "kept_groups": varied.mean() if self.rl.dynamic_sampling else 1.0, **groups,
                   "tokens_per_second": lengths.sum() / seconds,
                   "cache_hit_rate": self.encoder.cache.stats.hit_rate}
        return train, {**metrics, "sample": texts[0]}

    def sequence_logprobs(self, trainable, train: dict) -> jax.Array:
        """Log-probs [N, M] of every sampled response under the LLM weights `trainable`."""
        s = self.state  # under rl.reencode_video each call encodes the videos again
        batch = {"tokens": train["tokens"], "response_mask": train["response_mask"],
                 **self._prompts_of(train, train["prompt_index"])}
        return self._logprobs(trainable, s.frozen, graphdef=s.graphdef, batch=batch)

    def add_logprobs(self, train: dict) -> tuple[dict, dict]:
        """Old-policy and reference log-probs, computed once per rollout batch.

        Also measures how far the rollout engine's log-probs are from the training
        forward's (a mismatch that grows means the engine and trainer disagree).
        """
        train["old_logp"] = self.sequence_logprobs(self.state.trainable, train)
        mask = train["response_mask"]
        gap = jnp.abs(train["old_logp"] - train["rollout_logp"])
        mismatch = float(jnp.sum(gap * mask) / jnp.maximum(jnp.sum(mask), 1.0))
        if self.loss_cfg.kl_coef > 0:
            train["ref_logp"] = self.sequence_logprobs(self.reference, train)
        else:
            train["ref_logp"] = train["old_logp"]
        return train, {"logprob_mismatch": mismatch}

    def update(self, train: dict, rng) -> dict:
        """ppo_epochs passes of mini-batches of update_batch_size prompts x G samples."""
        s = self.state
        n = train["tokens"].shape[0]
        size = min(self.rl.update_batch_size * self.rl.num_generations, n)
        sequence_keys = ("prompt_index", "tokens", "response_mask", "loss_mask", "advantages",
                         "old_logp", "ref_logp")
        history = []
        for epoch in range(self.rl.ppo_epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), n))
            for start in range(0, n - size + 1, size):
                idx = order[start:start + size]
                mini = {k: train[k][idx] for k in sequence_keys}
                mini.update(self._prompts_of(train, mini["prompt_index"]))
                s.trainable, s.opt_state, m = self._update(
                    s.trainable, s.frozen, s.opt_state, graphdef=s.graphdef, batch=mini)
                history.append(m)
        s.step += 1
        metrics = {k: np.mean([np.asarray(m[k]) for m in history]) for k in history[0]}
        if self.rl.measure_update:
            metrics.update(self.measure_update(train))
        return metrics

    def measure_update(self, train: dict) -> dict:
        """One more forward after the updates: did the responses with positive advantage
        gain log-prob and those with negative advantage lose it? (`grpo.update_alignment`)"""
        new_logp = self.sequence_logprobs(self.state.trainable, train)
        shift = grpo.update_alignment(train["old_logp"], new_logp, train["advantages"],
                                      train["loss_mask"])
        return {k: float(v) for k, v in shift.items()}

    def step(self, batch: dict) -> dict:
        rng = jax.random.fold_in(jax.random.key(self.config.seed), self.state.step)
        sync = getattr(self.rollout_engine, "sync_weights", None)
        if sync is not None:  # a rollout server samples the policy of this step: push it first
            sync(self.state.model(), self.state.step)
        train, rollout_metrics = self.rollout(batch, jax.random.fold_in(rng, 0))
        train, logprob_metrics = self.add_logprobs(train)
        return {**rollout_metrics, **logprob_metrics,
                **self.update(train, jax.random.fold_in(rng, 1))}

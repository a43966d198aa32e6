"""GRPO learner: one step is sync -> rollout -> log-probs -> update, in that order.

Per rollout batch of P prompts: each video is encoded once (embedding cache), each prompt
prefilled once and sampled G times by the rollout engine, responses scored and advantages
taken per group (`rl/rollout.py`), then old-policy and reference log-probs and the optimizer
steps run over chunks of `rl.update_batch_size` prompts that reuse the same prompt
embeddings. Only the LLM trains; vision tower, projector and token embeddings stay frozen.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lvr_jax import training
from lvr_jax.model.sampler import SamplingParams
from lvr_jax.model.vlm import LongVILA
from lvr_jax.rl import grpo, rollout
from lvr_jax.sharding import forwards, hosts, sequence
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.mesh import logical_to_sharding, rules_of
from lvr_jax.sharding.video_embeddings import VideoEmbedder
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

    @classmethod
    def of(cls, rl) -> "LossConfig":
        """From a recipe's `rl` section; Dr.GRPO's `*-norm` aggregation divides by
        `rl.max_new_tokens`."""
        return cls(temperature=rl.temperature, clip_low=rl.clip_low, clip_high=rl.clip_high,
                   dual_clip=rl.dual_clip, loss_agg=rl.loss_agg,
                   norm_length=rl.max_new_tokens if rl.loss_agg.endswith("norm") else None,
                   kl_coef=rl.kl_coef, kl_kind=rl.kl_kind)


def make_response_logprobs(mesh=None, mesh_config=None):
    """(llm, prompt_embeds [P, T, D], prompt_valid [P, T], prompt_index [N], tokens,
    response_mask, temperature) -> log-probs and entropies [N, M] of the response tokens
    under logits / temperature, response n following prompt `prompt_index[n]`.

    Without a mesh each prompt runs once for all the responses that share it
    (`Qwen2.continuation_hidden`: a group's G samples cost one prompt forward, not G). With
    one, every sequence runs whole, sharded over `sp`, and only the response window reaches
    the vocabulary projection, vocabulary-parallel and in chunks
    (`sharding.sequence.response_logprobs`), so no device holds [T, vocab] logits.
    """
    hidden_fn = forwards.hidden_fn(mesh, mesh_config)

    def response_logprobs(llm, prompt_embeds, prompt_valid, prompt_index, tokens, response_mask,
                          temperature):
        prompt_embeds = jax.lax.stop_gradient(prompt_embeds)
        if mesh is None:
            hidden = llm.continuation_hidden(prompt_embeds, prompt_valid, prompt_index,
                                             llm.embed(tokens), response_mask.astype(bool))
            return sequence.logprobs_and_entropy(llm.logits(hidden) / temperature, tokens)
        t = prompt_embeds.shape[1]
        x = jnp.concatenate([prompt_embeds[prompt_index], llm.embed(tokens)], axis=1)
        valid = jnp.concatenate([prompt_valid[prompt_index], response_mask.astype(bool)], axis=1)
        hidden = hidden_fn(llm, x, valid)
        return sequence.response_logprobs(llm, hidden, t - 1, tokens, mesh,
                                          rules_of(mesh_config), temperature)
    return response_logprobs


def batch_logprobs(logprobs_fn, llm, batch: dict, temperature: float):
    """`make_response_logprobs`'s function on a pass's batch (prompts, prompt_index, tokens,
    response_mask)."""
    return logprobs_fn(llm, batch["prompt_embeds"], batch["prompt_valid"], batch["prompt_index"],
                       batch["tokens"], batch["response_mask"], temperature)


def grpo_loss(model: LongVILA, batch: dict, cfg: LossConfig, logprobs_fn):
    """Clipped surrogate (weighted by the rollout correction) plus k3 KL to the reference,
    over the response tokens the loss keeps."""
    logp, entropy = batch_logprobs(logprobs_fn, model.llm, batch, cfg.temperature)
    mask = batch["loss_mask"]
    totals = batch.get("totals")  # the whole batch's, in a micro-batch (split_micro_batches)
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


def split_micro_batches(batch: dict, micro: training.MicroBatches) -> tuple[dict, dict]:
    """The batch as micro-batches of `micro.size` sequences; the prompt embeddings stay
    whole, each sequence reading its own through `prompt_index`; the whole batch's (tokens,
    sequences) for the loss (`training.MicroBatches`)."""
    count = micro.count(batch["tokens"].shape[0])
    shared = {k: batch[k] for k in ("prompt_embeds", "prompt_valid")}
    shared["totals"] = loss_totals(batch["loss_mask"])
    return shared, {k: training.split_rows(v, count) for k, v in batch.items() if k not in shared}


def loss_totals(loss_mask) -> tuple:
    """The whole batch's loss denominators (tokens the loss keeps, sequences) that every
    micro-batch of it carries (`grpo.aggregate(totals=)`)."""
    return jnp.sum(jnp.asarray(loss_mask, jnp.float32)), jnp.float32(loss_mask.shape[0])


def micro_batches(config) -> training.MicroBatches | None:
    return training.micro_batching(config.optim, split_micro_batches)


def streams_update(config) -> bool:
    """Whether the update's micro-batches are passes of their own, each copying its prompts
    from host memory (`training.StreamedUpdate`): under `rl.offload_prompts` with
    `optim.micro_batch_size` set (an update's prompts at 4,096 frames would take 115 GiB of
    each of 8 devices); else the micro-batches are summed inside one jitted step."""
    return (bool(config.rl.get("offload_prompts", False)) and micro_batches(config) is not None
            and not config.rl.reencode_video)


def make_loss_fn(config, mesh=None):
    return functools.partial(grpo_loss, cfg=LossConfig.of(config.rl),
                             logprobs_fn=make_response_logprobs(mesh, config.mesh))


# How the update's batch arrays lie on a mesh beyond rows over the batch axes: the prompt
# embeddings (a whole update's prompts, each a long video) split along the sequence too.
BATCH_LAYOUT = {"prompt_embeds": ("activation_batch", "activation_length", "activation_embed"),
                "prompt_valid": ("activation_batch", "activation_length")}


def prompt_placement(mesh, rules):
    """(length multiple, shardings of prompt_embeds / prompt_valid by shape) on `mesh`: the
    prompts of an update (each a long video) lie split along the sequence as well as over
    the batch axes, their length left-padded (invalid slots) to a multiple of the devices
    the sequence is split over."""
    axes = dict(rules_of(rules)).get("activation_length") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    multiple = math.prod(mesh.shape[a] for a in axes)

    def sharding(key, shape):
        names = BATCH_LAYOUT[key]
        return logical_to_sharding(names + (None,) * (len(shape) - len(names)), mesh, rules,
                                   shape)
    return multiple, sharding


def padded_left(x, length: int, value=0):
    """[P, T, ...] left-padded along T to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (length - x.shape[1], 0)
    return jnp.pad(x, pad, constant_values=value)


def abstract_batch(config, model_config, mesh=None, prompts: int = 0,
                   samples: int = 0) -> dict:
    """Shapes of one update mini-batch of `prompts` (default update_batch_size) prompts
    with `samples` sequences each (default num_generations), for compiling a recipe
    without data."""
    rl = config.rl
    p, m = prompts or rl.update_batch_size, rl.max_new_tokens
    n = p * (samples or rl.num_generations)
    t = config.data.max_length - 1 + model_config.num_video_tokens(config.data.num_frames)
    if mesh is not None:
        multiple = prompt_placement(mesh, config.mesh)[0]
        t = -(-t // multiple) * multiple
    sds = jax.ShapeDtypeStruct
    per_token = {k: sds((n, m), jnp.float32) for k in
                 ("response_mask", "loss_mask", "old_logp", "ref_logp", "pg_weight")}
    return {"prompt_embeds": sds((p, t, model_config.llm.hidden_size), jnp.dtype(model_config.dtype)),
            "prompt_valid": sds((p, t), jnp.bool_), "prompt_index": sds((n,), jnp.int32),
            "tokens": sds((n, m), jnp.int32), "advantages": sds((n,), jnp.float32), **per_token}


SEQUENCE_KEYS = ("tokens", "response_mask", "loss_mask", "advantages", "old_logp", "ref_logp",
                 "pg_weight")


class GRPOLearner:
    """`step(batch)`: one rollout batch, then its updates; returns the step's metrics.

    `engine` samples the policy (default: the embedded JAX sampler on the learner's mesh)."""

    def __init__(self, model: LongVILA, config, tokenizer: Tokenizer, cache: EmbeddingCache,
                 mesh=None, engine: rollout.RolloutEngine | None = None):
        self.config, self.rl, self.tokenizer, self.mesh = config, config.rl, tokenizer, mesh
        self.offload = bool(self.rl.get("offload_prompts", False))
        if self.offload and hosts.multiprocess():  # each process would gather every prompt
            raise ValueError("rl.offload_prompts keeps the rollout batch in one process's "
                             "memory; run it on one host or set it False")
        self.tx = training.make_optimizer(config.optim)
        self.state = training.TrainState.create(model, trainable_filter(config), self.tx)
        # The frozen initial policy: a copy, since each update donates the trainable buffers.
        self.reference = jax.tree.map(jnp.copy, self.state.trainable)
        self.videos = VideoEmbedder(model, cache, mesh, rules_of(config.mesh))
        self.loss_cfg = LossConfig.of(self.rl)
        self.response_logprobs = make_response_logprobs(mesh, config.mesh)
        self.micro, loss_fn = micro_batches(config), make_loss_fn(config, mesh)
        self._update = training.jit_update(self.tx, loss_fn, micro=self.micro)
        self.streamed = (training.StreamedUpdate(self.tx, loss_fn) if streams_update(config)
                         else None)
        self._logprobs = jax.jit(self._logprobs_fn, static_argnames="graphdef")
        self.engine = engine or rollout.JaxEngine(tokenizer.pad_id,
                                                  forwards.prefill_fn(mesh, config.mesh))
        self.stop_ids = (tokenizer.eos_id,)
        if self.rl.off_policy_steps and isinstance(self.engine, rollout.JaxEngine):
            raise ValueError("rl.off_policy_steps=1 needs rollout servers (rl.rollout.backend="
                             "'server'): the embedded sampler reads the weights the update donates")
        # rl.off_policy_steps: the next batch's rollout, generating on this thread meanwhile
        self.background = concurrent.futures.ThreadPoolExecutor(1, "rollout")
        self.ahead: concurrent.futures.Future | None = None

    # ---- the step, in order ------------------------------------------------------------
    def step(self, batch: dict, upcoming: dict | None = None) -> dict:
        """Rollout of `batch`, log-probs, update. With `rl.off_policy_steps` = 1 and the next
        batch given as `upcoming`, see `step_ahead`."""
        if self.rl.off_policy_steps and upcoming is not None:
            return self.step_ahead(batch, upcoming)
        self.engine.sync_weights(self.state.model(), self.state.step)
        train, rollout_metrics = self.rollout(batch, self.rollout_rng(self.state.step))
        return self.train_on(train, rollout_metrics)

    def step_ahead(self, batch: dict, upcoming: dict) -> dict:
        """One-step off-policy: trains on `batch`'s rollout, generated during the previous
        step with the weights before it, while the engine generates `upcoming` with the
        weights before this step's update (the rollout correction reweighs the lag)."""
        s = self.state
        if self.ahead is None:  # the first step (or the first after a resume) waits for its own
            self.engine.sync_weights(s.model(), s.step)
            self.ahead = self.submit_rollout(batch, s.step)
        train, rollout_metrics = self.ahead.result()
        self.engine.sync_weights(s.model(), s.step)  # generation is idle: push, then go on
        self.ahead = self.submit_rollout(upcoming, s.step + 1)
        return self.train_on(train, rollout_metrics)

    def train_on(self, train: dict, rollout_metrics: dict) -> dict:
        rollout_metrics["rollout_staleness"] = self.state.step - train.pop("weights_step")
        train, logprob_metrics = self.add_logprobs(train)
        update_rng = jax.random.fold_in(self.step_rng(self.state.step), 1)
        return {**rollout_metrics, **logprob_metrics, **self.update(train, update_rng)}

    def step_rng(self, step: int):
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def rollout_rng(self, step: int):
        return jax.random.fold_in(self.step_rng(step), 0)

    def submit_rollout(self, batch: dict, step: int) -> concurrent.futures.Future:
        """The rollout of `batch` (the rollout of step `step`) on the background thread; its
        prompt embeddings are taken here, with the current (frozen) video encoder."""
        model = self.state.model()  # a server samples the pushed copy, never these buffers
        return self.background.submit(self.rollout, batch, self.rollout_rng(step),
                                      self.prompt_embeddings(model, batch), self.state.step,
                                      model)

    def rollout(self, batch: dict, rng, prompts=None, weights_step=None,
                model=None) -> tuple[dict, dict]:
        """generate -> score -> the training batch: (training batch, metrics). `prompts`:
        embeddings already taken; `weights_step`: the step whose weights the engine samples."""
        g, model = self.rl.num_generations, model or self.state.model()
        embeds, valid, gen, seconds = self.generate_in_chunks(model, batch, rng, prompts)
        lengths = hosts.fetch(gen.lengths)
        texts = rollout.response_texts(self.tokenizer, gen, self.stop_ids)
        truths = [t for t in batch["ground_truth"] for _ in range(g)]
        parts = rollout.score(texts, lengths, truths, g, self.rl)
        order, keep = rollout.select_prompts(parts["score"], g, self.rl.update_batch_size,
                                             self.rl.dynamic_sampling)
        train = rollout.training_batch(embeds, valid, gen, parts, order, keep, g)
        train["weights_step"] = self.state.step if weights_step is None else weights_step
        if self.rl.reencode_video:  # what each later forward needs to encode its video again
            train.update(frames=batch["frames"][order],
                         prompt_ids=np.asarray(batch["prompt_ids"])[order],
                         prompt_mask=np.asarray(batch["prompt_mask"]).astype(bool)[order])
        groups = {k: float(v) for k, v in
                  grpo.group_stats(parts["score"], parts["accuracy"], g).items()}
        metrics = {"reward": parts["score"].mean(), "accuracy": parts["accuracy"].mean(),
                   "format": parts["format"].mean(), "response_length": lengths.mean(),
                   # dynamic sampling keeps exactly the mixed groups
                   "kept_groups": groups["mixed_groups"] if self.rl.dynamic_sampling else 1.0,
                   **groups,
                   "tokens_per_second": lengths.sum() / seconds,
                   "cache_hit_rate": self.videos.cache.stats.hit_rate}
        return train, {**metrics, "sample": texts[0]}

    def generate_in_chunks(self, model, batch: dict, rng, prompts=None):
        """(prompt embeddings, validity, Generation, seconds generating) of the rollout batch,
        `rl.rollout.prompts_per_chunk` prompts at a time (0: all; chunk i samples with
        `fold_in(rng, i)`): each chunk's embeddings are taken, sampled from, and under
        `rl.offload_prompts` moved to host memory before the next, so the device holds one
        chunk's prompts and KV caches. `prompts`: embeddings of the batch already taken."""
        size, n = self.rl.rollout.get("prompts_per_chunk", 0), len(batch["ground_truth"])
        starts = range(0, n, size) if size and size < n else [0]
        size = size if len(starts) > 1 else n
        embeds, valids, generations, seconds = [], [], [], 0.0
        for i, start in enumerate(starts):
            rows = slice(start, start + size)
            if prompts is None:
                e, v = self.prompt_embeddings(model, {k: x[rows] for k, x in batch.items()})
            else:
                e, v = prompts[0][rows], prompts[1][rows]
            gen, s = rollout.timed_generate(self.engine, model, e, v, self.sampling(),
                                            jax.random.fold_in(rng, i) if len(starts) > 1 else rng)
            embeds.append(self.kept(e))
            valids.append(self.kept(v))
            generations.append(gen)
            seconds += s
        join = np.concatenate if self.offload else jnp.concatenate
        return (join(embeds), join(valids), rollout.concatenated(generations), seconds)

    def kept(self, x):
        """A rollout array as the step keeps it: in host memory under `rl.offload_prompts`."""
        return np.asarray(jax.device_get(x)) if self.offload else x

    def placed(self, x, key: str):
        """A pass's prompt array on the devices (from host memory under rl.offload_prompts)."""
        if not self.offload:
            return x
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, prompt_placement(self.mesh, self.config.mesh)[1](key, x.shape))

    def add_logprobs(self, train: dict) -> tuple[dict, dict]:
        """Old-policy and reference log-probs, computed once per rollout batch, and the
        rollout correction they give (`rl.rollout_correction`, `grpo.rollout_correction`).

        Also measures how far the rollout engine's log-probs are from the training
        forward's (a mismatch that grows means the engine and trainer disagree).
        """
        train["old_logp"] = self.sequence_logprobs(self.state.trainable, train)
        if self.loss_cfg.kl_coef > 0:
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
        s = self.state
        history = []
        for epoch in range(self.rl.ppo_epochs):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch),
                                                      self.num_prompts(train)))
            for prompts in self.chunks(order):
                if self.streamed is not None:
                    s.trainable, s.opt_state, m = self.streamed.step(
                        s.trainable, s.frozen, s.opt_state, s.graphdef,
                        self.micro_batches_of(train, prompts))
                else:
                    s.trainable, s.opt_state, m = self._update(
                        s.trainable, s.frozen, s.opt_state, graphdef=s.graphdef,
                        batch=self.chunk_batch(train, prompts))
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

    # ---- the parts ---------------------------------------------------------------------
    def sampling(self) -> SamplingParams:
        rl = self.rl
        return SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                              top_p=rl.top_p, top_k=rl.top_k, stop_token_ids=self.stop_ids,
                              num_samples=rl.num_generations)

    def prompt_embeddings(self, model: LongVILA, batch: dict):
        """Prompt embeddings [P, T, D] and validity: the video from the embedding cache
        (or encoded again under `rl.reencode_video`) spliced into the prompt."""
        video = self._encode_each(batch["frames"]) if self.rl.reencode_video else None
        embeds, valid = self.videos.prompts(model, batch, video)
        if self.mesh is None:
            return embeds, valid
        multiple, sharding = prompt_placement(self.mesh, self.config.mesh)
        length = -(-embeds.shape[1] // multiple) * multiple
        embeds, valid = padded_left(embeds, length), padded_left(valid, length, False)
        return (jax.device_put(embeds, sharding("prompt_embeds", embeds.shape)),
                jax.device_put(valid, sharding("prompt_valid", valid.shape)))

    def num_prompts(self, train: dict) -> int:
        return train["tokens"].shape[0] // self.rl.num_generations

    def chunks(self, prompts, size: int = 0):
        """`prompts` in consecutive chunks of `size` (default update_batch_size: the update
        passes' one shape)."""
        size = min(size or self.rl.update_batch_size, len(prompts))
        return [prompts[i:i + size] for i in range(0, len(prompts), size)]

    def chunk_batch(self, train: dict, prompts, keys=SEQUENCE_KEYS) -> dict:
        """The sequences of `prompts` (indices into the training batch) for one pass."""
        g = self.rl.num_generations
        rows = (np.asarray(prompts)[:, None] * g + np.arange(g)).reshape(-1)
        return {**{k: train[k][rows] for k in keys},
                **self._prompts_of(train, np.asarray(prompts))}

    def micro_batches_of(self, train: dict, prompts):
        """The sequences of `prompts` as the streamed update's micro-batches: rows i, i +
        count, ... as the in-step split takes them, each with the whole update's loss
        denominators and its own sequences' prompts copied to the devices ([size, T, D],
        one per sequence, so every micro-batch has one shape)."""
        g = self.rl.num_generations
        rows = (np.asarray(prompts)[:, None] * g + np.arange(g)).reshape(-1)
        count = self.micro.count(len(rows))
        totals = loss_totals(train["loss_mask"][rows])
        for i in range(count):
            yield {**self.sequences_of(train, rows[i::count]), "totals": totals}

    def sequences_of(self, train: dict, rows, keys=SEQUENCE_KEYS) -> dict:
        """Sequences `rows` of the training batch with their own prompts copied to the
        devices, one per sequence (a streamed pass: [len(rows), T, D] whoever shares them)."""
        prompts = np.asarray(rows) // self.rl.num_generations
        return {**{k: train[k][rows] for k in keys},
                "prompt_embeds": self.placed(train["prompt_embeds"][prompts], "prompt_embeds"),
                "prompt_valid": self.placed(train["prompt_valid"][prompts], "prompt_valid"),
                "prompt_index": jnp.arange(len(rows))}

    def _prompts_of(self, train: dict, prompts) -> dict:
        """Prompt embeddings and per-sequence indices into them for a pass over `prompts`.

        Shared rollout embeddings; with `rl.reencode_video` (the reference implementation's
        baseline) every sequence is its own prompt and its video is encoded again.
        """
        g = self.rl.num_generations
        if not self.rl.reencode_video:
            return {"prompt_embeds": self.placed(train["prompt_embeds"][prompts], "prompt_embeds"),
                    "prompt_valid": self.placed(train["prompt_valid"][prompts], "prompt_valid"),
                    "prompt_index": jnp.repeat(jnp.arange(len(prompts)), g)}
        index = np.repeat(prompts, g)
        prompt = {"prompt_ids": train["prompt_ids"][index], "prompt_mask": train["prompt_mask"][index]}
        embeds, valid = self.videos.prompts(self.state.model(), prompt,
                                            self._encode_each(train["frames"][index]))
        return {"prompt_embeds": embeds, "prompt_valid": valid,
                "prompt_index": jnp.arange(len(index))}

    def _encode_each(self, frames_bfhwc) -> jax.Array:
        """Each video through the frozen encoder, bypassing the embedding cache."""
        return jnp.stack([self.videos.encode(f) for f in frames_bfhwc])

    def _logprobs_fn(self, trainable, frozen, graphdef, batch):
        llm = nnx.merge(graphdef, trainable, frozen).llm
        return batch_logprobs(self.response_logprobs, llm, batch, self.loss_cfg.temperature)[0]

    def sequence_logprobs(self, trainable, train: dict) -> jax.Array:
        """Log-probs [N, M] of every sampled response under the LLM weights `trainable`,
        `rl.logprob_prompts` prompts at a time (default update_batch_size; under
        rl.reencode_video each chunk encodes again); where the update streams, a micro-batch
        of `optim.micro_batch_size` sequences at a time, as its passes."""
        s = self.state
        keys = ("tokens", "response_mask")
        if self.streamed is not None:
            n, size = train["tokens"].shape[0], self.micro.size
            batches = [self.sequences_of(train, np.arange(i, min(i + size, n)), keys)
                       for i in range(0, n, size)]
        else:
            batches = [self.chunk_batch(train, prompts, keys) for prompts in
                       self.chunks(np.arange(self.num_prompts(train)),
                                   self.rl.get("logprob_prompts", 0))]
        return jnp.concatenate([self._logprobs(trainable, s.frozen, graphdef=s.graphdef, batch=b)
                                for b in batches])

"""GRPO rollouts: one call turns a batch of prompts into the scored training batch.

`Rollout(model, step, batch)` syncs the engine's weights, then takes the batch's prompt
embeddings (`VideoEmbedder`: each video from the embedding cache), samples G responses per
prompt from the `RolloutEngine` (`rl.rollout.prompts_per_chunk` prompts at a time), scores
them (`rewards.score_responses`), takes advantages per group (`grpo.group_advantages`),
selects the prompts the passes see (`select_prompts`: with `rl.dynamic_sampling` the groups
whose G rewards are all equal, which carry no gradient, are left out before any pass, in
whole chunks of `rl.update_batch_size` prompts so that every pass keeps one compiled shape)
and lays them out as the passes read them (`training_batch`). With `rl.off_policy_steps=1`
the next batch generates on a background thread while the trainer updates on this one.
"""

from __future__ import annotations

import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.model.sampler import Generation
from lvr_jax.rl import grpo, rewards
from lvr_jax.rl.engines import RolloutEngine
from lvr_jax.sampling import SamplingParams
from lvr_jax.sharding import hosts
from lvr_jax.sharding.prompts import PromptPlacement
from lvr_jax.sharding.video_embeddings import VideoEmbedder


def step_rng(seed: int, step: int):
    """The random key of training step `step`: fold 0 samples its rollout, 1 shuffles its update."""
    return jax.random.fold_in(jax.random.key(seed), step)


def sampling_params(rl, stop_ids: tuple[int, ...]) -> SamplingParams:
    """How a recipe's `rl` section samples the G responses of each prompt."""
    return SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                          top_p=rl.top_p, top_k=rl.top_k, stop_token_ids=tuple(stop_ids),
                          num_samples=rl.num_generations)


def prompts_per_chunk(config) -> int:
    """Prompts embedded and sampled at a time: `rl.rollout.prompts_per_chunk`, 0 meaning the
    whole rollout batch."""
    return config.rl.rollout.prompts_per_chunk or config.data.batch_size


class Rollout:
    """`rollout(model, step, batch, upcoming=None)` -> (training batch, metrics)."""

    def __init__(self, config, tokenizer, videos: VideoEmbedder, engine: RolloutEngine,
                 placement: PromptPlacement):
        self.rl, self.seed, self.tokenizer = config.rl, config.seed, tokenizer
        self.chunk = prompts_per_chunk(config)
        self.videos, self.engine, self.placement = videos, engine, placement
        self.params = sampling_params(config.rl, (tokenizer.eos_id,))
        # rl.off_policy_steps: the next batch's rollout, generating on this thread meanwhile
        self.background = (concurrent.futures.ThreadPoolExecutor(1, "rollout")
                           if config.rl.off_policy_steps else None)
        self.ahead: tuple[concurrent.futures.Future, int] | None = None

    def __call__(self, model, step: int, batch: dict, upcoming: dict | None = None):
        """The training batch of step `step` sampled from `model`, the policy at that step.

        With `rl.off_policy_steps=1` and the next batch given as `upcoming`: the batch that
        generated during the previous step with the weights before it, while `upcoming` now
        starts generating with `model` (the rollout correction reweighs the lag)."""
        if self.background is None or upcoming is None:
            self.engine.sync_weights(model, step)
            train, metrics = self.collect(model, batch, jax.random.fold_in(step_rng(self.seed,
                                                                                   step), 0))
            return train, {**metrics, "rollout_staleness": 0}
        if self.ahead is None:  # the first step (or the first after a resume) waits for its own
            self.engine.sync_weights(model, step)
            self.ahead = (self._submit(model, batch, step), step)
        future, weights_step = self.ahead
        train, metrics = future.result()
        self.engine.sync_weights(model, step)  # generation is idle: push, then go on
        self.ahead = (self._submit(model, upcoming, step + 1), step)
        return train, {**metrics, "rollout_staleness": step - weights_step}

    def _submit(self, model, batch: dict, step: int) -> concurrent.futures.Future:
        """The rollout of `batch` for step `step` on the background thread; its prompt
        embeddings are taken here, with the (frozen) video encoder."""
        prompts = self.videos.prompts(model, batch)
        rng = jax.random.fold_in(step_rng(self.seed, step), 0)
        return self.background.submit(self.collect, model, batch, rng, prompts)

    def collect(self, model, batch: dict, rng, prompts=None) -> tuple[dict, dict]:
        """generate -> score -> the training batch: (training batch, metrics). `prompts`:
        the batch's prompt embeddings, already taken."""
        g = self.params.num_samples
        embeds, valid, gen, seconds = self.generate_in_chunks(model, batch, rng, prompts)
        lengths = hosts.fetch(gen.lengths)
        texts = response_texts(self.tokenizer, gen, self.params.stop_token_ids)
        truths = [t for t in batch["ground_truth"] for _ in range(g)]
        parts = score(texts, lengths, truths, g, self.rl)
        order, keep = select_prompts(parts["score"], g, self.rl.update_batch_size,
                                     self.rl.dynamic_sampling)
        groups = {k: float(v) for k, v in
                  grpo.group_stats(parts["score"], parts["accuracy"], g).items()}
        metrics = {"reward": parts["score"].mean(), "accuracy": parts["accuracy"].mean(),
                   "format": parts["format"].mean(), "response_length": lengths.mean(),
                   # dynamic sampling keeps exactly the mixed groups
                   "kept_groups": groups["mixed_groups"] if self.rl.dynamic_sampling else 1.0,
                   **groups,
                   "tokens_per_second": lengths.sum() / seconds,
                   "cache_hit_rate": self.videos.cache.stats.hit_rate, "sample": texts[0]}
        return training_batch(embeds, valid, gen, parts, order, keep, g), metrics

    def generate_in_chunks(self, model, batch: dict, rng, prompts=None):
        """(prompt embeddings, validity, Generation, seconds generating) of the batch,
        `prompts_per_chunk` prompts at a time (chunk i samples with
        `fold_in(rng, i)`): each chunk's embeddings are taken, sampled from, and kept as the
        placement keeps them (under `rl.offload_prompts` in host memory) before the next, so
        the devices hold one chunk's prompts and KV caches."""
        size, n = self.chunk, len(batch["ground_truth"])
        starts = range(0, n, size) if size < n else [0]
        size = size if len(starts) > 1 else n
        embeds, valids, generations, seconds = [], [], [], 0.0
        for i, start in enumerate(starts):
            rows = slice(start, start + size)
            if prompts is None:
                e, v = self.videos.prompts(model, {k: x[rows] for k, x in batch.items()})
            else:
                e, v = prompts[0][rows], prompts[1][rows]
            gen, s = timed_generate(self.engine, model, e, v, self.params,
                                    jax.random.fold_in(rng, i) if len(starts) > 1 else rng)
            embeds.append(self.placement.kept(e))
            valids.append(self.placement.kept(v))
            generations.append(gen)
            seconds += s
        join = np.concatenate if self.placement.offload else jnp.concatenate
        return join(embeds), join(valids), concatenated(generations), seconds


def timed_generate(engine: RolloutEngine, model, embeds, valid, params, rng):
    """(Generation, seconds spent generating)."""
    start = time.perf_counter()
    gen = jax.block_until_ready(engine.generate(model, embeds, valid, params, rng))
    return gen, time.perf_counter() - start


def concatenated(generations: list[Generation]) -> Generation:
    """Generations of consecutive prompt chunks as one."""
    if len(generations) == 1:
        return generations[0]
    return Generation(*(jnp.concatenate(parts) for parts in zip(*(
        (g.tokens, g.logprobs, g.lengths) for g in generations))))


def response_texts(tokenizer, gen: Generation, stop_ids) -> list[str]:
    """Decoded responses without their stop token."""
    texts = []
    for tokens, length in zip(hosts.fetch(gen.tokens), hosts.fetch(gen.lengths)):
        tokens = tokens[:length]
        if length and tokens[-1] in stop_ids:
            tokens = tokens[:-1]
        texts.append(tokenizer.decode(tokens.tolist()))
    return texts


def score(texts, lengths, truths, group_size: int, rl) -> dict[str, np.ndarray]:
    """Reward parts per response (`score` is the reward) and their group advantages."""
    parts = rewards.score_responses(texts, truths, lengths, format_weight=rl.format_weight,
                                    max_length=rl.max_new_tokens,
                                    overlong_buffer=rl.overlong_buffer)
    parts["advantages"] = np.asarray(grpo.group_advantages(
        jnp.asarray(parts["score"]), group_size, scale_by_std=rl.scale_by_std))
    return parts


def select_prompts(scores, group_size: int, chunk: int, drop_uniform: bool):
    """Which prompts the passes see, in order, and which of them train: (order [K], keep [K]).

    Without `drop_uniform` every prompt, all training. With it the prompts whose G scores
    differ come first; K is rounded up to whole chunks of `chunk` prompts (at least one) with
    uniform groups that stay masked, so every pass keeps one compiled shape.
    """
    varied = np.asarray(scores).reshape(-1, group_size).std(axis=1) > 0
    everything = np.arange(len(varied))
    if not drop_uniform:
        return everything, np.ones(len(varied), bool)
    order = np.concatenate([everything[varied], everything[~varied]])
    size = min(len(order), max(1, -(-int(varied.sum()) // chunk)) * chunk)
    return order[:size], varied[order[:size]]


def training_batch(embeds, valid, gen: Generation, parts: dict, order, keep,
                   group_size: int) -> dict:
    """The sequences of the prompts `order`, grouped as generated; `keep` masks prompts out."""
    rows = (np.asarray(order)[:, None] * group_size + np.arange(group_size)).reshape(-1)
    lengths = hosts.fetch(gen.lengths)[rows]
    response_mask = (np.arange(gen.tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
    loss_mask = response_mask * np.repeat(keep, group_size)[:, None]
    return {"prompt_embeds": embeds[order], "prompt_valid": valid[order],
            "prompt_index": jnp.repeat(jnp.arange(len(order)), group_size),
            "prompt_order": np.asarray(order),  # each prompt's row in the rollout batch
            "tokens": gen.tokens[rows], "rollout_logp": gen.logprobs[rows],
            "response_mask": jnp.asarray(response_mask), "loss_mask": jnp.asarray(loss_mask),
            "advantages": jnp.asarray(parts["advantages"][rows], jnp.float32)}

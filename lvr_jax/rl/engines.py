"""What samples the policy during GRPO: a `RolloutEngine`.

`JaxEngine` is the embedded sampler on the trainer's devices; `ServerEngine` drives rollout
servers through `rollout_bridge.client`, which speaks HTTP only. `sync_weights` hands an
engine the policy it must sample before each rollout; `make_engine` builds the one a recipe's
`rl.rollout` names.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lvr_jax.model.sampler import LOCAL, Forwards, Generation, generate
from lvr_jax.sampling import SamplingParams
from lvr_jax.sharding import forwards, hosts
from rollout_bridge import export
from rollout_bridge.client import RetryPolicy, RolloutClient, RolloutError

log = logging.getLogger("lvr_jax.rl.engines")


class RolloutEngine(Protocol):
    """What samples the policy: rows p * G + g of the Generation are sample g of prompt p."""

    def sync_weights(self, model, step: int) -> None:
        """Makes `model` the policy sampled from now on (`step`: the trainer's step)."""

    def generate(self, model, prompt_embeds, prompt_valid, params: SamplingParams,
                 rng) -> Generation:
        """G = params.num_samples responses to each prompt embedding [P, T, D]."""


class JaxEngine:
    """The embedded sampler: samples the model it is handed, on the trainer's devices.

    `forwards` (from `sharding.forwards.sampler_forwards`) splits a long prompt over `sp`."""

    def __init__(self, pad_id: int, forwards: Forwards = LOCAL):
        self.pad_id, self.forwards = pad_id, forwards

    def sync_weights(self, model, step: int) -> None:
        del model, step  # nothing to move: generate() reads the weights it is given

    def generate(self, model, prompt_embeds, prompt_valid, params, rng) -> Generation:
        return generate(model.llm, prompt_embeds, prompt_valid, params, rng,
                        pad_id=self.pad_id, forwards=self.forwards)


class ServerEngine:
    """Rollout servers as an engine.

    The prompt embeddings (text + cached video, constant while the embeddings are frozen)
    are uploaded once under their content key and reused by all G samples and all later
    steps. A server that comes back as a fresh process gets weights and embeddings again.
    """

    def __init__(self, client: RolloutClient, pad_id: int = 0, keep_pushed: bool = False):
        self.client, self.pad_id, self.keep_pushed = client, pad_id, keep_pushed
        self.model, self.version, self.pushed = None, None, None

    def sync_weights(self, model, step: int) -> None:
        """Pushes `model` as version step + 1 unless that version is already served.

        With `keep_pushed` (one-step off-policy: the update frees the model's buffers while
        the servers still generate with it) the serialised chunks are kept on the host, so
        a server that restarts mid-rollout gets this exact version again."""
        if self.version != step + 1:
            if self.keep_pushed:  # bytes: copies, not views of buffers the update frees
                self.pushed = [_as_bytes(body) for body in export.iter_weight_chunks(
                    model, self.client.chunk_bytes, dtype=self.client.dtype)]
                for url in self.client.urls:
                    self._push_again(url, step + 1)
            else:
                self.client.push_weights(model, step + 1)
        self.model, self.version = model, step + 1

    def _push_again(self, url: str, version: int | None = None) -> None:
        version = version or self.version
        if self.pushed is not None:
            self.client.push_chunks(url, lambda: self.pushed, version,
                                    threads=self.client.upload_threads)
        elif self.model is not None:
            self.client.push_weights(self.model, version, urls=[url])

    def generate(self, model, prompt_embeds, prompt_valid, params, rng) -> Generation:
        del model  # the servers sample the version pushed by sync_weights
        embeds, valid = np.asarray(prompt_embeds, np.float32), np.asarray(prompt_valid, bool)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        urls = self.client.urls
        shares = np.array_split(np.arange(embeds.shape[0]), len(urls))
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
            outputs = pool.map(lambda i: self._generate_share(
                urls[i], [embeds[p][valid[p]] for p in shares[i]], params, seed + i),
                range(len(urls)))
            samples = [s for share in outputs for prompt in share for s in prompt]
        return generation_of(samples, params.max_new_tokens, self.pad_id)

    def _generate_share(self, url: str, prompts_nd: list, params, seed: int) -> list:
        """One server's prompts; re-uploads or re-pushes when the server lost them (restart)."""
        if not prompts_nd:
            return []
        for attempt in range(3):
            keys = [self.client.upload_embeddings(p, url) for p in prompts_nd]
            try:
                reply = self.client.generate(
                    [{"embeddings": k} for k in keys], url=url, n=params.num_samples,
                    temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    max_tokens=params.max_new_tokens, stop_token_ids=params.stop_token_ids,
                    seed=seed, version=self.version)
                return reply["outputs"]
            except RolloutError as e:
                if attempt == 2 or e.code not in ("unknown_embeddings", "version_mismatch"):
                    raise
                log.warning("%s; restoring the server's state", e)
                self.client.forget_embeddings(url)
                if e.code == "version_mismatch":
                    self._push_again(url)


def _as_bytes(body) -> bytes:
    """A weight chunk body (bytes, or a list of buffers viewing the parameters) as bytes."""
    return body if isinstance(body, bytes) else b"".join(bytes(b) for b in body)


def generation_of(samples: list[dict], max_tokens: int, pad_id: int) -> Generation:
    """Server samples -> a Generation (rows p * G + g, padded to max_tokens)."""
    tokens = np.full((len(samples), max_tokens), pad_id, np.int32)
    logprobs = np.zeros((len(samples), max_tokens), np.float32)
    lengths = np.zeros(len(samples), np.int32)
    for row, sample in enumerate(samples):
        ids = sample["token_ids"][:max_tokens]
        tokens[row, :len(ids)], lengths[row] = ids, len(ids)
        logprobs[row, :len(ids)] = sample["logprobs"][:len(ids)]
    return Generation(jnp.asarray(tokens), jnp.asarray(logprobs), jnp.asarray(lengths))


def make_engine(config, pad_id: int, mesh=None) -> RolloutEngine:
    """The engine a recipe's `rl.rollout` names: "jax", the embedded sampler (its prefill
    sequence-parallel on `mesh`), or "server": a client of the rollout servers at its urls
    (token or $ROLLOUT_TOKEN, timeouts, push chunk size, dtype and transport), keeping what
    it pushed under `rl.off_policy_steps` (see `ServerEngine`)."""
    r = config.rl.rollout
    if r.backend == "jax":
        return JaxEngine(pad_id, forwards.sampler_forwards(mesh, config.mesh))
    if r.backend != "server":
        raise ValueError(f"config.rl.rollout.backend must be 'jax' or 'server', got {r.backend!r}")
    if hosts.multiprocess():  # each process would push and sample on its own
        raise ValueError("rollout servers are driven from one trainer process; a multi-host "
                         "GRPO run samples with the embedded engine (rl.rollout.backend='jax')")
    retry = RetryPolicy(timeout_s=r.timeout_s, retries=r.retries, backoff_s=r.backoff_s,
                        wait_s=r.wait_s)
    client = RolloutClient(list(r.urls), token=r.token or os.environ.get("ROLLOUT_TOKEN"),
                           retry=retry, chunk_bytes=int(r.chunk_mb) << 20, dtype=r.dtype or None,
                           transport=r.transport)
    return ServerEngine(client, pad_id, keep_pushed=bool(config.rl.off_policy_steps))

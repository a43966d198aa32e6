"""The batches of a GRPO step's passes, cut from its scored rollout batch.

A pass sees whole groups: prompts with their G samples (rows p * G + g of the training
batch), the prompts' embeddings shared by their samples through `prompt_index`. The log-prob
passes take `rl.logprob_prompts` prompts at a time and the update `rl.update_batch_size`
(one optimizer step each; one compiled shape). Where the update streams
(`rl.offload_prompts` with `optim.micro_batch_size`), both go micro-batch by micro-batch,
each sequence with its own copy of its prompt from host memory, so every micro-batch has
one shape.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lvr_jax import training
from lvr_jax.sharding.prompts import PromptPlacement

# The per-sequence arrays of a training batch an update pass reads.
SEQUENCE_KEYS = ("tokens", "response_mask", "loss_mask", "advantages", "old_logp", "ref_logp",
                 "pg_weight")
LOGPROB_KEYS = ("tokens", "response_mask")


def group_rows(prompts, group_size: int) -> np.ndarray:
    """The training batch's rows of the G samples of each of `prompts`, grouped."""
    return (np.asarray(prompts)[:, None] * group_size + np.arange(group_size)).reshape(-1)


def chunks(items, size: int) -> list:
    """`items` in consecutive chunks of `size` (the last one shorter)."""
    size = min(size, len(items))
    return [items[i:i + size] for i in range(0, len(items), size)]


def loss_totals(loss_mask) -> tuple:
    """The whole batch's loss denominators (tokens the loss keeps, sequences) that every
    micro-batch of it carries (`grpo.aggregate(totals=)`)."""
    return jnp.sum(jnp.asarray(loss_mask, jnp.float32)), jnp.float32(loss_mask.shape[0])


def split_micro_batches(batch: dict, micro: training.MicroBatches) -> tuple[dict, dict]:
    """The batch as micro-batches of `micro.size` sequences inside one jitted step; the prompt
    embeddings stay whole, each sequence reading its own through `prompt_index`."""
    count = micro.count(batch["tokens"].shape[0])
    shared = {k: batch[k] for k in ("prompt_embeds", "prompt_valid")}
    shared["totals"] = loss_totals(batch["loss_mask"])
    return shared, {k: training.split_rows(v, count) for k, v in batch.items() if k not in shared}


def logprob_prompts(rl) -> int:
    """Prompts per old / reference log-prob pass: `rl.logprob_prompts`, 0 meaning
    `rl.update_batch_size`."""
    return rl.logprob_prompts or rl.update_batch_size


class Passes:
    """`logprob_batches(train)` and `update_batches(train, order)`: what each pass of a step
    takes; `streamed`: micro-batch by micro-batch (then `micro` is set)."""

    def __init__(self, rl, placement: PromptPlacement, micro: training.MicroBatches | None,
                 streamed: bool):
        self.g, self.update_size = rl.num_generations, rl.update_batch_size
        self.logprob_size = logprob_prompts(rl)
        self.placement, self.micro, self.streamed = placement, micro, streamed

    def num_prompts(self, train: dict) -> int:
        return train["tokens"].shape[0] // self.g

    def logprob_batches(self, train: dict) -> list[dict]:
        """The log-prob passes over every sequence of `train`, in order."""
        if self.streamed:
            rows = np.arange(train["tokens"].shape[0])
            return [self.sequences(train, r, LOGPROB_KEYS) for r in chunks(rows, self.micro.size)]
        prompts = np.arange(self.num_prompts(train))
        return [self.chunk_batch(train, p, LOGPROB_KEYS) for p in chunks(prompts, self.logprob_size)]

    def update_batches(self, train: dict, order) -> list:
        """One optimizer step's batch per chunk of `order` (prompt indices): its sequences, or
        where the update streams the iterator of its micro-batches."""
        if self.streamed:
            return [self.micro_batches(train, p) for p in chunks(order, self.update_size)]
        return [self.chunk_batch(train, p) for p in chunks(order, self.update_size)]

    def chunk_batch(self, train: dict, prompts, keys=SEQUENCE_KEYS) -> dict:
        """The sequences of `prompts` (indices into the training batch) for one pass."""
        rows = group_rows(prompts, self.g)
        return {**{k: train[k][rows] for k in keys}, **self.prompts(train, np.asarray(prompts))}

    def prompts(self, train: dict, prompts) -> dict:
        """The embeddings of `prompts`, on the devices, and each sequence's index into them."""
        return {"prompt_embeds": self.placement.on_devices(train["prompt_embeds"][prompts],
                                                           "prompt_embeds"),
                "prompt_valid": self.placement.on_devices(train["prompt_valid"][prompts],
                                                          "prompt_valid"),
                "prompt_index": jnp.repeat(jnp.arange(len(prompts)), self.g)}

    def micro_batches(self, train: dict, prompts):
        """The sequences of `prompts` as the streamed update's micro-batches: rows i, i +
        count, ... as the in-step split takes them, each with the whole update's loss
        denominators and its own sequences' prompts."""
        rows = group_rows(prompts, self.g)
        count = self.micro.count(len(rows))
        totals = loss_totals(train["loss_mask"][rows])
        for i in range(count):
            yield {**self.sequences(train, rows[i::count]), "totals": totals}

    def sequences(self, train: dict, rows, keys=SEQUENCE_KEYS) -> dict:
        """Sequences `rows` of the training batch, each with its own copy of its prompt on the
        devices ([len(rows), T, D] whoever shares them)."""
        prompts = np.asarray(rows) // self.g
        placed = self.prompts(train, prompts)
        return {**{k: train[k][rows] for k in keys}, **placed,
                "prompt_index": jnp.arange(len(rows))}

"""The batches of a GRPO step's passes, cut from its scored rollout batch.

A pass sees whole groups: prompts with their G samples (rows p * G + g of the training
batch), each prompt run once for its samples (`prompt_index` None: the rows are in groups).
The log-prob passes take `rl.logprob_prompts` prompts at a time and the update
`rl.update_batch_size` (one optimizer step each; one compiled shape). Micro-batches (`optim.micro_batch_size` sequences) are whole
groups too: that many sequences' worth of groups, at least one, so that no micro-batch runs
a prompt for samples another one has. Where the update streams (`rl.offload_prompts` with
`optim.micro_batch_size`), the log-prob and update passes go micro-batch by micro-batch,
each copying its own prompts from host memory.
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


def groups_per_micro_batch(size: int, group_size: int) -> int:
    """Whole groups in a micro-batch of `size` sequences: size // G, at least one."""
    return max(1, size // group_size)


def micro_batch_count(prompts: int, size: int, group_size: int) -> int:
    """How many micro-batches of whole groups a pass over `prompts` prompts makes."""
    groups = groups_per_micro_batch(size, group_size)
    if prompts % groups:
        raise ValueError(f"{prompts} prompts do not split into micro-batches of {groups} whole "
                         f"groups (optim.micro_batch_size={size}, rl.num_generations="
                         f"{group_size})")
    return prompts // groups


PROMPT_KEYS = ("prompt_embeds", "prompt_valid")


def split_micro_batches(batch: dict, micro: training.MicroBatches) -> tuple[dict, dict]:
    """The batch (rows p * G + g) as micro-batches of whole groups inside one jitted step,
    each with its own prompts: micro-batch i takes groups i, i + count, ... (strided, so each
    stays spread over the devices that hold the batch)."""
    p, n = batch["prompt_embeds"].shape[0], batch["tokens"].shape[0]
    g = n // p
    count = micro_batch_count(p, micro.size, g)
    rows = lambda x: training.split_rows(x.reshape(p, g, *x.shape[1:]), count).reshape(  # noqa: E731
        count, -1, *x.shape[1:])
    shared = {"totals": loss_totals(batch["loss_mask"]), "prompt_index": None}  # in groups
    stacked = {k: training.split_rows(batch[k], count) for k in PROMPT_KEYS}
    stacked.update({k: rows(v) for k, v in batch.items() if k not in shared and k not in stacked})
    return shared, stacked


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

    def logprob_batches(self, train: dict) -> list:
        """The log-prob passes over every sequence of `train`, in order (lazily, where each
        copies its prompts from host memory)."""
        prompts = np.arange(self.num_prompts(train))
        size = (groups_per_micro_batch(self.micro.size, self.g) if self.streamed
                else self.logprob_size)
        return (self.chunk_batch(train, p, LOGPROB_KEYS) for p in chunks(prompts, size))

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
                "prompt_index": None}  # rows in groups: each reads its prompt's keys in place

    def micro_batches(self, train: dict, prompts):
        """The groups of `prompts` as the streamed update's micro-batches, groups i, i +
        count, ... as the in-step split takes them, each with the whole update's loss
        denominators and its own prompts copied to the devices."""
        count = micro_batch_count(len(prompts), self.micro.size, self.g)
        totals = loss_totals(train["loss_mask"][group_rows(prompts, self.g)])
        for i in range(count):
            yield {**self.chunk_batch(train, prompts[i::count]), "totals": totals}

"""What both learners share: the optimizer, trainable/frozen split, guarded updates.

Parameters cross `jit` as (graphdef, trainable state, frozen state); only the trainable
part has gradients and optimizer state. A step whose loss or gradient is not finite
leaves parameters and optimizer state untouched and says so in its metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec



def learning_rate(optim) -> optax.Schedule:
    """Linear warm-up then cosine decay (or constant) from the `optim` config."""
    if optim.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1)),
                                     optax.constant_schedule(optim.lr)], [optim.warmup_steps])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, max(optim.warmup_steps, 1), max(optim.decay_steps, optim.warmup_steps + 1),
            end_value=optim.lr * optim.end_lr_fraction)
    raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {optim.schedule!r}")


def make_optimizer(optim) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and optional gradient accumulation."""
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(learning_rate(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay))
    if optim.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=optim.grad_accum_steps)
    return tx


def param_filter(trainable_prefixes: Sequence[str], frozen_paths: Sequence[str] = ()):
    """An nnx filter: parameters under one of the prefixes, minus the frozen paths."""
    def is_trainable(path, value) -> bool:
        name = ".".join(str(p) for p in path)
        return (isinstance(value, nnx.Param)
                and any(name == p or name.startswith(p + ".") for p in trainable_prefixes)
                and not any(name == f or name.startswith(f + ".") for f in frozen_paths))
    return is_trainable


def opt_state_shardings(tx: optax.GradientTransformation, trainable):
    """Where the optimizer state of `trainable` (arrays or shape structs with a sharding) lives:
    each moment beside its parameter, counters replicated on the mesh; None off a mesh."""
    placed = [x.sharding for x in jax.tree.leaves(trainable)
              if isinstance(getattr(x, "sharding", None), NamedSharding)]
    if not placed:
        return None
    replicated = NamedSharding(placed[0].mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, param: param.sharding, jax.eval_shape(tx.init, trainable), trainable,
        transform_non_params=lambda _: replicated)


def init_opt_state(tx: optax.GradientTransformation, trainable):
    """The optimizer state, placed by `opt_state_shardings` (left to itself, jit puts an
    initial state that does not read the values on one device)."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable))(trainable)


@dataclasses.dataclass
class TrainState:
    """Parameters split for training, plus the optimizer state and step."""

    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: int = 0

    @classmethod
    def create(cls, model: nnx.Module, is_trainable, tx: optax.GradientTransformation):
        graphdef, trainable, frozen = nnx.split(model, is_trainable, ...)
        return cls(graphdef, trainable, frozen, init_opt_state(tx, trainable))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """Gradient accumulation inside the jitted step: the batch's rows (SFT and GRPO:
    sequences) `size` at a time. `split(batch, micro)` -> (shared, stacked): what every
    micro-batch reads whole (e.g. GRPO's prompt embeddings, indexed by each sequence) and the
    `micro.count(rows)` micro-batches stacked, each carrying the whole batch's loss
    denominators, so that each micro-batch's loss (and metric) is its share of the whole
    batch's and the sums are exact."""

    size: int
    split: Callable

    def count(self, rows: int) -> int:
        """How many micro-batches a batch of `rows` rows makes (at least one)."""
        if rows > self.size and rows % self.size:
            raise ValueError(f"a batch of {rows} rows does not split into micro-batches of "
                             f"optim.micro_batch_size={self.size}")
        return max(1, rows // self.size)


def micro_batching(optim, split: Callable) -> MicroBatches | None:
    """`optim.micro_batch_size` rows at a time (0: the whole batch at once)."""
    size = int(optim.micro_batch_size)
    return MicroBatches(size, split) if size else None


def split_rows(x, count: int):
    """Rows [count * R, ...] -> [count, R, ...]: micro-batch i takes rows i, i + count, ...
    (strided, so each stays spread over the devices that hold the batch)."""
    return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)


def summed_over_micro_batches(loss_and_grad: Callable, trainable, shared: dict, stacked: dict):
    """(loss, aux) and gradients summed over the micro-batches `stacked` (leading axis) with
    `lax.scan`, each seeing `shared` too: one micro-batch's activations alive at a time."""
    def of(micro_batch):
        return loss_and_grad(trainable, {**shared, **micro_batch})

    first = jax.tree.map(lambda x: x[0], stacked)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(of, first))

    def add(total, micro_batch):
        return jax.tree.map(jnp.add, total, of(micro_batch)), None
    return jax.lax.scan(add, zeros, stacked)[0]


def guarded_update(tx, loss_fn: Callable, trainable, frozen, opt_state, graphdef, batch,
                   micro: MicroBatches | None = None):
    """One optimizer step of loss_fn(model, batch) -> (loss, aux), skipped when not finite;
    with `micro`, the gradients accumulated over micro-batches inside the step."""
    def loss_of(t, b):
        return loss_fn(nnx.merge(graphdef, t, frozen), b)

    loss_and_grad = jax.value_and_grad(loss_of, has_aux=True)
    if micro is None:
        summed = loss_and_grad(trainable, batch)
    else:
        summed = summed_over_micro_batches(loss_and_grad, trainable, *micro.split(batch, micro))
    return guarded_apply(tx, trainable, opt_state, summed)


def guarded_apply(tx, trainable, opt_state, summed):
    """The optimizer step from ((loss, aux), gradients), skipped (the parameters and state
    kept) when the loss or the gradient norm is not finite."""
    (loss, aux), grads = summed
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt_state = tx.update(safe_grads, opt_state, trainable)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    trainable = keep(optax.apply_updates(trainable, updates), trainable)
    opt_state = keep(new_opt_state, opt_state)
    return trainable, opt_state, {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}


class StreamedUpdate:
    """Gradient accumulation across jitted calls, for batches too large to place at once:
    each micro-batch reaches the devices only for its own pass (a long video's prompt
    embeddings come from host memory) and its ((loss, aux), gradients) are added to a
    donated sum; the optimizer then applies the sum once, guarded as `guarded_update`.
    Each micro-batch carries the whole batch's loss denominators (`MicroBatches`), so the
    step is the in-step accumulation's (and the whole batch's) update.

    `step(trainable, frozen, opt_state, graphdef, micro_batches)` -> (trainable, opt_state,
    metrics); the phases compile apart (`first`, `add`, `apply`)."""

    def __init__(self, tx, loss_fn: Callable):
        def of(trainable, frozen, graphdef, batch):
            def loss_of(t):
                return loss_fn(nnx.merge(graphdef, t, frozen), batch)
            return jax.value_and_grad(loss_of, has_aux=True)(trainable)

        def add(trainable, frozen, summed, graphdef, batch):
            return jax.tree.map(jnp.add, summed, of(trainable, frozen, graphdef, batch))
        self.first = jax.jit(of, static_argnames="graphdef")
        self.add = jax.jit(add, static_argnames="graphdef", donate_argnums=(2,))
        self.apply = jax.jit(functools.partial(guarded_apply, tx), donate_argnums=(0, 1, 2))

    def step(self, trainable, frozen, opt_state, graphdef, micro_batches):
        summed = None
        for batch in micro_batches:
            if summed is None:
                summed = self.first(trainable, frozen, graphdef=graphdef, batch=batch)
            else:
                summed = self.add(trainable, frozen, summed, graphdef=graphdef, batch=batch)
        return self.apply(trainable, opt_state, summed)


def jit_update(tx, loss_fn: Callable, donate: bool = True, micro: MicroBatches | None = None):
    """`guarded_update` jitted: (trainable, frozen, opt_state, graphdef=, batch=) ->
    (trainable, opt_state, metrics). `donate` reuses the trainable and optimizer buffers
    (callers keep no other reference to them); compile-only callers pass False."""
    return jax.jit(functools.partial(guarded_update, tx, loss_fn, micro=micro),
                   static_argnames="graphdef", donate_argnums=(0, 2) if donate else ())


class NonFiniteGuard:
    """Counts consecutive non-finite steps; past the limit the run must stop."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, finite: bool, step: int, batch_names: Sequence[str]) -> str | None:
        """A message for a skipped step (None when the step was fine)."""
        if finite:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        return (f"step {step}: loss or gradient is NaN/inf; update skipped "
                f"({self.in_a_row} in a row, stop after {self.limit}); batch: {list(batch_names)}")

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit

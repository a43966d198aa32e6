"""The training stages behind one interface, chosen once from `config.stage`.

A `Stage` knows what a run of it is made of: its checks and its pre-stage, which rows of a
batch each process reads, its data and learner, what trains and its loss, the shapes of its
update's batch (to compile a recipe from shapes alone), and what a step runs and holds
beside the update. `stage_of(config)` is the one place that reads `config.stage`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from lvr_jax.config import ConfigError
from lvr_jax.rl.stage import GRPO
from lvr_jax.sft.stage import SFT
from lvr_jax.sharding.hosts import RowShare
from lvr_jax.training import MicroBatches, TrainState


class Learner(Protocol):
    """What the run loop drives: `step` trains on one batch and returns its metrics."""

    state: TrainState
    looks_ahead: bool  # step wants the next batch as `upcoming` (it starts on it early)

    def step(self, batch: dict, upcoming: dict | None = None) -> dict: ...


class Stage(Protocol):
    name: str
    curves: tuple[str, ...]  # the metrics the run's PNG plots
    batch_layout: dict  # logical axes of update-batch arrays beyond rows over the batch axes

    def check(self, config) -> None:
        """Refuses settings this stage cannot run (`ConfigError`), before any work."""

    def prepare(self, config, workdir: str) -> None:
        """What runs before the stage (SFT from scratch: the text drills); may set
        `config.model.init`."""

    def video_output(self, config) -> str:
        """What the video path caches for this stage (`video_embeddings.OUTPUTS`)."""

    def row_share(self, config, mesh) -> RowShare:
        """Which rows of each batch this process reads."""

    def dataset(self, data, tokenizer, on_epoch_end: Callable | None) -> Iterator[dict]:
        """The stage's batches (`data`: a `DataConfig`; `on_epoch_end` takes each epoch's
        report of skipped records)."""

    def learner(self, config, model, tokenizer, cache, mesh, share: RowShare) -> Learner: ...

    def trainable_filter(self, config) -> Callable: ...

    def loss_fn(self, config, mesh) -> Callable:
        """loss(model, batch) -> (loss, aux) of the update."""

    def micro_batches(self, config) -> MicroBatches | None: ...

    def streams_update(self, config) -> bool:
        """Whether the update goes micro-batch by micro-batch in passes of their own."""

    def abstract_batch(self, config, model_config, mesh, micro: bool = False) -> dict:
        """Shape structs of one update batch, or (`micro`) of one streamed micro-batch."""

    def trace_phases(self, config, mesh, llm, abstract_batch: Callable) -> dict:
        """Phases of a step besides frame encoding and the update, traced from shapes:
        name -> `jax.jit(...).trace(...)` (`llm`: the abstract LLM; `abstract_batch`: its
        placed shapes)."""

    def phase_calls(self, config) -> dict:
        """How often a step runs each phase (`memory_report`'s phases): name -> count (the
        frame encoding: once per video of a batch, on a cache that has none of them)."""

    def loop_trips(self, config) -> int:
        """The bound of the while loops a step's phases run (counting their FLOPs)."""

    def held_during_step(self, config, trainable, abstract_batch: Callable,
                         bytes_of: Callable) -> dict:
        """What a step keeps on each device through all its phases besides the weights and
        the optimizer state: what -> bytes (`trainable`: the placed weights' shapes;
        `bytes_of(tree)`: one device's bytes of placed shapes)."""

    def memory_notes(self, config) -> list[str]:
        """Lines for the compile-only memory report (what lives off the devices)."""


STAGES: dict[str, Stage] = {"sft": SFT(), "grpo": GRPO()}


def stage_of(config) -> Stage:
    """The stage `config.stage` names."""
    if config.stage not in STAGES:
        raise ConfigError(f"config.stage must be one of {sorted(STAGES)}, got {config.stage!r}")
    return STAGES[config.stage]

"""grain pipelines for SFT, RL and evaluation: records -> (worker processes) frames + tokens -> batches.

    records -> shuffle(seed, per epoch) -> shard -> repeat -> tag epoch -> make example
            -> read threads + read-ahead     # decoding: read_threads at once, read_buffer ahead
            -> mp_prefetch(num_workers)      # ... in each of num_workers processes
            -> skip stage                    # bad videos: skip and count, or stop with the error
            -> batch (pad to length buckets)

Host memory is bounded by configuration: at most `DataConfig.examples_in_flight` decoded
examples exist at once (each `num_frames * frame_size**2 * 3` bytes), whatever the consumer does.

Iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` (JSON-able dicts, or
orbax through grain's checkpoint handler) restore a run at exactly the next record.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags

from lvr_jax.data import templates
from lvr_jax.data.batching import PadBatch, default_buckets
from lvr_jax.data.frame_cache import FrameCache
from lvr_jax.data.schema import (EvalRecord, TrainRecord, category_name, load_eval_records,
                                 load_train_records)
from lvr_jax.data.skipping import EpochReport, SkipBadRecords, SkippedRecord
from lvr_jax.data.video import BACKENDS, DEFAULT_MAX_PIXELS, BadVideoError, read_frames
from lvr_jax.tokenizer import Tokenizer

__all__ = ["DataConfig", "EpochReport", "SkippedRecord", "sft_dataset", "rl_dataset",
           "eval_dataset"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything a data pipeline needs; an ml_collections config fills it as DataConfig(**cfg)."""

    records: str | Sequence[str] = ()  # .jsonl / .json / .parquet file(s)
    video_root: str = ""  # record video paths are relative to it
    num_frames: int = 64
    frame_size: int = 448  # the vision tower's square input resolution
    video_backend: str = "auto"  # "auto" (decord, then PyAV), "decord" or "pyav"
    on_bad_video: str = "skip"  # "skip": drop and count; "error": stop with the named error
    on_bad_record: str = "error"  # a record that fails validation when the file is read
    cache_dir: str | None = None  # on-disk frame cache; None: decode every time
    batch_size: int = 8
    max_length: int = 4096  # text tokens (the video placeholder counts as one); longer: skipped
    length_buckets: Sequence[int] = ()  # () -> powers of two up to max_length
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1  # None: repeat forever
    drop_remainder: bool = True
    max_video_pixels: int = DEFAULT_MAX_PIXELS  # per frame; larger videos are skipped (0: any)
    num_workers: int = 2  # decoding processes; 0 decodes in the calling process
    worker_buffer_size: int = 2  # examples each worker process holds ready
    read_threads: int = 0  # videos decoded at once per process; 0: sized from the batch
    read_buffer: int = 0  # examples read ahead per process; 0: its share of one batch
    # This host's share: records index, index + count, ... of each shuffled epoch, so that
    # the batches of the `count` shards together hold the records of one batch of
    # count x batch_size (`Stage.row_share` picks them for a multi-host run).
    shard_index: int = 0
    shard_count: int = 1
    think: bool = True  # evaluation prompts: ask for reasoning, or for the letter alone
    # training records of these categories only (any spelling schema.category_name takes);
    # (): every record
    categories: Sequence[str] = ()

    def __post_init__(self):
        if self.on_bad_video not in ("skip", "error"):
            raise ValueError(f"on_bad_video must be 'skip' or 'error', got {self.on_bad_video!r}")
        if self.video_backend not in BACKENDS:
            raise ValueError(f"video_backend must be one of {BACKENDS}, got {self.video_backend!r}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} is not in [0, {self.shard_count})")

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self.length_buckets) or default_buckets(self.max_length)

    @property
    def read_options(self) -> grain.ReadOptions:
        """grain's read threads and read-ahead (its defaults, 16 and 500, are unbounded in practice)."""
        threads = self.read_threads or (1 if self.num_workers else min(4, self.batch_size))
        share = -(-self.batch_size // max(1, self.num_workers))
        return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.read_buffer or share)

    @property
    def examples_in_flight(self) -> int:
        """The most decoded examples the pipeline holds: read-ahead and decoding in every
        process, each worker's buffer, and the batch being assembled."""
        options, processes = self.read_options, max(1, self.num_workers)
        reading = processes * (options.num_threads + options.prefetch_buffer_size)
        return reading + self.num_workers * self.worker_buffer_size + self.batch_size

    @property
    def example_bytes(self) -> int:
        return self.num_frames * self.frame_size ** 2 * 3


def _skip(record, reason: str, message: str, epoch: int,
          error: BadVideoError | None = None) -> dict:
    """The element a worker returns in place of `record` when it cannot use it."""
    details = (error.path, error.reason, error.where) if error else None
    return {"_skip": reason, "_message": message, "_error": details, "epoch": epoch,
            "record": record.origin, "id": getattr(record, "id", None)}


class _TagEpoch:
    """(index, record) -> (epoch, record), for the end-of-epoch report."""

    def __init__(self, epoch_size: int):
        self.epoch_size = epoch_size

    def __call__(self, index: int, record):
        return index // self.epoch_size, record


class _MakeExample:
    """Turns (epoch, record) into an example dict in a worker: frames, tokens and metadata."""

    def __init__(self, kind: str, config: DataConfig, tokenizer: Tokenizer):
        self.kind, self.config, self.tokenizer = kind, config, tokenizer

    def __call__(self, item) -> dict[str, Any]:
        epoch, record = item
        tokens = self._tokens(record)
        length = len(next(iter(tokens.values())))
        if length > self.config.max_length:
            return _skip(record, "too_long", f"{record.origin}: {length} text tokens exceed "
                         f"max_length {self.config.max_length}", epoch)
        try:
            video = self._frames(record)
        except BadVideoError as error:
            error = BadVideoError(error.path, error.reason, record.origin)
            return _skip(record, "bad_video", str(error), epoch, error)
        return {**tokens, **self._metadata(record), "frames": video.frames,
                "frame_indices": video.indices, "video_key": video.fingerprint,
                "record": record.origin, "epoch": epoch}

    @functools.cached_property
    def _cache(self) -> FrameCache | None:
        return FrameCache(self.config.cache_dir) if self.config.cache_dir else None

    def _frames(self, record):
        config = self.config
        return read_frames(os.path.join(config.video_root, record.video), config.num_frames,
                           config.frame_size, config.video_backend, self._cache,
                           config.max_video_pixels)

    def _tokens(self, record) -> dict[str, np.ndarray]:
        if self.kind == "sft":
            target = templates.sft_target(record.answer, record.reasoning)
            input_ids, loss_mask = templates.encode_sft(self.tokenizer, record.problem, target)
            return {"input_ids": input_ids, "loss_mask": loss_mask}
        question = (record.problem if self.kind == "rl"
                    else templates.format_question(record.question, record.options))
        think = self.config.think or self.kind == "rl"
        return {"prompt_ids": templates.encode_prompt(self.tokenizer, question, think)}

    def _metadata(self, record) -> dict[str, Any]:
        if self.kind == "sft":
            return {}
        if self.kind == "rl":
            return {"ground_truth": record.ground_truth, "problem": record.problem}
        return {"answer": record.answer, "category": record.category, "duration": record.duration,
                "question": record.question, "options": record.options, "id": record.id}


def _records_dataset(records: Sequence, config: DataConfig) -> grain.MapDataset:
    """Seeded per-epoch shuffle, this host's shard, repeated, each record tagged with its epoch."""
    if not records:
        raise ValueError("no records to read: give DataConfig.records or a records list")
    ds = grain.MapDataset.source(list(records))
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    ds = ds[config.shard_index::config.shard_count]
    epoch_size = len(ds)
    if epoch_size == 0:
        raise ValueError(f"shard {config.shard_index} of {config.shard_count} holds no records")
    return ds.repeat(config.num_epochs).map_with_index(_TagEpoch(epoch_size))


def exit_with_parent(worker_index: int, worker_count: int, poll_s: float = 1.0) -> None:
    """Run in each worker process: it exits once the process that started it is gone, so
    a killed run (SIGKILL, a crash) leaves no decoding worker, nor its shared memory, behind."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are adopted by another
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` take their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def records_source(config: DataConfig, records: Sequence) -> str:
    """The files `records` were read from, which errors name: the records handed in (the
    evaluation's, say) rather than `config.records` (the training files)."""
    files = list(dict.fromkeys(r.file for r in records if getattr(r, "file", "")))
    return ", ".join(files) if files else str(config.records or "the records")


def _build(kind: str, records: Sequence, config: DataConfig, tokenizer: Tokenizer,
           batch_fn: PadBatch, drop_remainder: bool,
           on_epoch_end: Callable[[EpochReport], None] | None,
           on_skip: Callable[[SkippedRecord], None] | None = None) -> grain.IterDataset:
    files = records_source(config, records)
    if drop_remainder and len(records) < config.batch_size:  # else no batch, ever
        raise ValueError(f"{files}: {len(records)} records, fewer than one batch "
                         f"(data.batch_size={config.batch_size})")
    ds = _records_dataset(records, config).map(_MakeExample(kind, config, tokenizer))
    ds = ds.to_iter_dataset(config.read_options)
    if config.num_workers > 0:
        _ensure_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=config.num_workers,
                                               per_worker_buffer_size=config.worker_buffer_size)
        ds = ds.mp_prefetch(options, worker_init_fn=exit_with_parent)
    source = f"{files} (video_root {config.video_root or '.'!r})"
    ds = SkipBadRecords(ds, on_bad_video=config.on_bad_video, on_epoch_end=on_epoch_end,
                        source=source, on_skip=on_skip)
    return ds.batch(config.batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)


def training_records(config: DataConfig,
                     records: Sequence[TrainRecord] | None = None) -> list[TrainRecord]:
    """`records` (default: read from `config.records`) of `config.categories` (all if empty)."""
    if records is None:
        records = load_train_records(config.records, config.on_bad_record)
    if not config.categories:
        return list(records)
    wanted = {category_name(c, "data.categories") for c in config.categories}
    kept = [r for r in records if r.category in wanted]
    if not kept:
        raise ValueError(f"no record of {config.records or 'the records'} has a category in "
                         f"data.categories {sorted(wanted)}")
    return kept


def sft_dataset(config: DataConfig, tokenizer: Tokenizer,
                records: Sequence[TrainRecord] | None = None,
                on_epoch_end: Callable[[EpochReport], None] | None = None) -> grain.IterDataset:
    """Batches {input_ids, loss_mask, token_mask [B, L] int32, frames [B, F, S, S, 3] uint8, ...}."""
    records = training_records(config, records)
    batch_fn = PadBatch({"input_ids": tokenizer.pad_id, "loss_mask": 0}, "token_mask",
                        config.buckets, side="right")
    return _build("sft", records, config, tokenizer, batch_fn, config.drop_remainder, on_epoch_end)


def rl_dataset(config: DataConfig, tokenizer: Tokenizer,
               records: Sequence[TrainRecord] | None = None,
               on_epoch_end: Callable[[EpochReport], None] | None = None) -> grain.IterDataset:
    """Batches {prompt_ids, prompt_mask [B, L] left-padded, ground_truth [B] str, frames, ...}."""
    records = training_records(config, records)
    batch_fn = PadBatch({"prompt_ids": tokenizer.pad_id}, "prompt_mask", config.buckets, "left")
    return _build("rl", records, config, tokenizer, batch_fn, config.drop_remainder, on_epoch_end)


def eval_dataset(config: DataConfig, tokenizer: Tokenizer,
                 records: Sequence[EvalRecord] | None = None,
                 on_epoch_end: Callable[[EpochReport], None] | None = None,
                 on_skip: Callable[[SkippedRecord], None] | None = None) -> grain.IterDataset:
    """Every record once, in file order: prompt_ids/prompt_mask, answer, category, duration,
    frames; each record skipped (a bad video, too long) is handed to `on_skip`."""
    records = records if records is not None else load_eval_records(config.records,
                                                                    config.on_bad_record)
    config = dataclasses.replace(config, shuffle=False, num_epochs=1)
    batch_fn = PadBatch({"prompt_ids": tokenizer.pad_id}, "prompt_mask", config.buckets, "left")
    return _build("eval", records, config, tokenizer, batch_fn, False, on_epoch_end, on_skip)

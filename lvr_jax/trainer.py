"""The training loop of one stage in one workdir: resume, step, validate, log, checkpoint,
export. `python -m lvr_jax.train` runs it from the command line; the demo and the
benchmarks call `run`.

The workdir holds checkpoints (an interrupted run resumes from the latest by itself),
metrics as JSONL and TensorBoard events, a PNG of the learning curves, and at the end the
model as a VILA directory (`workdir/model`) that a GRPO stage or transformers can load.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import logging
import os
import signal
import socket
import threading
import time

import jax
from tqdm import tqdm

from lvr_jax import metrics as metrics_lib
from lvr_jax.build import build_model, make_data, make_run_mesh
from lvr_jax.checkpointing import CheckpointMismatch, Checkpointer, CheckpointSaveError
from lvr_jax.config import ConfigError, check_values, preset_config
from lvr_jax.data.skipping import NoUsableRecordsError
from lvr_jax.eval.validation import Validation
from lvr_jax.model import save_pretrained
from lvr_jax.sharding import hosts
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.stages import stage_of
from lvr_jax.training import NonFiniteGuard
from rollout_bridge.client import RolloutServerUnavailable

log = logging.getLogger("lvr_jax.trainer")


class Lookahead:
    """A data iterator one batch ahead; its state is that after the last batch handed out,
    so a resumed run neither skips nor repeats the batch it had only looked at."""

    def __init__(self, data):
        self.data, self.ahead = data, None

    def _fetch(self):
        return next(self.data), self.data.get_state()

    def __next__(self):
        batch, self.state = self.ahead or self._fetch()
        self.ahead = self._fetch()
        return batch

    def peek(self):
        return self.ahead[0]

    def get_state(self):
        return self.state if self.ahead else self.data.get_state()

    def set_state(self, state) -> None:
        self.data.set_state(state)
        self.ahead = None

    def close(self) -> None:
        self.data.close()


class Run:
    """One stage in one workdir: resumes, steps, logs, checkpoints, exports.

    On several processes every one runs this; each reads its share of the data
    (`Stage.row_share`), all take part in checkpoints (orbax writes each array once, the
    meta keeps every process's data position), and only the first writes metrics, plots
    and the export.
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir, self.stage = config, workdir, stage_of(config)
        mesh_lib.initialize_distributed(config.get("distributed"))
        mesh = make_run_mesh(config)
        self.tokenizer, model = build_model(config, mesh)
        self.cache = EmbeddingCache.of(config.cache)
        share = self.stage.row_share(config, mesh)
        self.learner = self.stage.learner(config, model, self.tokenizer, self.cache, mesh, share)
        self.data = make_data(config, model, self.tokenizer, share)
        if self.learner.looks_ahead:  # the learner generates the next batch early
            self.data = Lookahead(self.data)
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                                 config.train.keep_checkpoints, config.train.async_checkpoints)
        self.guard = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.validation = (Validation(config, model, self.tokenizer, mesh) if config.eval.every
                           else None)

    def train_state(self) -> dict:
        s = self.learner.state
        return {"trainable": s.trainable, "opt_state": s.opt_state}

    def save(self, force: bool = False) -> None:
        data = self.data.get_state()
        meta = {"step": self.learner.state.step, "cache": self.cache.manifest(),
                "data": hosts.gather_json(data) if hosts.multiprocess() else data}
        self.ckpt.save(self.learner.state.step, self.train_state(), meta, force=force)

    def resume(self) -> None:
        try:
            latest = self.ckpt.restore_latest(self.train_state(),
                                              explain=lambda *d: settings_of(self.config, *d))
        except CheckpointMismatch as error:  # a usage error: nothing moved, nothing dropped
            raise ConfigError(f"{error}; resume with the settings the checkpoint was trained "
                              "with, or start afresh in another --workdir") from None
        if latest is None:
            return
        step, restored, meta = latest
        s = self.learner.state
        s.trainable, s.opt_state, s.step = restored["trainable"], restored["opt_state"], meta["step"]
        self.data.set_state(self.data_position(meta["data"]))
        log.warning("resumed %s from step %d in %s", self.stage.name, step, self.workdir)

    @staticmethod
    def data_position(saved):
        """This process's data iterator state from a checkpoint's meta."""
        if not isinstance(saved, list):  # written by one process
            if hosts.multiprocess():
                raise SystemExit("the checkpoint was written by one process; resume it on one")
            return saved
        if len(saved) != jax.process_count():
            raise SystemExit(f"the checkpoint was written by {len(saved)} processes; resume it "
                             f"on as many (this run has {jax.process_count()})")
        return saved[jax.process_index()]

    def log(self, step: int, metrics: dict) -> None:
        if self.writer:
            self.writer.write(step, metrics)

    def step_once(self) -> dict:
        start = time.perf_counter()
        batch = next(self.data)
        out = self.learner.step(batch, self.data.peek() if self.learner.looks_ahead else None)
        out["step_seconds"] = time.perf_counter() - start
        message = self.guard.check(bool(out.get("finite", True)), self.learner.state.step,
                                   batch.get("record", []))
        if message:
            log.warning("%s", message)
        return out

    def run(self) -> dict:
        self.resume()
        self.writer = (metrics_lib.MetricsWriter(self.workdir, self.stage.name,
                                                 self.learner.state.step)
                       if hosts.is_writer() else None)
        if self.validation and self.learner.state.step == 0:  # where the curve starts
            self.log(0, self.validation(self.learner.state.model()))
        try:
            last = self.loop()
        except CheckpointSaveError as error:
            raise SystemExit(f"{error}; the run stopped at step {self.learner.state.step}: "
                             f"free space in {self.workdir} and rerun to resume") from None
        self.finish()
        return last

    def loop(self) -> dict:
        """Steps to `train.num_steps`, validating, logging and saving on the way; the last
        step's metrics."""
        train, last = self.config.train, {}
        bar = tqdm(total=train.num_steps, initial=self.learner.state.step, desc=self.stage.name,
                   disable=not hosts.is_writer())
        with StopSignals() as stop, bar:  # the bar closes before a stop's message prints
            while self.learner.state.step < train.num_steps:
                last = self.checked_step()
                step = self.learner.state.step
                if self.validation and (step % self.config.eval.every == 0
                                        or step == train.num_steps):
                    last.update(self.validation(self.learner.state.model()))
                self.log(step, last)
                bar.set_postfix(metrics_lib.short_summary(last))
                bar.update(1)
                if self.guard.exhausted:
                    self.stop(f"{self.guard.limit} non-finite steps in a row at step {step}")
                asked = stop.asked()
                if asked:
                    self.stop(f"{asked} at step {step}")
                if step % train.checkpoint_every == 0 or step == train.num_steps:
                    self.save()
        return last

    def checked_step(self) -> dict:
        """`step_once`, stopping the run with a checkpoint where going on cannot help."""
        try:
            self.ckpt.check()  # a save that failed in the background stops the run here
            return self.step_once()
        except RolloutServerUnavailable as error:  # saved at the step the rollout was for
            self.stop(f"{error}", "restart the server and rerun to resume")
        except NoUsableRecordsError as error:  # e.g. the video root went away mid-run
            self.stop(f"{error}\n", "fix the data and rerun to resume")

    def stop(self, why: str, then: str = "rerun the same command to resume") -> None:
        """Saves a checkpoint of this step (every process) and ends the run, non-zero."""
        step = self.learner.state.step
        if step:
            self.save(force=True)
            try:
                self.ckpt.wait()
            except CheckpointSaveError as error:
                raise SystemExit(f"{why}; {error}") from None
        self.data.close()  # the data's worker processes end now, not at interpreter exit
        where = (f"stopped with a checkpoint of step {step} in {self.workdir}/checkpoints" if step
                 else "stopped at step 0, before any checkpoint")
        separator = "\n" if why.endswith("\n") else "; "  # after a message of several lines
        raise SystemExit(f"{why.rstrip()}{separator}{where}; {then}")

    def finish(self) -> None:
        try:
            self.ckpt.wait()
        except CheckpointSaveError as error:
            raise SystemExit(f"{error}; free space in {self.workdir} and rerun to resume") from None
        if self.writer:
            self.writer.close()
            metrics_lib.plot_curves(self.writer.path, self.stage.curves,
                                    os.path.join(self.workdir, f"{self.stage.name}_curves.png"),
                                    f"{self.stage.name} ({self.workdir})")
        if self.config.train.export:
            model = self.learner.state.model()
            model = hosts.on_host(model) if hosts.multiprocess() else model  # all gather
            if hosts.is_writer():
                save_pretrained(model, os.path.join(self.workdir, "model"), tokenizer=self.tokenizer)
            hosts.barrier("export")  # the next stage may read it as soon as this one returns


def settings_of(config, name: str, saved, wanted) -> str:
    """Which of the recipe's model settings give an array the shape it has in this run and
    not in a checkpoint: "model.llm.intermediate_size is 512 here", or "" if none does."""
    if saved is None or wanted is None or len(saved[0]) != len(wanted[0]):
        return ""
    sizes = {w for s, w in zip(saved[0], wanted[0]) if s != w}
    model = preset_config(config)
    keys = [f"model.{part}.{f.name} is {getattr(getattr(model, part), f.name)} here"
            for part in ("llm", "vision") for f in dataclasses.fields(getattr(model, part))
            if getattr(getattr(model, part), f.name) in sizes]
    return ", ".join(keys)


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after the step under way (with a checkpoint);
    a second one stops it at once. `asked()` names the signal, agreed by every process so
    that all stop at the same step."""

    def __init__(self):
        self.signal: str | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.signal = signal.Signals(signum).name
        log.warning("%s received: the run stops with a checkpoint after this step (send it "
                    "again to stop at once)", self.signal)

    def asked(self) -> str | None:
        if hosts.any_process(self.signal is not None):
            return f"{self.signal or 'a stop signal on another process'} received"
        return None


class WorkdirLock:
    """One run per workdir: an exclusive lock on `workdir/.lock` held by the first process
    for the run's life. The kernel drops it when the process ends, however it ends, so a
    killed run never leaves it stuck."""

    def __init__(self, workdir: str):
        self.path, self.fd = os.path.join(workdir, ".lock"), None

    def __enter__(self):
        if not hosts.is_writer():
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                              f"({holder or 'its owner is unknown'}); wait for it to end or "
                              "use another --workdir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def run(config, workdir: str) -> dict:
    """Trains one stage in `workdir` (its checks, lock and pre-stage first); returns the
    last step's metrics."""
    stage = stage_of(config)
    check_values(config)
    stage.check(config)
    mesh_lib.initialize_distributed(config.get("distributed"))  # before the pre-stage
    with WorkdirLock(workdir):
        stage.prepare(config, workdir)
        return Run(config, workdir).run()

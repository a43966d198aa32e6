"""The training loop of one stage in one workdir: resume, step, validate, log, checkpoint,
export. `python -m lvr_jax.train` runs it from the command line; the demo and the
benchmarks call `run`.

The workdir holds checkpoints (an interrupted run resumes from the latest by itself),
metrics as JSONL and TensorBoard events, a PNG of the learning curves, and at the end the
model as a VILA directory (`workdir/model`) that a GRPO stage or transformers can load.
"""

from __future__ import annotations

import logging
import os
import time

import jax
from tqdm import tqdm

from lvr_jax import metrics as metrics_lib
from lvr_jax.build import build_model, make_data, make_run_mesh
from lvr_jax.checkpointing import Checkpointer
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
        latest = self.ckpt.restore_latest(self.train_state())
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
        train = self.config.train
        if self.validation and self.learner.state.step == 0:  # where the curve starts
            self.log(0, self.validation(self.learner.state.model()))
        bar = tqdm(total=train.num_steps, initial=self.learner.state.step, desc=self.stage.name,
                   disable=not hosts.is_writer())
        last = {}
        while self.learner.state.step < train.num_steps:
            try:
                last = self.step_once()
            except RolloutServerUnavailable as e:  # saved at the step the rollout was for
                self.save(force=True)
                self.ckpt.wait()
                raise SystemExit(f"{e}; stopped with a checkpoint in {self.workdir}/checkpoints;"
                                 " restart the server and rerun to resume") from e
            except NoUsableRecordsError as e:  # e.g. the video root went away mid-run
                if self.learner.state.step:
                    self.save(force=True)
                    self.ckpt.wait()
                raise SystemExit(f"{e}\nstopped at step {self.learner.state.step}; fix the data "
                                 f"and rerun to resume from {self.workdir}/checkpoints") from e
            step = self.learner.state.step
            if self.validation and (step % self.config.eval.every == 0 or step == train.num_steps):
                last.update(self.validation(self.learner.state.model()))
            self.log(step, last)
            bar.set_postfix(metrics_lib.short_summary(last))
            bar.update(1)
            if self.guard.exhausted:
                self.save(force=True)
                self.ckpt.wait()
                raise SystemExit(f"{self.guard.limit} non-finite steps in a row at step {step}; "
                                 f"stopped with a checkpoint in {self.workdir}/checkpoints")
            if step % train.checkpoint_every == 0 or step == train.num_steps:
                self.save()
        bar.close()
        self.finish()
        return last

    def finish(self) -> None:
        self.ckpt.wait()
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


def run(config, workdir: str) -> dict:
    """Trains one stage in `workdir` (its checks and pre-stage first); returns the last
    step's metrics."""
    stage = stage_of(config)
    stage.check(config)
    mesh_lib.initialize_distributed(config.get("distributed"))  # before the pre-stage
    stage.prepare(config, workdir)
    return Run(config, workdir).run()

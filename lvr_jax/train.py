"""Training entrypoint: CoT-SFT or GRPO, chosen by `config.stage`.

    python -m lvr_jax.train --config=configs/demo.py:sft --workdir=runs/demo/sft \
        --config.train.num_steps=200

The workdir holds checkpoints (an interrupted run resumes from the latest by itself),
metrics as JSONL and TensorBoard events, a PNG of the learning curves, and at the end the
model as a VILA directory (`workdir/model`) that a GRPO stage or transformers can load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from lvr_jax import metrics as metrics_lib
from lvr_jax.build import (build_model, data_config, make_data, make_learner, make_run_mesh,
                           peak_bytes, phase_memory, row_share)
from lvr_jax.cli import run_app
from lvr_jax.checkpointing import Checkpointer
from lvr_jax.config import check_model_init, check_off_policy, check_sampling
from lvr_jax.data.schema import load_eval_records
from lvr_jax.data.skipping import NoUsableRecordsError
from lvr_jax.eval.evaluate import evaluate
from lvr_jax.eval.scoring import get_scorer
from lvr_jax.model import LongVILA, save_pretrained
from lvr_jax.sharding import hosts
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sft import option_drills
from lvr_jax.training import NonFiniteGuard
from rollout_bridge.client import RolloutServerUnavailable

log = logging.getLogger("lvr_jax.train")

CURVES = {"sft": ("loss", "grad_norm", "cache_hit_rate", "val_accuracy"),
          "grpo": ("val_accuracy", "reward", "accuracy", "pass_at_g", "mixed_groups",
                   "reward_std", "update_alignment", "kl", "entropy", "clip_fraction",
                   "response_length", "logprob_mismatch")}


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
    (`build.row_share`), all take part in checkpoints (orbax writes each array once, the
    meta keeps every process's data position), and only the first writes metrics, plots
    and the export.
    """

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        mesh_lib.initialize_distributed(config.get("distributed"))
        mesh = make_run_mesh(config)
        self.tokenizer, model = build_model(config, mesh)
        self.cache = EmbeddingCache.of(config.cache)
        share = row_share(config, mesh)
        self.learner = make_learner(config, model, self.tokenizer, self.cache, mesh, share)
        self.data = make_data(config, model, self.tokenizer, share)
        if config.stage == "grpo" and config.rl.off_policy_steps:
            self.data = Lookahead(self.data)  # the learner generates the next batch early
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
        log.warning("resumed %s from step %d in %s", self.config.stage, step, self.workdir)

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
        if isinstance(self.data, Lookahead):
            out = self.learner.step(batch, upcoming=self.data.peek())
        else:
            out = self.learner.step(batch)
        out["step_seconds"] = time.perf_counter() - start
        message = self.guard.check(bool(out.get("finite", True)), self.learner.state.step,
                                   batch.get("record", []))
        if message:
            log.warning("%s", message)
        return out

    def run(self) -> dict:
        self.resume()
        self.writer = (metrics_lib.MetricsWriter(self.workdir, self.config.stage,
                                                 self.learner.state.step)
                       if hosts.is_writer() else None)
        train = self.config.train
        if self.validation and self.learner.state.step == 0:  # where the curve starts
            self.log(0, self.validation(self.learner.state.model()))
        bar = tqdm(total=train.num_steps, initial=self.learner.state.step, desc=self.config.stage,
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
            metrics_lib.plot_curves(self.writer.path, CURVES[self.config.stage],
                                    os.path.join(self.workdir, f"{self.config.stage}_curves.png"),
                                    f"{self.config.stage} ({self.workdir})")
        if self.config.train.export:
            model = self.learner.state.model()
            model = hosts.on_host(model) if hosts.multiprocess() else model  # all gather
            if hosts.is_writer():
                save_pretrained(model, os.path.join(self.workdir, "model"), tokenizer=self.tokenizer)
            hosts.barrier("export")  # the next stage may read it as soon as this one returns


class Validation:
    """Greedy accuracy on a fixed slice of validation questions, every `eval.every` steps:
    the first `eval.val_size` records of `eval.val_records` (else of `eval.records`), graded
    by `eval.scorer`."""

    def __init__(self, config, model: LongVILA, tokenizer, mesh=None):
        e = config.eval
        self.mesh, self.rules = mesh, mesh_lib.rules_of(config.mesh)
        self.records = load_eval_records(e.val_records or e.records)[:e.val_size or None]
        self.data = dataclasses.replace(data_config(config, model), batch_size=e.batch_size)
        self.tokenizer, self.max_new_tokens = tokenizer, e.max_new_tokens
        self.scorer = get_scorer(e.scorer).name  # an unknown name stops the run before step 0
        self.cache = EmbeddingCache.of(config.cache, disk=False)

    def __call__(self, model: LongVILA) -> dict:
        result = evaluate(model, self.tokenizer, self.data, self.max_new_tokens, cache=self.cache,
                          progress=False, records=self.records, scorer=self.scorer,
                          mesh=self.mesh, rules=self.rules)
        return {"val_accuracy": result.accuracy, "val_unparseable": result.unparseable}


def drilled_init(config, workdir: str) -> str:
    """The preset model after `drills.steps` option drills, exported once to
    `workdir/drills/model` (an SFT stage from scratch starts there)."""
    out = os.path.join(workdir, "drills", "model")
    if hosts.is_writer() and not os.path.exists(os.path.join(out, "config.json")):
        tokenizer, model = build_model(config)  # on one device of the first process
        trained = option_drills.train_drills(config, model, tokenizer)
        save_pretrained(trained, out, tokenizer=tokenizer)
    hosts.barrier("drills")  # the other processes load what the first wrote
    return out


def run(config, workdir: str) -> dict:
    """Trains one stage in `workdir`; returns the last step's metrics."""
    check_model_init(config)
    check_sampling(config)
    check_off_policy(config)
    mesh_lib.initialize_distributed(config.get("distributed"))  # before the drills
    if config.stage == "sft" and config.drills.steps and not config.model.init:
        config.model.init = drilled_init(config, workdir)
    return Run(config, workdir).run()


def define_flags() -> None:
    """The entrypoint's flags; defined only when run, so that other entrypoints import this module."""
    config_flags.DEFINE_config_file("config", None, "a recipe in configs/, e.g. "
                                    "configs/demo.py:sft", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, plots and the export")
    flags.DEFINE_bool("compile_only", False, "compile one step of the recipe on this "
                      "machine's devices from shapes alone and print its memory")


def report_compiled_memory(config) -> None:
    """What one device needs for each phase of a step of the recipe, without loading weights
    (XLA's memory analysis of this machine's compile) and with what the step holds beside it."""
    mesh = mesh_lib.make_mesh(config.mesh)
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(f"{config.stage} step on {dict(mesh.shape)}, per device:")
    for phase, (memory, held, total) in phase_memory(config, mesh).items():
        print(f"  {phase}: arguments {gib(memory.argument_size_in_bytes)}, temporaries "
              f"{gib(memory.temp_size_in_bytes)}, outputs {gib(memory.output_size_in_bytes)} "
              f"({gib(memory.alias_size_in_bytes)} of them in donated arguments), "
              f"peak {gib(peak_bytes(memory))}")
        beside = ", ".join(f"{what} {gib(size)}" for what, size in held.items())
        print(f"    held beside it: {beside or 'nothing'}; total {gib(total)}")
    if config.stage == "grpo" and config.rl.get("offload_prompts", False):
        print("  in host memory between the passes: the rollout batch's prompt embeddings")


def main(argv) -> None:
    del argv
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is not None and flags.FLAGS.compile_only:
        return report_compiled_memory(config)
    if config is None or workdir is None:
        raise app.UsageError("--config and --workdir are required")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    run(config, workdir)


if __name__ == "__main__":
    run_app(main, define_flags)

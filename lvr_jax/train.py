"""Training entrypoint: CoT-SFT or GRPO, chosen by `config.stage`.

    python -m lvr_jax.train --config=configs/demo.py:sft --workdir=runs/demo/sft \
        --config.train.num_steps=200

The workdir holds checkpoints (an interrupted run resumes from the latest by itself),
metrics as JSONL and TensorBoard events, a PNG of the learning curves, and at the end the
model as a VILA directory (`workdir/model`) that a GRPO stage or transformers can load.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from lvr_jax import metrics as metrics_lib
from lvr_jax import training
from lvr_jax.cli import CommandLineError, run_app
from lvr_jax.checkpointing import Checkpointer
from lvr_jax.config import check_model_init
from lvr_jax.data.pipeline import DataConfig, rl_dataset, sft_dataset
from lvr_jax.data.schema import load_eval_records
from lvr_jax.data.skipping import NoUsableRecordsError
from lvr_jax.eval.evaluate import evaluate
from lvr_jax.eval.scoring import get_scorer
from lvr_jax.model import PRESETS, LongVILA, load_pretrained, save_pretrained
from lvr_jax.model.checkpoint import logical_axes
from lvr_jax.model.video_encoders import (VideoEncoderConfig, VideoEncoderError,
                                          parse_video_encoder)
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sft import option_drills
from lvr_jax.tokenizer import build_tiny_tokenizer, load_tokenizer
from lvr_jax.training import NonFiniteGuard
from rollout_bridge.client import RolloutServerUnavailable

log = logging.getLogger("lvr_jax.train")

CURVES = {"sft": ("loss", "grad_norm", "cache_hit_rate", "val_accuracy"),
          "grpo": ("val_accuracy", "reward", "accuracy", "pass_at_g", "mixed_groups",
                   "reward_std", "update_alignment", "kl", "entropy", "clip_fraction",
                   "response_length", "logprob_mismatch")}


def preset_config(config, tokenizer=None):
    """The LongVILAConfig of `model.preset` with the recipe's overrides (no weights)."""
    m = config.model
    base = PRESETS[m.preset](**({"vocab_size": tokenizer.vocab_size} if tokenizer else {}))
    ids = (dict(video_token_id=tokenizer.video_id, newline_token_id=tokenizer.newline_id)
           if tokenizer else {})
    return base.replace(
        vision=dataclasses.replace(base.vision, **m.vision),
        llm=dataclasses.replace(base.llm, **m.llm), projector_type=m.projector_type,
        dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
        video_encoder=recipe_video_encoder(config, tokenizer) or VideoEncoderConfig(), **ids)


def recipe_video_encoder(config, tokenizer=None):
    """`model.video_encoder` of the recipe as a VideoEncoderConfig; None when unset."""
    value = config.model.get("video_encoder", "")
    if not value:
        return None
    try:
        return parse_video_encoder(value, tokenize=tokenizer.encode if tokenizer else None,
                                   source="config.model.video_encoder")
    except VideoEncoderError as error:
        raise CommandLineError(str(error)) from None


def make_run_mesh(config):
    """The recipe's mesh, or None when it asks for a single device."""
    shape = dict(config.mesh.shape)
    if all(int(v) == 1 for v in shape.values()) or jax.device_count() == 1:
        return None
    return mesh_lib.make_mesh(config.mesh)


def build_model(config, mesh=None):
    """(tokenizer, model): from a VILA directory when `model.init` is set, else the preset.

    On a mesh every parameter is placed in its FSDP/TP sharding as it is loaded.
    """
    m = config.model
    rules = mesh_lib.rules_of(config.mesh)
    if m.init:
        tokenizer = load_tokenizer(m.init)
        kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                  video_encoder=recipe_video_encoder(config, tokenizer))
        model = (mesh_lib.load_sharded(m.init, mesh, rules, **kw) if mesh
                 else load_pretrained(m.init, **kw))
        return tokenizer, check_video_frames(config, model)
    tokenizer = build_tiny_tokenizer()
    model = LongVILA(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed))
    model = mesh_lib.shard_model(model, mesh, rules) if mesh else model
    return tokenizer, check_video_frames(config, model)


def check_video_frames(config, model: LongVILA) -> LongVILA:
    """The model, if its video encoder can pool `data.num_frames` frames; else a usage error."""
    try:
        model.config.num_video_tokens(config.data.num_frames)
    except VideoEncoderError as error:
        raise CommandLineError(f"config.data.num_frames: {error}") from None
    return model


def learner_module(stage: str):
    if stage == "sft":
        from lvr_jax.sft import learner
    elif stage == "grpo":
        from lvr_jax.rl import learner
    else:
        raise ValueError(f"config.stage must be 'sft' or 'grpo', got {stage!r}")
    return learner


def compile_step(config, mesh):
    """Compiles one optimizer step of a recipe on `mesh` from shapes alone (no weights).

    Returns the compiled step; `.memory_analysis()` says what one device needs.
    """
    rules = mesh_lib.rules_of(config.mesh)
    module = learner_module(config.stage)
    model_config = preset_config(config)
    model = nnx.eval_shape(lambda: LongVILA(model_config, rngs=nnx.Rngs(0)))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            sharding = mesh_lib.logical_to_sharding(logical_axes(var), mesh, rules, v.shape)
            var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))
    graphdef, trainable, frozen = nnx.split(model, module.trainable_filter(config), ...)
    tx = training.make_optimizer(config.optim)
    # Adam moments take their parameter's sharding; counters are replicated.
    opt_shardings = jax.jit(tx.init).lower(trainable).compile().output_shardings
    on_mesh = lambda s: s if isinstance(s, NamedSharding) else NamedSharding(mesh, P())  # noqa: E731
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_mesh(s)),
                             jax.eval_shape(tx.init, trainable), opt_shardings)
    batch_sharding = lambda a: NamedSharding(  # noqa: E731
        mesh, P(mesh_lib.BATCH_AXES, *([None] * (len(a.shape) - 1))))
    batch = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding(a))
             for k, a in module.abstract_batch(config, model_config).items()}
    step = jax.jit(functools.partial(training.guarded_update, tx, module.make_loss_fn(config, mesh)),
                   static_argnames="graphdef")
    return step.lower(trainable, frozen, opt_state, graphdef=graphdef, batch=batch).compile()


def data_config(config, model: LongVILA) -> DataConfig:
    """The pipeline's settings; the frame size is the vision tower's, decided by the model."""
    d = config.data
    return DataConfig(records=d.records, video_root=d.video_root, num_frames=d.num_frames,
                      frame_size=model.config.vision.image_size, video_backend=d.video_backend,
                      on_bad_video=d.on_bad_video, cache_dir=d.cache_dir or None,
                      batch_size=d.batch_size, max_length=d.max_length, seed=config.seed,
                      num_epochs=None if d.num_epochs < 0 else d.num_epochs,
                      num_workers=d.num_workers, shard_index=jax.process_index(),
                      shard_count=jax.process_count(), read_threads=d.read_threads,
                      read_buffer=d.read_buffer, worker_buffer_size=d.worker_buffer_size,
                      max_video_pixels=d.max_video_pixels)


def make_learner(config, model, tokenizer, cache, mesh=None):
    module = learner_module(config.stage)
    if config.stage == "sft":
        return module.SFTLearner(model, config, cache, mesh)
    return module.GRPOLearner(model, config, tokenizer, cache, mesh,
                              rollout_engine=make_rollout_engine(config.rl.rollout, tokenizer))


def make_rollout_engine(rollout, tokenizer):
    """None for the embedded JAX sampler, else a client of the rollout servers."""
    if rollout.backend == "jax":
        return None
    if rollout.backend == "server":
        from rollout_bridge.client import make_server_rollout
        return make_server_rollout(rollout, pad_id=tokenizer.pad_id)
    raise ValueError(f"config.rl.rollout.backend must be 'jax' or 'server', got {rollout.backend!r}")


def make_data(config, model, tokenizer):
    build = sft_dataset if config.stage == "sft" else rl_dataset
    report = lambda r: log.warning("%s", r)  # noqa: E731  skipped records, once per epoch
    return iter(build(data_config(config, model), tokenizer, on_epoch_end=report))


class Run:
    """One stage in one workdir: resumes, steps, logs, checkpoints, exports."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        mesh_lib.initialize_distributed(config.get("distributed"))
        mesh = make_run_mesh(config)
        self.tokenizer, model = build_model(config, mesh)
        cache_dir = config.cache.disk_dir or None
        self.cache = EmbeddingCache(config.cache.budget_mb << 20, cache_dir)
        self.learner = make_learner(config, model, self.tokenizer, self.cache, mesh)
        self.data = make_data(config, model, self.tokenizer)
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                                 config.train.keep_checkpoints, config.train.async_checkpoints)
        self.guard = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.validation = Validation(config, model, self.tokenizer) if config.eval.every else None

    def train_state(self) -> dict:
        s = self.learner.state
        return {"trainable": s.trainable, "opt_state": s.opt_state}

    def save(self, force: bool = False) -> None:
        meta = {"step": self.learner.state.step, "data": self.data.get_state(),
                "cache": self.cache.manifest()}
        self.ckpt.save(self.learner.state.step, self.train_state(), meta, force=force)

    def resume(self) -> None:
        latest = self.ckpt.restore_latest(self.train_state())
        if latest is None:
            return
        step, restored, meta = latest
        s = self.learner.state
        s.trainable, s.opt_state, s.step = restored["trainable"], restored["opt_state"], meta["step"]
        self.data.set_state(meta["data"])
        log.warning("resumed %s from step %d in %s", self.config.stage, step, self.workdir)

    def step_once(self) -> dict:
        batch = next(self.data)
        out = self.learner.step(batch)
        message = self.guard.check(bool(out.get("finite", True)), self.learner.state.step,
                                   batch.get("record", []))
        if message:
            log.warning("%s", message)
        return out

    def run(self) -> dict:
        self.resume()
        self.writer = metrics_lib.MetricsWriter(self.workdir, self.config.stage,
                                                self.learner.state.step)
        train = self.config.train
        if self.validation and self.learner.state.step == 0:  # where the curve starts
            self.writer.write(0, self.validation(self.learner.state.model()))
        bar = tqdm(total=train.num_steps, initial=self.learner.state.step, desc=self.config.stage)
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
            self.writer.write(step, last)
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
        self.writer.close()
        metrics_lib.plot_curves(self.writer.path, CURVES[self.config.stage],
                                os.path.join(self.workdir, f"{self.config.stage}_curves.png"),
                                f"{self.config.stage} ({self.workdir})")
        if self.config.train.export:
            save_pretrained(self.learner.state.model(), os.path.join(self.workdir, "model"),
                            tokenizer=self.tokenizer)


class Validation:
    """Greedy accuracy on a fixed slice of validation questions, every `eval.every` steps:
    the first `eval.val_size` records of `eval.val_records` (else of `eval.records`), graded
    by `eval.scorer`."""

    def __init__(self, config, model: LongVILA, tokenizer):
        e = config.eval
        self.records = load_eval_records(e.val_records or e.records)[:e.val_size or None]
        self.data = dataclasses.replace(data_config(config, model), batch_size=e.batch_size)
        self.tokenizer, self.max_new_tokens = tokenizer, e.max_new_tokens
        self.scorer = get_scorer(e.scorer).name  # an unknown name stops the run before step 0
        self.cache = EmbeddingCache(config.cache.budget_mb << 20)

    def __call__(self, model: LongVILA) -> dict:
        result = evaluate(model, self.tokenizer, self.data, self.max_new_tokens, cache=self.cache,
                          progress=False, records=self.records, scorer=self.scorer)
        return {"val_accuracy": result.accuracy, "val_unparseable": result.unparseable}


def drilled_init(config, workdir: str) -> str:
    """The preset model after `drills.steps` option drills, exported once to
    `workdir/drills/model` (an SFT stage from scratch starts there)."""
    out = os.path.join(workdir, "drills", "model")
    if not os.path.exists(os.path.join(out, "config.json")):
        tokenizer, model = build_model(config)
        trained = option_drills.train_drills(config, model, tokenizer)
        save_pretrained(trained, out, tokenizer=tokenizer)
    return out


def run(config, workdir: str) -> dict:
    """Trains one stage in `workdir`; returns the last step's metrics."""
    check_model_init(config)
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
    """What one device needs for one step of the recipe, without loading weights."""
    mesh = mesh_lib.make_mesh(config.mesh)
    memory = compile_step(config, mesh).memory_analysis()
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(f"{config.stage} step on {dict(mesh.shape)}: arguments {gib(memory.argument_size_in_bytes)}, "
          f"temporaries {gib(memory.temp_size_in_bytes)}, outputs {gib(memory.output_size_in_bytes)} "
          "per device")


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

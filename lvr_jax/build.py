"""What a run is made of, built from a recipe: the mesh, the model (from a checkpoint or a
preset, on a mesh or not), the data settings and iterator, the learner of the recipe's stage
(`stages.stage_of`).

The training loop (`lvr_jax.trainer`), evaluation and the benchmarks build from here; none of
them imports an entrypoint.
"""

from __future__ import annotations

import math
import os

import jax
from flax import nnx

from lvr_jax.cli import CommandLineError
from lvr_jax.config import ConfigError, preset_config, recipe_video_encoder
from lvr_jax.data.pipeline import DataConfig
from lvr_jax.model import LongVILA, load_pretrained
from lvr_jax.model.video_encoders import VideoEncoderError
from lvr_jax.sharding import hosts
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding.param_placement import load_sharded, shard_model
from lvr_jax.stages import stage_of
from lvr_jax.tokenizer import build_tiny_tokenizer, load_tokenizer


def make_run_mesh(config):
    """The recipe's mesh, or None when it asks for a single device (every axis 1); a shape
    the machine's devices cannot fill is refused (`ConfigError`)."""
    shape = dict(config.mesh.shape)
    if all(int(v) == 1 for v in shape.values()):
        return None
    try:
        sizes = mesh_lib.axis_sizes(shape, jax.device_count())
    except ValueError as error:
        raise ConfigError(f"config.mesh.shape: {error} (of this machine; a recipe for one "
                          "device sets every axis to 1)") from None
    return None if math.prod(sizes) == 1 else mesh_lib.make_mesh(config.mesh)


def build_model(config, mesh=None):
    """(tokenizer, model): from a VILA directory when `model.init` is set, else the preset.

    On a mesh every parameter is placed in its FSDP/TP sharding as it is loaded.
    """
    m = config.model
    rules = mesh_lib.rules_of(config.mesh)
    if m.init:
        check_init_dir(m.init)
        tokenizer = load_tokenizer(m.init)
        kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                  remat_group=m.remat_group, video_encoder=recipe_video_encoder(config, tokenizer))
        model = (load_sharded(m.init, mesh, rules, **kw) if mesh
                 else load_pretrained(m.init, **kw))
        return tokenizer, check_video_frames(config, model)
    tokenizer = build_tiny_tokenizer()
    model = LongVILA(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed))
    model = shard_model(model, mesh, rules) if mesh else model
    return tokenizer, check_video_frames(config, model)


def check_init_dir(path: str) -> None:
    """A usage error unless `model.init` is a folder (what is in it, the loaders check)."""
    problem = ("does not exist" if not os.path.exists(path)
               else None if os.path.isdir(path) else "is a file, not a folder")
    if problem:
        raise CommandLineError(
            f"model.init {path!r} {problem}; pass --config.model.init=<VILA directory> (a "
            "folder holding config.json and llm/, e.g. a training run's model/ export)")


def check_video_frames(config, model: LongVILA) -> LongVILA:
    """The model, if its video encoder can pool `data.num_frames` frames; else a usage error."""
    try:
        model.config.num_video_tokens(config.data.num_frames)
    except VideoEncoderError as error:
        raise CommandLineError(f"config.data.num_frames: {error}") from None
    return model


def data_config(config, model: LongVILA, share: hosts.RowShare = hosts.RowShare()) -> DataConfig:
    """The pipeline's settings; the frame size is the vision tower's, decided by the model;
    `share`: this process's rows of each batch (`Stage.row_share`; default: all of them)."""
    d = config.data
    return DataConfig(records=d.records, video_root=d.video_root, num_frames=d.num_frames,
                      frame_size=model.config.vision.image_size, video_backend=d.video_backend,
                      on_bad_video=d.on_bad_video, cache_dir=d.cache_dir or None,
                      batch_size=share.local_rows(d.batch_size), max_length=d.max_length,
                      seed=config.seed,
                      num_epochs=None if d.num_epochs < 0 else d.num_epochs,
                      num_workers=d.num_workers, shard_index=share.index,
                      shard_count=share.count, read_threads=d.read_threads,
                      read_buffer=d.read_buffer, worker_buffer_size=d.worker_buffer_size,
                      max_video_pixels=d.max_video_pixels, categories=tuple(d.categories))


def make_data(config, model, tokenizer, share=hosts.RowShare()):
    """The recipe's stage's batches; the pipeline's skip stage logs the skipped records once
    per epoch (no callback here: a second log line would repeat the report)."""
    return iter(stage_of(config).dataset(data_config(config, model, share), tokenizer, None))


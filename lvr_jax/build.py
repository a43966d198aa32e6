"""What a run is made of, built from a recipe: the model (from a checkpoint or a preset, on a
mesh or not), the mesh, the data settings and iterator, the learner and its rollout engine,
and one compiled step from shapes alone.

The training entrypoint (`lvr_jax.train`), evaluation and the benchmarks build from here;
none of them imports another's entrypoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvr_jax import training
from lvr_jax.cli import CommandLineError
from lvr_jax.data.pipeline import DataConfig, rl_dataset, sft_dataset
from lvr_jax.model import PRESETS, LongVILA, load_pretrained
from lvr_jax.model.video_encoders import (VideoEncoderConfig, VideoEncoderError,
                                          parse_video_encoder)
from lvr_jax.sharding import hosts
from lvr_jax.sharding import mesh as mesh_lib
from lvr_jax.sharding import video_embeddings
from lvr_jax.sharding.param_placement import load_sharded, param_sharding, shard_model
from lvr_jax.tokenizer import build_tiny_tokenizer, load_tokenizer

log = logging.getLogger("lvr_jax.build")


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
        remat_group=m.get("remat_group", 1),
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
                  remat_group=m.get("remat_group", 1),
                  video_encoder=recipe_video_encoder(config, tokenizer))
        model = (load_sharded(m.init, mesh, rules, **kw) if mesh
                 else load_pretrained(m.init, **kw))
        return tokenizer, check_video_frames(config, model)
    tokenizer = build_tiny_tokenizer()
    model = LongVILA(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed))
    model = shard_model(model, mesh, rules) if mesh else model
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


def abstract_model(config, mesh) -> LongVILA:
    """The recipe's model with shape structs placed on `mesh` for weights (nothing loaded)."""
    rules = mesh_lib.rules_of(config.mesh)
    model = nnx.eval_shape(lambda: LongVILA(preset_config(config), rngs=nnx.Rngs(0)))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            sharding = param_sharding(var, mesh, rules)
            var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))
    return model


def abstract_batch(config, mesh, **sizes) -> dict:
    """Shape structs of the learner's batch (`sizes`: its `abstract_batch` keywords), placed
    as a run places them: rows over the batch axes, or the learner's `BATCH_LAYOUT`."""
    module, rules = learner_module(config.stage), mesh_lib.rules_of(config.mesh)

    def placed(key, a):
        axes = module.BATCH_LAYOUT.get(key, ("activation_batch",))
        sharding = mesh_lib.logical_to_sharding(axes + (None,) * (len(a.shape) - len(axes)),
                                                mesh, rules, a.shape)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    shapes = module.abstract_batch(config, preset_config(config), mesh, **sizes)
    return {k: placed(k, a) for k, a in shapes.items()}


def abstract_opt_state(tx, trainable):
    """Shape structs of the optimizer state of `trainable`, placed as a run places it."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(tx.init, trainable),
                        training.opt_state_shardings(tx, trainable))


def compile_update(config, mesh) -> dict:
    """The update of a recipe compiled on `mesh` from shapes alone (no weights): phase ->
    compiled; `.memory_analysis()` says what one device needs (`peak_bytes`). One optimizer
    step ("update"), or where the learner streams its micro-batches
    (`rl.learner.streams_update`) one micro-batch's pass ("update micro-batch", adding its
    gradients to the sum) and the optimizer applying the sum ("optimizer step"). Parameters,
    optimizer state and the sum are donated, as in a run."""
    module = learner_module(config.stage)
    model = abstract_model(config, mesh)
    graphdef, trainable, frozen = nnx.split(model, module.trainable_filter(config), ...)
    tx = training.make_optimizer(config.optim)
    opt_state = abstract_opt_state(tx, trainable)
    loss_fn = module.make_loss_fn(config, mesh)
    if not (config.stage == "grpo" and module.streams_update(config)):
        step = training.jit_update(tx, loss_fn, micro=module.micro_batches(config))
        batch = abstract_batch(config, mesh)
        return {"update": step.lower(trainable, frozen, opt_state, graphdef=graphdef,
                                     batch=batch).compile()}
    streamed = training.StreamedUpdate(tx, loss_fn)
    size = config.optim.micro_batch_size
    batch = abstract_batch(config, mesh, prompts=size, samples=1)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    batch["totals"] = (scalar, scalar)
    summed = jax.eval_shape(functools.partial(streamed.first, graphdef=graphdef, batch=batch),
                            trainable, frozen)
    (_, aux), _ = summed
    summed = ((scalar, {k: scalar for k in aux}), trainable)  # gradients lie as the weights
    return {"update micro-batch": streamed.add.lower(trainable, frozen, summed,
                                                     graphdef=graphdef, batch=batch).compile(),
            "optimizer step": streamed.apply.lower(trainable, opt_state, summed).compile()}


def compile_frame_encoding(config, mesh):
    """One video of `data.num_frames` frames encoded over the mesh as a cache miss encodes
    it (MR-SP stage 1, `video_embeddings.encoder_fn`), compiled from shapes: GRPO the
    video's embeddings, SFT the tower's features (the projector trains on top)."""
    graphdef, state = nnx.split(abstract_model(config, mesh))
    output = "features" if config.stage == "sft" else "embeddings"
    rules, size = mesh_lib.rules_of(config.mesh), preset_config(config).vision.image_size
    frames = jax.ShapeDtypeStruct((config.data.num_frames, size, size, 3), jnp.float32)

    def encode(state, frames):  # unused weights (the LLM's layers) are not arguments
        model = nnx.merge(graphdef, state)
        return video_embeddings.encoder_fn(model, output, mesh, rules)(frames)
    return jax.jit(encode).lower(state, frames).compile()


def compile_phases(config, mesh) -> dict:
    """Each phase of a step of the recipe compiled from shapes: phase -> compiled. Both: the
    encoding of one video's frames (on a cache miss) and the update. GRPO also: the rollout
    of one chunk of prompts (`rl.rollout.prompts_per_chunk`, else the whole rollout batch:
    prefill, KV cache and decoding of the G samples) and one old / reference log-prob pass
    (`rl.logprob_prompts` prompts, or one streamed micro-batch of sequences)."""
    phases = {"frame encoding": compile_frame_encoding(config, mesh),
              **compile_update(config, mesh)}
    if config.stage != "grpo":
        return phases
    from lvr_jax.model.sampler import SamplingParams, lower_generate
    from lvr_jax.rl import learner as rl_learner
    from lvr_jax.sharding import forwards
    rl = config.rl
    llm_graphdef, llm_state = nnx.split(abstract_model(config, mesh).llm)
    chunk = rl.rollout.get("prompts_per_chunk", 0) or config.data.batch_size
    prompts = abstract_batch(config, mesh, prompts=chunk)
    params = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                            top_p=rl.top_p, top_k=rl.top_k, stop_token_ids=(0,),
                            num_samples=rl.num_generations)
    phases["rollout"] = lower_generate(
        llm_graphdef, llm_state, prompts["prompt_embeds"], prompts["prompt_valid"], params,
        prefill=forwards.prefill_fn(mesh, config.mesh)).compile()
    logprobs = rl_learner.make_response_logprobs(mesh, config.mesh)

    def logprob_pass(state, batch):
        return rl_learner.batch_logprobs(logprobs, nnx.merge(llm_graphdef, state), batch,
                                         rl.temperature)[0]
    if rl_learner.streams_update(config):  # a micro-batch of sequences, each its own prompt
        batch = abstract_batch(config, mesh, prompts=config.optim.micro_batch_size, samples=1)
    else:
        batch = abstract_batch(config, mesh, prompts=rl.get("logprob_prompts", 0) or
                               rl.update_batch_size)
    phases["log-probs"] = jax.jit(logprob_pass).lower(llm_state, batch).compile()
    return phases


def held_beside(config, mesh) -> dict:
    """What a step keeps on each device while each phase runs, besides that phase's own
    arguments: phase -> {what: bytes}. The trainable weights and the optimizer state stay
    resident through a step (the update takes them as arguments); GRPO also holds the
    reference policy, and the rollout batch's prompt embeddings unless `rl.offload_prompts`
    keeps them in host memory between the passes."""
    module = learner_module(config.stage)
    _, trainable, _ = nnx.split(abstract_model(config, mesh), module.trainable_filter(config), ...)
    opt_state = abstract_opt_state(training.make_optimizer(config.optim), trainable)
    weights = {"trainable weights": per_device_bytes(trainable)}
    adam = {"optimizer state": per_device_bytes(opt_state)}
    step = {}
    if config.stage == "grpo":
        step["reference policy"] = per_device_bytes(trainable)
        if not config.rl.get("offload_prompts", False):
            embeds = abstract_batch(config, mesh, prompts=config.data.batch_size)["prompt_embeds"]
            step["rollout batch's prompt embeddings"] = per_device_bytes(embeds)
    return {"frame encoding": weights | adam | step, "rollout": adam | step,
            "log-probs": adam | step, "update": step, "update micro-batch": adam | step,
            "optimizer step": step}


def per_device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of placed shape structs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def phase_memory(config, mesh) -> dict:
    """Each phase of a step (`compile_phases`) -> (XLA's memory analysis of its compile on
    `mesh`, {what the step holds beside it: bytes}, the total one device needs meanwhile)."""
    held = held_beside(config, mesh)
    report = {}
    for phase, compiled in compile_phases(config, mesh).items():
        memory = compiled.memory_analysis()
        report[phase] = (memory, held[phase], peak_bytes(memory) + sum(held[phase].values()))
    return report


def peak_bytes(memory) -> int:
    """What one device holds at the step's peak by XLA's memory analysis: arguments,
    temporaries and outputs, the outputs that reuse donated arguments counted once."""
    return (memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def row_share(config, mesh=None) -> hosts.RowShare:
    """Which rows of each training batch this process reads. SFT: its row block's share
    (`hosts.row_share`). GRPO: every prompt, on every process: the group advantages, dynamic
    sampling and update chunks are decisions over the whole rollout batch that every process
    takes alike, and a rollout batch has few prompts."""
    if config.stage != "sft":
        return hosts.RowShare()
    return hosts.row_share(mesh, mesh_lib.rules_of(config.mesh), config.data.batch_size)


def data_config(config, model: LongVILA, share: hosts.RowShare = hosts.RowShare()) -> DataConfig:
    """The pipeline's settings; the frame size is the vision tower's, decided by the model;
    `share`: this process's rows of each batch (`row_share`; default: all of them)."""
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


def make_learner(config, model, tokenizer, cache, mesh=None, share=hosts.RowShare()):
    module = learner_module(config.stage)
    if config.stage == "sft":
        return module.SFTLearner(model, config, cache, mesh, share)
    return module.GRPOLearner(model, config, tokenizer, cache, mesh,
                              engine=make_rollout_engine(config, tokenizer, mesh))


def make_rollout_engine(config, tokenizer, mesh=None):
    """What samples the policy (`config.rl.rollout.backend`): the embedded JAX sampler
    (its prefill sequence-parallel on a mesh) or a client of the rollout servers."""
    from lvr_jax.rl import rollout
    from lvr_jax.sharding import forwards
    return rollout.make_engine(config.rl.rollout, tokenizer.pad_id,
                               forwards.prefill_fn(mesh, config.mesh),
                               keep_pushed=bool(config.rl.off_policy_steps))


def make_data(config, model, tokenizer, share=hosts.RowShare()):
    build = sft_dataset if config.stage == "sft" else rl_dataset
    report = lambda r: log.warning("%s", r)  # noqa: E731  skipped records, once per epoch
    return iter(build(data_config(config, model, share), tokenizer, on_epoch_end=report))

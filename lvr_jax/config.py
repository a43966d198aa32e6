"""Defaults every recipe starts from; recipes in configs/ override what they change.

    config = base_config(); config.rl.num_generations = 8

Fields are grouped the way the code is: model, data, mesh, optim, train, sft, rl, cache, eval.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import ml_collections

from lvr_jax.cli import CommandLineError
from lvr_jax.model import PRESETS
from lvr_jax.model.video_encoders import (VideoEncoderConfig, VideoEncoderError,
                                          parse_video_encoder)
from lvr_jax.sharding.mesh import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "sft"  # "sft" | "grpo"
    c.seed = 0

    c.model = dict(
        preset="tiny",  # a name in lvr_jax.model.PRESETS, used when `init` is empty
        init="",  # a VILA directory (e.g. the SFT stage's export) to start from
        allow_random_init=False,  # GRPO without `init` starts from random weights: say so here
        vision={}, llm={},  # overrides of the preset's SiglipConfig / Qwen2Config fields
        projector_type="mlp_downsample_2x2_fix",
        # VILA's `video_encoder` value as its JSON string, e.g. '{"_target_":
        # "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}'; "": the
        # checkpoint's own (model.init), else the basic encoder (the paper's RL recipe)
        video_encoder="",
        # remat: recompute each layer's activations in the backward; remat_group: keep the
        # input of one LLM layer in that many (1: of each), recomputing the rest from it
        dtype="float32", param_dtype="float32", remat=False, remat_group=1)

    c.data = dict(
        records="", video_root="", num_frames=64, batch_size=8, max_length=4096,
        num_workers=2, cache_dir="", on_bad_video="skip", video_backend="auto",
        num_epochs=-1,  # -1: repeat forever
        # host memory: decoded examples in flight (DataConfig.examples_in_flight); 0: sized
        # from the batch. Videos above max_video_pixels per frame are skipped (0: any size).
        read_threads=0, read_buffer=0, worker_buffer_size=2, max_video_pixels=4096 * 2160,
        categories=(),  # train on these question categories only (): all
    )

    # Axis sizes (-1: the remaining devices), MR-SP attention strategy, the per-device
    # attention kernel ("blockwise" anywhere, "cudnn" on NVIDIA GPUs with sp = 1 or ulysses)
    # and the logical-axis rules (lvr_jax.sharding.mesh.DEFAULT_RULES). Multi-host reads
    # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    c.mesh = dict(shape=dict(data=1, fsdp=-1, sp=1, tp=1), attention="ring", block_size=512,
                  kernel="blockwise", rules=DEFAULT_RULES)

    c.optim = dict(lr=1e-5, schedule="cosine", warmup_steps=10, decay_steps=1000,
                   end_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                   grad_clip=1.0, grad_accum_steps=1,
                   # sequences of one update's batch run at a time, their gradients summed
                   # inside the jitted step (0: the whole batch at once)
                   micro_batch_size=0)

    c.train = dict(num_steps=100, checkpoint_every=50, keep_checkpoints=3,
                   async_checkpoints=True, max_nonfinite_steps=5, export=True)

    c.sft = dict(train_vision_tower=False)
    # Text-only multiple-choice drills before an SFT from scratch (lvr_jax.sft.option_drills):
    # what a pretrained LLM already knows. 0 steps: none (a VILA/Qwen2 init needs none).
    # kind: "options" (which letter says X?) or "story" (a synthetic question and its chain
    # of thought, without the video).
    c.drills = dict(steps=0, batch_size=64, lr=1e-3, kind="options")

    c.rl = dict(
        num_generations=5, temperature=1.0, top_p=0.99, top_k=0, max_new_tokens=2048,
        update_batch_size=128, ppo_epochs=1,  # prompts per optimizer step; passes per batch
        # prompts per old/reference log-prob pass (0: update_batch_size); where the update
        # streams its micro-batches (offload_prompts), the passes go micro-batch by micro-batch
        logprob_prompts=0,
        # the rollout batch's prompt embeddings in host memory between the step's passes,
        # each pass copying its prompts to the devices (one process)
        offload_prompts=False,
        clip_low=0.2, clip_high=0.3, dual_clip=3.0, loss_agg="token-mean",
        kl_coef=1e-2, kl_kind="k3", format_weight=0.1, scale_by_std=True,
        dynamic_sampling=False, overlong_buffer=0,  # 0: no overlong shaping
        # Rollout/trainer mismatch correction (lvr_jax.rl.grpo.rollout_correction): "none",
        # "token-tis", "seq-tis" (weights min(r, C)), "token-mis", "seq-mis" (r, rejected
        # above C), r = the trainer's over the engine's probability, C = correction_threshold.
        rollout_correction="none", correction_threshold=2.0,
        # 1: one-step off-policy on rollout servers: while the trainer updates on batch k the
        # servers generate batch k+1 with the weights before that update (0: strictly in turn).
        off_policy_steps=0,
        freeze_embeddings=True,
        # One more forward per step to log how the update moved the sampled responses
        # (logp_shift_pos / logp_shift_neg / update_alignment); its cost is one log-prob pass.
        measure_update=True,
        # backend "jax": the embedded sampler; "server": rollout_bridge servers at `urls`
        # (token or $ROLLOUT_TOKEN; a server silent for wait_s stops the run with a checkpoint).
        # transport "auto": weight chunks through shared memory to servers on this host,
        # HTTP to the others; "http": HTTP to all.
        rollout=dict(backend="jax", urls=(), token="", timeout_s=120.0, retries=3,
                     backoff_s=0.5, wait_s=300.0, chunk_mb=64, dtype="float32", transport="auto",
                     # prompts embedded and sampled at a time (0: the whole rollout batch)
                     prompts_per_chunk=0))

    # disk_dir: persist embeddings across runs; on_host: keep the in-memory entries in host
    # memory rather than on the accelerators (copied back on a hit)
    c.cache = dict(budget_mb=4096, disk_dir="", on_host=False)

    # records: the test questions of `python -m lvr_jax.eval`. Every `every` training steps
    # (0: never) the run also logs val_accuracy on the first `val_size` of `val_records`.
    # scorer: "math" (the accuracy reward: mathruler on the <answer> span) or "official" (the
    # LongVideo-Reason-eval script's plain string equality, as the paper's 72.0); eval.scoring.
    c.eval = dict(records="", every=0, val_records="", val_size=200, max_new_tokens=256,
                  batch_size=8, scorer="math")
    return ml_collections.ConfigDict(c)


def paper_grpo(c) -> None:
    """The paper's GRPO settings (REFERENCE.md §6) on recipe `c`, in place: optimizer, 128
    prompts x 5 samples per update, sampling, clipping, k3 KL, format reward, steps."""
    c.optim.update(lr=1e-6, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999,
                   weight_decay=1e-2, grad_clip=1.0)
    c.rl.update(num_generations=5, temperature=1.0, top_p=0.99, max_new_tokens=2048,
                update_batch_size=128, ppo_epochs=1, clip_low=0.2, clip_high=0.3,
                dual_clip=3.0, kl_coef=1e-2, kl_kind="k3", format_weight=0.1)
    c.eval.update(max_new_tokens=2048)
    c.train.update(num_steps=1000, checkpoint_every=20)


# Meshes of the paper-scale recipes: one 8-GPU node (FSDP x 2, Ulysses x 4 as the paper)
# and a TPU slice (FSDP over the rest, ring attention over 8 chips of sequence).
RECIPE_MESHES = {
    "gpu8": dict(shape=dict(data=1, fsdp=-1, sp=4, tp=1), attention="ulysses"),
    "tpu": dict(shape=dict(data=1, fsdp=-1, sp=8, tp=1), attention="ring"),
}
# Sequences per micro-batch of the 7B recipes' updates (`optim.micro_batch_size`): one per
# group of devices that splits the batch (data x fsdp: 2 on gpu8's 8 devices, 1 on tpu).
RECIPE_MICRO_BATCH = {"gpu8": 2, "tpu": 1}


class ConfigError(CommandLineError):
    """A recipe whose settings cannot run; the message names the config keys and the fix.

    Raised from an entrypoint's main, `lvr_jax.cli.run_app` prints it in one line, exit 2."""


# (key, the smallest value a run can use): refused below it, before any work.
LOWER_BOUNDS = (("train.num_steps", 1), ("train.checkpoint_every", 1), ("data.num_frames", 1),
                ("data.batch_size", 1), ("train.keep_checkpoints", 1))


def check_values(config: ml_collections.ConfigDict) -> None:
    """Refuses values no run can use (`ConfigError`, one line): a learning rate that is not
    positive, or a count below its smallest useful value (`LOWER_BOUNDS`)."""
    if not config.optim.lr > 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    for key, least in LOWER_BOUNDS:
        section, name = key.split(".")
        value = config[section][name]
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")


def preset_config(config, tokenizer=None):
    """The LongVILAConfig of `model.preset` with the recipe's overrides (no weights)."""
    m = config.model
    base = PRESETS[m.preset](**({"vocab_size": tokenizer.vocab_size} if tokenizer else {}))
    ids = (dict(video_token_id=tokenizer.video_id, newline_token_id=tokenizer.newline_id)
           if tokenizer else {})
    return base.replace(
        vision=dataclasses.replace(base.vision, **m.vision),
        llm=dataclasses.replace(base.llm, **m.llm), projector_type=m.projector_type,
        dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, remat_group=m.remat_group,
        video_encoder=recipe_video_encoder(config, tokenizer) or VideoEncoderConfig(), **ids)


def recipe_video_encoder(config, tokenizer=None):
    """`model.video_encoder` of the recipe as a VideoEncoderConfig; None when unset."""
    if not config.model.video_encoder:
        return None
    try:
        return parse_video_encoder(config.model.video_encoder,
                                   tokenize=tokenizer.encode if tokenizer else None,
                                   source="config.model.video_encoder")
    except VideoEncoderError as error:
        raise ConfigError(str(error)) from None


DEMO_RECIPE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def demo_config(stage: str, data: str, steps: int | None = None, seed: int = 0):
    """configs/demo.py for `stage`, reading the synthetic set in the folder `data`."""
    spec = importlib.util.spec_from_file_location("demo_config", DEMO_RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(stage)

    def moved(path: str) -> str:  # the recipe's record file, in `data`
        return os.path.join(data, os.path.basename(path))

    config.data.update(records=moved(config.data.records), video_root=data)
    config.eval.update(records=moved(config.eval.records),
                       val_records=moved(config.eval.val_records))
    config.seed = seed
    if steps is not None:
        config.train.num_steps = steps
    return config

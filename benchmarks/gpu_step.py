"""One SFT step and one GRPO step of a 1.5B-class LongVILA at 32K tokens on one GPU (#8).

    python -m benchmarks.gpu_step                       # cudnn and blockwise kernels
    python -m benchmarks.gpu_step --kernels cudnn --tokens 32768 --generations 8

The LLM has Qwen2-1.5B's shapes (28 layers, 1536 wide, 12 heads / 2 KV heads, vocabulary
151,936), the vision side LongVILA-R1-7B's (SigLIP so400m, 2x2 projector, 257 tokens per
frame); bf16 compute, f32 parameters and AdamW state, per-layer remat, one device (mesh
1x1x1x1). The steps are the trainer's own jitted functions on random weights and inputs:

  SFT    `training.guarded_update` with the SFT stage's loss: one sequence of `--tokens`
         merged tokens (cached vision features -> trainable projector -> LLM), the loss
         on the text tokens.
  GRPO   rollout (`sampler.generate`: one prefill of the prompt, G samples decoded
         together), old-policy and reference log-probs (`forwards.response_logprobs_fn`),
         one update (`guarded_update` with the GRPO stage's loss) on the G sequences.

MFU counts model FLOPs (6 x parameters x tokens for the matmuls, causal attention
6 x T^2 x heads x head_dim per layer, forward + backward; remat recomputation not
counted) over the step time and the bf16 matmul peak measured first on the same device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  rope_theta=1e6, tie_word_embeddings=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="merged sequence length")
    p.add_argument("--text", type=int, default=1024, help="text tokens among them")
    p.add_argument("--response", type=int, default=512, help="GRPO response tokens")
    p.add_argument("--generations", type=int, default=8, help="GRPO G")
    p.add_argument("--kernels", default="cudnn,blockwise")
    p.add_argument("--model", default="1.5b", choices=("1.5b", "tiny"))
    p.add_argument("--stages", default="sft,grpo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    return p.parse_args(argv)


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s (random inputs, median of 10)."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / median_time(lambda: mm(a, b), 10)


def model_config(name: str):
    """'1.5b' (the benchmark) or 'tiny' (a CPU smoke run of this script)."""
    from lvr_jax.model import PRESETS
    base = PRESETS["longvila_r1_7b" if name == "1.5b" else "tiny"]()
    llm = dataclasses.replace(base.llm, **QWEN2_1_5B) if name == "1.5b" else base.llm
    return base.replace(llm=llm, dtype="bfloat16", param_dtype="float32", remat=True)


def train_config(stage: str, kernel: str, frames: int, text: int, args):
    from lvr_jax.config import base_config
    c = base_config()
    c.stage = stage
    c.mesh.update(shape=dict(data=1, fsdp=1, sp=1, tp=1), attention="all_gather",
                  kernel=kernel, block_size=512)
    c.data.update(num_frames=frames, max_length=text, batch_size=1)
    c.rl.update(num_generations=args.generations, max_new_tokens=args.response,
                update_batch_size=1)
    return c


def llm_flops_per_token(c) -> float:
    """Matmul FLOPs of one token's forward through the decoder (no attention scores)."""
    d, f, h, kvh, hd = (c.hidden_size, c.intermediate_size, c.num_attention_heads,
                        c.num_key_value_heads, c.head_dim)
    per_layer = d * h * hd + 2 * d * kvh * hd + h * hd * d + 3 * d * f
    return 2 * c.num_hidden_layers * per_layer


def attention_flops(c, t: int) -> float:
    """Forward FLOPs of causal attention over t tokens: t(t+1)/2 query-key pairs, two
    matmuls (scores, mixing) of 2 FLOPs per multiply-add each."""
    return 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * t * (t + 1)


def build(kernel: str, stage: str, args):
    from flax import nnx
    from lvr_jax import training
    from lvr_jax.model.vlm import LongVILA
    from lvr_jax.sharding import mesh as mesh_lib
    mc = model_config(args.model)
    frames = (args.tokens - args.text + 1) // mc.tokens_per_frame
    cfg = train_config(stage, kernel, frames, args.text, args)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    model = LongVILA(mc, rngs=nnx.Rngs(0))
    from lvr_jax.stages import stage_of
    stage = stage_of(cfg)
    tx = training.make_optimizer(cfg.optim)
    state = training.TrainState.create(model, stage.trainable_filter(cfg), tx)
    update = training.jit_update(tx, stage.loss_fn(cfg, mesh))
    return mc, cfg, mesh, model, state, update, stage


def random_ids(shape, vocab, video_id, seed):
    ids = jax.random.randint(jax.random.key(seed), shape, 0, vocab - 1)
    return jnp.where(ids == video_id, ids + 1, ids).astype(jnp.int32)


def sft_step(kernel: str, args, peak: float) -> dict:
    from flax import nnx
    mc, cfg, mesh, model, state, update, stage = build(kernel, "sft", args)
    shapes = stage.abstract_batch(cfg, mc)
    ids = random_ids(shapes["input_ids"].shape, mc.llm.vocab_size, mc.video_token_id, 1)
    ids = ids.at[:, 64].set(mc.video_token_id)
    batch = {"input_ids": ids, "token_mask": jnp.ones_like(ids),
             "loss_mask": jnp.ones_like(ids).at[:, :128].set(0),
             "video_features": jax.random.normal(jax.random.key(2), shapes["video_features"].shape,
                                                 jnp.bfloat16)}
    t = ids.shape[1] - 1 + mc.num_video_tokens(cfg.data.num_frames)

    def step():
        state.trainable, state.opt_state, metrics = update(
            state.trainable, state.frozen, state.opt_state, graphdef=state.graphdef, batch=batch)
        return metrics["loss"]
    seconds = median_time(step, args.repeats)
    c = mc.llm
    proj = sum(x.size for x in jax.tree.leaves(nnx.state(model.mm_projector, nnx.Param)))
    flops = 3 * (llm_flops_per_token(c) * t + attention_flops(c, t)
                 + 2 * c.hidden_size * c.vocab_size * ids.shape[1]
                 + 2 * proj * cfg.data.num_frames * (mc.tokens_per_frame - 1))
    return dict(stage="sft", kernel=kernel, tokens=t, frames=cfg.data.num_frames,
                seconds=seconds, tokens_per_s=t / seconds, mfu=flops / seconds / peak)


def grpo_step(kernel: str, args, peak: float) -> dict:
    from lvr_jax.model.sampler import SamplingParams, generate
    mc, cfg, mesh, model, state, update, _ = build(kernel, "grpo", args)
    g, m, d = args.generations, args.response, mc.llm.hidden_size
    t = args.tokens - m  # prompt (video + text) + response = --tokens
    prompt = 0.02 * jax.random.normal(jax.random.key(3), (1, t, d), jnp.bfloat16)
    valid = jnp.ones((1, t), bool)
    params = SamplingParams(max_new_tokens=m, temperature=1.0, num_samples=g)
    rollout = lambda: generate(model.llm, prompt, valid, params, jax.random.key(4)).tokens  # noqa: E731
    rollout_s = median_time(rollout, args.repeats)
    tokens = rollout()
    n = tokens.shape[0]
    from flax import nnx
    from lvr_jax.sharding.forwards import response_logprobs_fn
    logprobs_fn = nnx.jit(response_logprobs_fn(mesh, cfg.mesh))
    ones = jnp.ones((n, m), jnp.float32)
    index = jnp.zeros((n,), jnp.int32)
    score = lambda: logprobs_fn(model.llm, prompt, valid, index, tokens, ones, 1.0)[0]  # noqa: E731
    logprob_s = median_time(score, args.repeats)
    old = score()
    batch = {"prompt_embeds": prompt, "prompt_valid": valid,
             "prompt_index": jnp.zeros((n,), jnp.int32), "tokens": tokens,
             "advantages": jax.random.normal(jax.random.key(5), (n,)), "response_mask": ones,
             "loss_mask": ones, "old_logp": old, "ref_logp": old, "pg_weight": ones}

    def step():
        state.trainable, state.opt_state, metrics = update(
            state.trainable, state.frozen, state.opt_state, graphdef=state.graphdef, batch=batch)
        return metrics["loss"]
    update_s = median_time(step, args.repeats)
    c, total = mc.llm, t + m
    fwd = llm_flops_per_token(c) * total + attention_flops(c, total) + 2 * d * c.vocab_size * m
    update_flops, score_flops = 3 * n * fwd, n * fwd
    step_s = rollout_s + 2 * logprob_s + update_s
    return dict(stage="grpo", kernel=kernel, tokens=total, generations=n,
                rollout_s=rollout_s, rollout_tokens_per_s=n * m / rollout_s,
                logprob_s=logprob_s, update_s=update_s, seconds=step_s,
                tokens_per_s=n * total / step_s,
                update_mfu=update_flops / update_s / peak,
                mfu=(update_flops + 2 * score_flops) / step_s / peak)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    peak = matmul_peak(8192 if args.model == "1.5b" else 512)
    print(f"device {dev.device_kind}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    for kernel in args.kernels.split(","):
        for stage in args.stages.split(","):
            try:
                row = (sft_step if stage == "sft" else grpo_step)(kernel, args, peak)
            except Exception as e:  # an OOM or a kernel the device lacks: report, go on
                row = dict(stage=stage, kernel=kernel, error=f"{type(e).__name__}: {e}"[:400])
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(args.out, "gpu_step.json"), "w") as f:
                json.dump(dict(device=dev.device_kind, peak_flops=peak, rows=rows), f, indent=1)
    print("\n| stage | kernel | tokens | s/step | tokens/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['stage']} | {r['kernel']} | | | {r['error'][:60]} | |")
        else:
            print(f"| {r['stage']} | {r['kernel']} | {r['tokens']} | {r['seconds']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% |")


if __name__ == "__main__":
    main()

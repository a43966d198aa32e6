"""GRPO step time with the video embedding cache vs re-encoding for every forward (issue #8).

    python -m benchmarks.rl_cache_speedup                      # 16, 64, 256 frames, ~5 min
    python -m benchmarks.rl_cache_speedup --frames 256 --repeats 7 --generations 8

The baseline is `reencoding_learner`, the reference implementation's behaviour: the rollout
encodes each prompt's video once (its G samples share one prefill, as vLLM's `n` does), and
the old-policy, reference and update forwards encode it again for every sequence (each of
the G samples is its own row there). With the cache, a warm step encodes nothing.

The model is small enough for a CPU but keeps LongVILA-R1-7B's per-frame FLOP ratio of
vision (tower + projector) to LLM; both are printed. Steps are timed side by side after
compilation and cache warm-up (medians); the encodes are timed inside the uncached step,
giving the vision share and the ideal speed-up 1 / (1 - share).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

# Vision (width, MLP, layers run) and LLM (width, MLP, layers) of the benchmark model: with
# 16 patches per frame and 5 LLM tokens per frame (4 projector tokens + "\n") the per-frame
# vision:LLM matmul FLOP ratio is 0.285, the 7B's 0.284.
SMALL_VISION = dict(hidden_size=32, intermediate_size=112, num_hidden_layers=2,
                    num_attention_heads=2, image_size=56, patch_size=14)
SMALL_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def vision_flops_per_frame(config) -> float:
    """Matmul FLOPs (2 per multiply-add) of the tower's layers that run, plus the projector."""
    v, h = config.vision, config.llm.hidden_size
    n, d = v.num_patches, v.hidden_size
    patch_embed = n * 3 * v.patch_size**2 * d
    layer = n * (4 * d * d + 2 * d * v.intermediate_size) + 2 * n * n * d  # + QK^T and AV
    k = config.downsample
    tokens = config.tokens_per_frame - 1
    projector = (tokens * (4 * d * h + h * h) if k == 2
                 else tokens * (9 * d * 3 * d + 3 * d * h + h * h))
    return 2.0 * (patch_embed + v.num_feature_layers * layer + projector)


def llm_flops_per_token(llm, context: float = 0.0) -> float:
    """Matmul FLOPs of one token through the decoder; `context` keys add QK^T and AV."""
    d, hd = llm.hidden_size, llm.head_dim
    q_and_o = 2 * d * llm.num_attention_heads * hd
    k_and_v = 2 * d * llm.num_key_value_heads * hd
    mlp = 3 * d * llm.intermediate_size
    attention = 2 * context * llm.num_attention_heads * hd
    return 2.0 * llm.num_hidden_layers * (q_and_o + k_and_v + mlp + attention)


def flop_ratio(config, frames: int = 0) -> float:
    """Vision:LLM FLOPs per frame; with `frames`, the LLM's causal attention over the video too."""
    tpf = config.tokens_per_frame
    context = frames * tpf / 2  # the mean number of earlier keys of a video token
    return vision_flops_per_frame(config) / (tpf * llm_flops_per_token(config.llm, context))


def print_flop_table(small, big) -> None:
    print("Per-frame matmul FLOPs (2 per multiply-add; forward; vision = tower layers up to the "
          "feature layer + patch embedding + projector; LLM = q/k/v/o + SwiGLU MLP of every "
          "token of the frame, lm_head excluded since only response positions reach it)")
    print(f"{'model':>8} {'patches':>8} {'tokens':>7} {'vision GF':>10} {'LLM GF':>9} "
          f"{'ratio':>6} {'@16f':>6} {'@64f':>6} {'@256f':>6}")
    for name, c in (("7B", big), ("bench", small)):
        ratios = " ".join(f"{flop_ratio(c, f):6.3f}" for f in (16, 64, 256))
        print(f"{name:>8} {c.vision.num_patches:8d} {c.tokens_per_frame:7d} "
              f"{vision_flops_per_frame(c) / 1e9:10.4g} "
              f"{c.tokens_per_frame * llm_flops_per_token(c.llm) / 1e9:9.4g} "
              f"{flop_ratio(c):6.3f} {ratios}")
    print("ratio: dense layers only; @Nf: with causal attention over N frames of video\n")


def bench_config(args, data_dir: str):
    from configs.demo import get_config

    c = get_config("grpo")
    c.model.vision, c.model.llm = dict(SMALL_VISION), dict(SMALL_LLM)
    c.data.update(records=os.path.join(data_dir, "train.jsonl"), video_root=data_dir,
                  batch_size=args.prompts, num_workers=0)
    c.rl.update(num_generations=args.generations, max_new_tokens=args.max_new_tokens,
                update_batch_size=args.prompts)
    c.train.export = False
    return c


def reencoding_learner(model, config, tokenizer):
    """A GRPOLearner as the reference implementation computes a step: the rollout encodes each
    prompt's video once (its G samples share one prefill, as vLLM's `n` does), and every later
    forward (old-policy, reference, update, update-measuring) encodes the video again for each
    sequence, each of the G samples its own prompt; nothing is cached."""
    import jax.numpy as jnp
    import numpy as np

    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.rl.passes import Passes
    from lvr_jax.rl.rollout import Rollout
    from lvr_jax.sharding.embedding_cache import EmbeddingCache
    from lvr_jax.sharding.video_embeddings import VideoEmbedder

    class Reencoding(VideoEmbedder):
        def videos(self, batch):  # every video encoded now, the cache bypassed
            return jnp.stack([self.encode(f) for f in batch["frames"]])

    class ReencodingRollout(Rollout):
        def collect(self, model, batch, rng, prompts=None):
            """Also keeps what each later forward needs to encode its video again."""
            train, metrics = super().collect(model, batch, rng, prompts)
            order = train["prompt_order"]
            train.update(frames=batch["frames"][order],
                         prompt_ids=np.asarray(batch["prompt_ids"])[order],
                         prompt_mask=np.asarray(batch["prompt_mask"]).astype(bool)[order])
            return train, metrics

    class ReencodingPasses(Passes):
        def prompts(self, train, prompts):
            """Each sequence its own prompt, its video encoded again."""
            index = np.repeat(prompts, self.g)
            embeds, valid = videos.prompts(learner.state.model(), {
                k: train[k][index] for k in ("frames", "prompt_ids", "prompt_mask")})
            return {"prompt_embeds": embeds, "prompt_valid": valid,
                    "prompt_index": jnp.arange(len(index))}

    learner = GRPOLearner(model, config, tokenizer, EmbeddingCache())
    videos = learner.videos = Reencoding(model, EmbeddingCache())
    r, p = learner.rollout, learner.passes
    learner.rollout = ReencodingRollout(config, tokenizer, videos, r.engine, r.placement)
    learner.passes = ReencodingPasses(config.rl, p.placement, p.micro, p.streamed)
    return learner


def timed_encodes(learner, seconds: list):
    """Adds the wall time of each uncached encode (normalisation, transfer, tower, projector)
    to seconds[-1]; a warm cached step makes none."""
    import jax

    encode = learner.videos.encode_normalised

    def timed(frames_fhwc):
        start = time.perf_counter()
        out = jax.block_until_ready(encode(frames_fhwc))
        seconds[-1] += time.perf_counter() - start
        return out

    learner.videos.encode_normalised = timed


def make_learner(config, reencode: bool, seconds: list):
    import dataclasses

    from lvr_jax import build
    from lvr_jax.rl.learner import GRPOLearner
    from lvr_jax.sharding.embedding_cache import EmbeddingCache

    config = config.copy_and_resolve_references()
    tokenizer, model = build.build_model(config)
    learner = (reencoding_learner(model, config, tokenizer) if reencode
               else GRPOLearner(model, config, tokenizer, EmbeddingCache()))
    # every response runs to max_new_tokens: the same work per step
    r = learner.rollout
    r.params = dataclasses.replace(r.params, stop_token_ids=())
    timed_encodes(learner, seconds)
    return learner


def load_batches(config, frames: int, count: int, tokenizer, model) -> list[dict]:
    from lvr_jax import build
    from lvr_jax.data.pipeline import rl_dataset

    config.data.num_frames = frames
    data = build.data_config(config, model)
    data = dataclasses.replace(data, shuffle=False, num_epochs=None)
    it = iter(rl_dataset(data, tokenizer))
    return [next(it) for _ in range(count)]


def timed_step(learner, batch, seconds: list) -> tuple[float, float]:
    """(step seconds, of which encoding seconds)."""
    seconds.append(0.0)
    start = time.perf_counter()
    learner.step(batch)
    return time.perf_counter() - start, seconds[-1]


def measure(args, config) -> list[dict]:
    import numpy as np

    enc = {"cached": [], "reencode": []}
    learners = {mode: make_learner(config, mode == "reencode", enc[mode]) for mode in enc}
    model = learners["cached"].state.model()
    rows = []
    for frames in args.frames:
        batches = load_batches(config, frames, args.batches, learners["cached"].rollout.tokenizer, model)
        for batch in batches:  # compile, fill the cache
            for mode, learner in learners.items():
                timed_step(learner, batch, enc[mode])
        times = {mode: [] for mode in learners}
        for r in range(args.repeats):  # side by side, so load drifts hit both alike
            for mode, learner in learners.items():
                times[mode].append(timed_step(learner, batches[r % len(batches)], enc[mode]))
        step = {m: float(np.median([t for t, _ in ts])) for m, ts in times.items()}
        share = float(np.median([e / t for t, e in times["reencode"]]))
        tokens = int(batches[0]["prompt_ids"].shape[1]) - 1 + frames * \
            learners["cached"].state.model().config.tokens_per_frame
        rows.append(dict(frames=frames, tokens=tokens, cached=step["cached"],
                         reencode=step["reencode"], share=share))
        print_row(rows[-1])
    return rows


HEADER = (f"{'frames':>6} {'prompt len':>10} {'cached s':>9} {'re-encode s':>11} {'speedup':>8} "
          f"{'vision share':>12} {'ideal':>6} {'achieved/ideal':>14}")


def print_row(r: dict) -> None:
    speedup, ideal = r["reencode"] / r["cached"], 1.0 / (1.0 - r["share"])
    print(f"{r['frames']:6d} {r['tokens']:10d} {r['cached']:9.3f} {r['reencode']:11.3f} "
          f"{speedup:7.2f}x {r['share']:11.1%} {ideal:5.2f}x {speedup / ideal:13.0%}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per rollout batch")
    parser.add_argument("--generations", type=int, default=4, help="G samples per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--batches", type=int, default=1, help="distinct batches cycled")
    parser.add_argument("--data", default="", help="a synthetic set (default: a temporary one)")
    args = parser.parse_args(argv)

    from lvr_jax.data.synthetic import generate
    from lvr_jax.config import preset_config
    from lvr_jax.model import PRESETS

    data_dir = args.data or tempfile.mkdtemp(prefix="rl_cache_bench_")
    if not os.path.exists(os.path.join(data_dir, "train.jsonl")):
        generate(data_dir, num_videos=8, frames=max(args.frames), size=64, seed=0, progress=False)
    config = bench_config(args, data_dir)
    print_flop_table(preset_config(config), PRESETS["longvila_r1_7b"]())
    print(f"GRPO step: {args.prompts} prompts x G={args.generations}, {args.max_new_tokens} new "
          f"tokens, 1 update mini-batch, KL to the reference on; CPU, medians of "
          f"{args.repeats}")
    print("re-encode = reencoding_learner (per prompt in the rollout, per sequence in the "
          "log-prob and update forwards); cached = warm embedding cache, no encodes")
    print(HEADER, flush=True)
    measure(args, config)
    print("goal (issue #8): >= 2.1x at 256 frames and >= 90% of the ideal")


if __name__ == "__main__":
    main()

"""Embedded sampler throughput: shared prefill vs a prefill per sample vs transformers (issue #8).

    python -m benchmarks.sampler_throughput                     # 8 prompts x G=8, ~3 min
    python -m benchmarks.sampler_throughput --frames 256 --max_new_tokens 128

On the weights of `benchmarks.rl_cache_speedup` (the small model with the 7B's per-frame
vision:LLM FLOP ratio) and the same prompt embeddings (synthetic videos spliced into the
RL prompts), every engine samples G continuations of each prompt at temperature 1 for
exactly max_new_tokens (no stop token ends a sample early):

  shared prefill    `generate(num_samples=G)`: each prompt prefilled once, its KV cache
                    repeated for the G samples
  prefill per sample  `generate(num_samples=1)` on the prompts repeated G times
  transformers      `Qwen2ForCausalLM.generate(inputs_embeds=..., num_return_sequences=G)`
                    on the exported llm/ (torch, CPU, float32)

Tokens per second count generated tokens (prompts x G x max_new_tokens) over the median
wall time of --repeats calls after a warm-up call. Prints a ratio table and writes a bar
chart to --out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

ENGINES = ("shared prefill", "prefill per sample", "transformers")


def prompt_embeddings(args, data_dir: str):
    """(config, tokenizer, model, embeds [P, T, D], valid [P, T]) from synthetic videos."""
    import jax.numpy as jnp

    from benchmarks.rl_cache_speedup import SMALL_LLM, SMALL_VISION
    from configs.demo import get_config
    from lvr_jax import build
    from lvr_jax.data.pipeline import rl_dataset
    from lvr_jax.model.siglip import normalize_frames

    c = get_config("grpo")
    c.model.vision, c.model.llm = dict(SMALL_VISION), dict(SMALL_LLM)
    c.data.update(records=os.path.join(data_dir, "train.jsonl"), video_root=data_dir,
                  batch_size=args.prompts, num_workers=0, num_frames=args.frames)
    tokenizer, model = build.build_model(c)
    batch = next(iter(rl_dataset(build.data_config(c, model), tokenizer)))
    video = jnp.stack([model.encode_video(jnp.asarray(normalize_frames(f))) for f in batch["frames"]])
    embeds, valid = model.embed_inputs(jnp.asarray(batch["prompt_ids"]), video,
                                       jnp.asarray(batch["prompt_mask"]).astype(bool))
    return tokenizer, model, embeds, valid


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() after one warm-up call (compilation, allocation)."""
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_engines(llm, embeds, valid, args, pad_id: int) -> dict:
    """Callables running our sampler with a shared prefill and with a prefill per sample."""
    import jax
    import jax.numpy as jnp

    from lvr_jax.model.sampler import SamplingParams, generate

    g = args.generations
    params = lambda n: SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0,  # noqa: E731
                                      num_samples=n)
    repeated = (jnp.repeat(embeds, g, axis=0), jnp.repeat(valid, g, axis=0))
    rng = jax.random.key(0)

    def run(e, v, n):
        out = generate(llm, e, v, params(n), rng, pad_id=pad_id)
        assert out.tokens.shape == (args.prompts * g, args.max_new_tokens)
        return jax.block_until_ready(out.tokens)

    return {"shared prefill": lambda: run(embeds, valid, g),
            "prefill per sample": lambda: run(*repeated, 1)}


def transformers_engine(model, tokenizer, embeds, valid, args, workdir: str):
    """A callable running transformers' sampling on the exported LLM and the same embeddings."""
    import numpy as np
    import torch
    import transformers

    from lvr_jax.model import save_pretrained

    save_pretrained(model, workdir, tokenizer=tokenizer)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(os.path.join(workdir, "llm"),
                                                       dtype=torch.float32).eval()
    inputs = torch.from_numpy(np.array(embeds, np.float32))  # a writable copy
    mask = torch.from_numpy(np.asarray(valid).astype(np.int64))
    m = args.max_new_tokens

    def run():
        with torch.inference_mode():
            out = hf.generate(inputs_embeds=inputs, attention_mask=mask, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=m,
                              min_new_tokens=m, num_return_sequences=args.generations,
                              pad_token_id=tokenizer.pad_id)
        assert out.shape == (args.prompts * args.generations, m), out.shape
        return out

    return run


def plot(rates: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(list(rates), list(rates.values()), color=["tab:green", "tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--frames", type=int, default=64, help="video frames per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="", help="a synthetic set (default: a temporary one)")
    parser.add_argument("--out", default="runs/benchmarks/sampler_throughput.png",
                        help="where the bar chart goes")
    args = parser.parse_args(argv)

    import torch

    from lvr_jax.data.synthetic import generate as generate_videos

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = tempfile.mkdtemp(prefix="sampler_bench_")
    data_dir = args.data or os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data_dir, "train.jsonl")):
        generate_videos(data_dir, num_videos=12, frames=max(args.frames, 16), size=64, seed=0,
                        progress=False)
    tokenizer, model, embeds, valid = prompt_embeddings(args, data_dir)
    engines = jax_engines(model.llm, embeds, valid, args, tokenizer.pad_id)
    engines["transformers"] = transformers_engine(model, tokenizer, embeds, valid, args,
                                                  os.path.join(workdir, "export"))
    tokens = args.prompts * args.generations * args.max_new_tokens
    title = (f"{args.prompts} prompts x G={args.generations}, prompt {embeds.shape[1]} positions "
             f"({args.frames} frames), {args.max_new_tokens} new tokens, CPU")
    print(title)
    print(f"{'engine':>20} {'s/call':>8} {'tokens/s':>9} {'vs shared':>10}", flush=True)
    rates = {}
    for name in ENGINES:
        seconds = median_seconds(engines[name], args.repeats)
        rates[name] = tokens / seconds
        print(f"{name:>20} {seconds:8.3f} {rates[name]:9.0f} "
              f"{rates[name] / rates[ENGINES[0]]:9.2f}x", flush=True)
    print(f"shared prefill vs per sample: {rates[ENGINES[0]] / rates[ENGINES[1]]:.2f}x; "
          f"vs transformers: {rates[ENGINES[0]] / rates[ENGINES[2]]:.2f}x")
    plot(rates, title, args.out)
    print(f"bar chart: {args.out}")


if __name__ == "__main__":
    main()

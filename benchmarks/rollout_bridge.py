"""Rollout bridge benchmark: weight push MB/s and apply time, rollout tokens/s of a
server engine vs the embedded JAX sampler on the same tiny model (8 prompts x G = 8).

    python -m benchmarks.rollout_bridge --engine vllm --python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout_bridge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    p.add_argument("--python", default=None, help="interpreter of the server (vLLM's venv)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--video-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    return p.parse_args(argv)


def servable_tiny_model(tokenizer, layers: int):
    """The tiny preset with head_dim 32 (vLLM's minimum) and an untied head (vLLM's in-place
    reload does not refresh a tied one), random weights."""
    import dataclasses

    from flax import nnx

    from lvr_jax.model import PRESETS, LongVILA
    base = PRESETS["tiny"](vocab_size=tokenizer.vocab_size)
    llm = dataclasses.replace(base.llm, num_attention_heads=2, num_key_value_heads=1,
                              tie_word_embeddings=False, num_hidden_layers=layers)
    config = base.replace(llm=llm, video_token_id=tokenizer.video_id,
                          newline_token_id=tokenizer.newline_id)
    return LongVILA(config, rngs=nnx.Rngs(0))


def timed(fn, repeats=3):
    fn()  # warm-up (compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main(argv=None):
    import sys
    from lvr_jax.model.sampler import SamplingParams, generate
    from lvr_jax.tokenizer import build_tiny_tokenizer
    from rollout_bridge import export
    from lvr_jax.rl.engines import ServerEngine
    from rollout_bridge.client import RolloutClient
    from rollout_bridge.launch import running_server
    args = parse_args(argv)
    tok = build_tiny_tokenizer()
    model = servable_tiny_model(tok, args.layers)
    prompt_embeds = jax.random.normal(jax.random.key(0), (args.prompts, args.video_tokens, 64))
    valid = jnp.ones(prompt_embeds.shape[:2], bool)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0,
                            num_samples=args.group)  # no stop: every sample is max_tokens long
    tokens = args.prompts * args.group * args.max_tokens
    jax_s, _ = timed(lambda: jax.block_until_ready(
        generate(model.llm, prompt_embeds, valid, params, jax.random.key(1)).tokens))
    rows = [("embedded JAX sampler", tokens / jax_s)]
    with tempfile.TemporaryDirectory() as tmp:
        export.export_dir(model, tmp, tok)
        with running_server(tmp, args.engine, python=args.python or sys.executable) as server:
            client = RolloutClient([server.url], chunk_bytes=1 << 20)
            mb = sum(len(c) for c in export.iter_chunks(model)) / 1e6
            push_s, _ = timed(lambda: client.push_weights(model, int(time.time() * 1e3)))
            engine = ServerEngine(client, pad_id=tok.pad_id)
            engine.version = client.health()["version"]
            server_s, _ = timed(lambda: engine.generate(model, prompt_embeds, valid, params,
                                                        jax.random.key(2)))
    rows.append((f"{args.engine} server (loopback)", tokens / server_s))
    print(f"weight push: {mb:.2f} MB in {push_s * 1e3:.0f} ms = {mb / push_s:.1f} MB/s "
          "(export + HTTP + validate + apply)")
    print(f"\n| rollout engine ({args.prompts} prompts x G={args.group}, {args.max_tokens} "
          "tokens) | tokens/s | ratio to JAX |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()

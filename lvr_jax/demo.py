"""The embedded default: a tiny LongVILA watches a generated long video and answers.

    python -m lvr_jax.demo --workdir runs/demo

Generates a few synthetic event videos, decodes uniformly sampled frames, encodes them
with the vision tower + projector, samples G answers per question with the KV-cache
sampler, then saves the model as a VILA directory and checks that it reloads to the same
greedy answer. The model is untrained here, so its answers are noise; training (SFT then
GRPO) is what makes them right.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lvr_jax.data import synthetic, templates
from lvr_jax.data.schema import load_eval_records
from lvr_jax.data.video import normalize_frames, read_frames
from lvr_jax.model import PRESETS, LongVILA, load_pretrained, save_pretrained
from lvr_jax.model.sampler import SamplingParams, generate
from lvr_jax.tokenizer import build_tiny_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where videos and the model go")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled per video")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per question (G)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def answer(model, tokenizer, frames_u8, question, params, rng):
    """Encodes the video once and samples answers to one question from it."""
    video = jax.jit(lambda m, x: m.encode_video(x))(model, normalize_frames(frames_u8))
    ids = jnp.asarray(templates.encode_prompt(tokenizer, question))[None]
    embeds, valid = model.embed_inputs(ids, video[None])
    out = generate(model.llm, embeds, valid, params, rng, pad_id=tokenizer.pad_id)
    texts = [tokenizer.decode(t[:n]) for t, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    return video, out, texts


def main(argv=None) -> None:
    args = parse_args(argv)
    data_dir = os.path.join(args.workdir, "data")
    print(f"[1/4] generating synthetic long videos in {data_dir}")
    synthetic.generate(data_dir, num_videos=10, frames=64, size=96, seed=args.seed)
    record = load_eval_records(os.path.join(data_dir, "test_eval.jsonl"))[0]

    tokenizer = build_tiny_tokenizer()
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    model = LongVILA(config, rngs=nnx.Rngs(args.seed))
    size = config.vision.image_size
    frames = read_frames(os.path.join(data_dir, record.video), args.frames, size).frames
    print(f"[2/4] decoded {frames.shape[0]} frames of {record.video} at {size}x{size}; "
          f"{config.tokens_per_frame} tokens per frame")

    question = templates.format_question(record.question, record.options)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0,
                            stop_token_ids=(tokenizer.eos_id,), num_samples=args.samples)
    start = time.perf_counter()
    video, out, texts = answer(model, tokenizer, frames, question, params,
                               jax.random.key(args.seed))
    seconds = time.perf_counter() - start
    print(f"[3/4] {record.category} question: {record.question}")
    print(f"      video embeddings {tuple(video.shape)}; {args.samples} samples, "
          f"{int(out.lengths.sum())} tokens in {seconds:.1f}s (compile included)")
    for i, text in enumerate(texts):
        print(f"      sample {i}: {text[:100]!r}")

    ckpt = os.path.join(args.workdir, "checkpoint")
    save_pretrained(model, ckpt, tokenizer=tokenizer)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_id,))
    before = answer(model, tokenizer, frames, question, greedy, None)[2]
    after = answer(load_pretrained(ckpt), tokenizer, frames, question, greedy, None)[2]
    status = "same greedy answer" if before == after else "DIFFERENT greedy answer"
    print(f"[4/4] saved a VILA directory to {ckpt}; reloaded it: {status}")
    if before != after:
        raise SystemExit("reloaded checkpoint disagrees with the model that wrote it")


if __name__ == "__main__":
    main()

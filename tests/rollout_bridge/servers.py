"""Tiny models for the rollout bridge tests, and an app of the tests' own served in a thread
(real server subprocesses: `rollout_bridge.launch`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import threading

import jax
from aiohttp import web
from flax import nnx

from lvr_jax.model import PRESETS, LongVILA
from rollout_bridge.launch import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_model(tokenizer, seed: int = 0, scale: float = 0.3, **llm) -> LongVILA:
    """The tiny preset with head_dim 32 (vLLM's minimum) and weights scaled up so that
    greedy choices are decided by clear margins rather than float rounding."""
    base = PRESETS["tiny"](vocab_size=tokenizer.vocab_size)
    # Untied, like Qwen2-7B: vLLM's in-place reload does not refresh a tied lm_head.
    fields = dict(num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, **llm)
    config = base.replace(llm=dataclasses.replace(base.llm, **fields),
                          video_token_id=tokenizer.video_id, newline_token_id=tokenizer.newline_id)
    model = LongVILA(config, rngs=nnx.Rngs(seed))
    perturb(model, seed, scale)
    return model


def perturb(model: LongVILA, seed: int, scale: float) -> None:
    """Adds N(0, scale^2) to every LLM parameter (a 'trained' model, different per seed)."""
    key = jax.random.key(seed + 1000)
    for i, (_, var) in enumerate(nnx.iter_graph(model.llm)):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            noise = scale * jax.random.normal(jax.random.fold_in(key, i), value.shape)
            var.set_value(value + noise.astype(value.dtype))


@contextlib.contextmanager
def serving_in_thread(app: web.Application, port: int = 0):
    """`app` on 127.0.0.1 (`port`, or a free one) from an event loop in a background thread;
    yields its base URL. For tests that need a route of their own beside the server's."""
    loop, runner, port = asyncio.new_event_loop(), web.AppRunner(app), port or free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()

"""Tiny models for the rollout bridge tests, and rollout servers as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import httpx2
import jax
import jax.numpy as jnp
from aiohttp import web
from flax import nnx

from lvr_jax.model import PRESETS, LongVILA
from tests.vllm_env import free_port

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


@dataclasses.dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: pathlib.Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def start_server(model_dir: str, engine: str, python: str = sys.executable, port: int = 0,
                 args=(), timeout: float = 300.0, log_dir: str = "/tmp",
                 max_model_len: int | None = 1024) -> ServerProcess:
    """`python -m rollout_bridge.server` on 127.0.0.1, returned once /health answers.

    `max_model_len` 1024 keeps vLLM's CPU KV cache small; None serves the model's own limit."""
    port = port or free_port()
    log = pathlib.Path(log_dir) / f"rollout-server-{port}.log"
    length = ["--max-model-len", str(max_model_len)] if max_model_len else []
    command = [python, "-m", "rollout_bridge.server", "--model", model_dir, "--engine", engine,
               "--port", str(port), *length, *args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    env.pop("XLA_FLAGS", None)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=str(ROOT), start_new_session=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"rollout server exited with {process.returncode}:\n{server.tail()}")
        try:
            if httpx2.get(server.url + "/health", timeout=2).status_code in (200, 401):
                return server
        except httpx2.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"rollout server not up after {timeout:.0f} s:\n{server.tail()}")
        time.sleep(0.5)


def stop_server(server: ServerProcess, sig=signal.SIGTERM, grace: float = 20.0) -> None:
    """Signals the server's process group; SIGKILL after `grace`."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, sig)
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def running_server(model_dir: str, engine: str, **kwargs):
    server = start_server(model_dir, engine, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)


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

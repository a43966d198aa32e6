"""A rollout server as a subprocess on loopback: `python -m rollout_bridge.server` started
from any Python (the trainer's, or vLLM's own environment), returned once /health answers,
and stopped with its whole process group. What the benchmarks, the tests and a user's own
scripts use to run a server beside a trainer on one machine.

    with running_server("runs/demo/sft/model/llm", "vllm", python=".venv-vllm/bin/python") as s:
        ...  # s.url, e.g. "http://127.0.0.1:41234"
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx2

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the folder holding rollout_bridge/
# Quiet and offline; a small KV cache on a CPU vLLM (GPU vLLM sizes its own).
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: pathlib.Path

    def tail(self) -> str:
        """The end of the server's log (what it said before it failed)."""
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def start_server(model_dir: str, engine: str, python: str = sys.executable, port: int = 0,
                 args=(), timeout: float = 300.0, log_dir: str = "/tmp",
                 max_model_len: int | None = 1024) -> ServerProcess:
    """`python -m rollout_bridge.server` on 127.0.0.1 (`port` 0: a free one), its output in
    `log_dir`, returned once /health answers; `max_model_len` 1024 keeps a CPU vLLM's KV
    cache small, None serves the model's own limit."""
    port = port or free_port()
    log = pathlib.Path(log_dir) / f"rollout-server-{port}.log"
    length = ["--max-model-len", str(max_model_len)] if max_model_len else []
    command = [python, "-m", "rollout_bridge.server", "--model", model_dir, "--engine", engine,
               "--port", str(port), *length, *args]
    env = {**os.environ, **SERVER_ENV}
    env.pop("XLA_FLAGS", None)  # the trainer's simulated devices mean nothing to the server
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=str(SOURCE_ROOT), start_new_session=True)
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
    """Signals the server's process group; SIGKILL after `grace` seconds."""
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
    """`start_server`'s server for the `with` block, stopped after it."""
    server = start_server(model_dir, engine, **kwargs)
    try:
        yield server
    finally:
        stop_server(server)

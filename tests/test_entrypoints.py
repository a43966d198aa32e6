"""Every `python -m` entrypoint answers --help, and the README's demo runs."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def entrypoint_modules():
    """Modules of the project that run as `python -m` (they hold a __main__ guard)."""
    found = []
    for package in ("lvr_jax", "rollout_bridge", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.append(module.removesuffix(".__main__"))
    return found


@pytest.mark.parametrize("module", entrypoint_modules())
def test_entrypoint_answers_help(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or "flags" in out.stdout.lower(), out.stdout[:500]


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lvr_jax.demo", "--workdir", str(tmp_path),
                          "--frames", "8", "--samples", "2", "--max_new_tokens", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reloaded it: same greedy answer" in out.stdout
    assert (tmp_path / "checkpoint" / "llm" / "model.safetensors").exists()

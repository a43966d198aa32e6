"""Every `python -m` entrypoint answers --help, and the README's demo runs."""

import json
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
    """The README's main command, shortened: data, SFT, evaluation, GRPO, evaluation, plots."""
    out = subprocess.run([sys.executable, "-m", "lvr_jax.demo", "--workdir", str(tmp_path),
                          "--videos", "20", "--drill_steps", "2", "--sft_steps", "3",
                          "--grpo_steps", "2", "--eval_limit", "4", "--seed", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after GRPO" in out.stdout and "chance is 25%" in out.stdout
    for produced in ("results.json", "accuracy.png", "sft/sft_curves.png", "grpo/grpo_curves.png",
                     "heldout_during_grpo.png", "grpo/model/llm/model.safetensors"):
        assert (tmp_path / produced).exists(), produced
    # --summarize over finished runs (the same one twice: no spread)
    summary = subprocess.run([sys.executable, "-m", "lvr_jax.demo", "--summarize", str(tmp_path),
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0, summary.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    after_sft = results["after SFT"]["accuracy"]
    assert f"{after_sft:>8.1%} ±0.0%" in summary.stdout, summary.stdout
    assert (tmp_path / "seeds_heldout.png").exists()

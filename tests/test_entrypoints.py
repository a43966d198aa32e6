"""Every `python -m` entrypoint runs in some test, and the README's demo runs."""

import json
import pathlib
import re
import subprocess
import sys

from tests.test_readme import ELSEWHERE, SHORTEN

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


def test_every_entrypoint_runs_in_a_test():
    """A --help run would only repeat what the README test (or the test it names) does with
    real arguments."""
    covered = " ".join([*SHORTEN, *ELSEWHERE])
    for module in entrypoint_modules():
        assert re.search(rf"(^|\s){re.escape(module)}(\s|$)", covered), \
            f"python -m {module} is run by no test"


def test_demo_runs_end_to_end(shortened_demo):
    """The README's main command, shortened: data, SFT, evaluation, GRPO, evaluation, plots."""
    tmp_path, out = shortened_demo
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

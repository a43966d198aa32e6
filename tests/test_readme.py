"""Every command in the README runs: here, shortened, or in the test or CI step named for it.

Commands are read from the README's bash blocks and from every backticked `python -m ...`.
A command this file does not know fails `test_every_readme_command_is_accounted_for`, so a
new README command needs a way to run before it lands.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.vllm_env import ensure_vllm_venv

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Extra arguments that shorten a command (argparse and absl keep the last value given).
SHORTEN = {
    "lvr_jax.data.synthetic": "--num_videos 3 --frames 16 --size 32",
    "lvr_jax.train --config=configs/demo.py:sft": "--config.train.num_steps=2 "
        "--config.drills.steps=2",
    "lvr_jax.train --config=configs/demo.py:grpo": "--config.train.num_steps=1 "
        "--config.data.batch_size=2 --config.rl.max_new_tokens=8",
    "lvr_jax.eval": "--limit=2 --config.eval.max_new_tokens=8",
    "benchmarks.checkpoint_memory": "--size_mb 8",
    "benchmarks.bench_video_decode": "--seconds 2 --width 64 --height 48 --frames 8 --size 32 "
        "--repeats 1",
    "benchmarks.sharding_memory --model small": "--frames 8 --strategies ring",
    "benchmarks.sharding_memory --model 7b": "--frames 512 --strategies ring",
    "benchmarks.sharding_step_time": "--frames 2 --strategies ring --repeats 1",
    "benchmarks.rollout_bridge": "--prompts 1 --group 2 --max-tokens 4 --video-tokens 8 "
        "--layers 1",
    "benchmarks.frame_encoding": "--frames 8 --repeats 1",
    "benchmarks.off_policy": "--init '' --steps 2 --prompts 2 --max-new-tokens 4 "
        "--out runs/off_policy.png",
    "benchmarks.weight_sync": "--size_mb 8 --repeats 1",
    "benchmarks.rl_cache_speedup": "--frames 16 --repeats 1 --max_new_tokens 2",
    "benchmarks.gpu_step": "--model tiny --tokens 300 --text 64 --response 8 --generations 2 "
        "--kernels blockwise --repeats 1 --out runs/gpu_step",
    "benchmarks.sampler_throughput": "--prompts 1 --generations 2 --frames 4 --max_new_tokens 4 "
        "--repeats 1 --out runs/sampler.png",
    "benchmarks.shared_prompt": "--cases demo --repeats 1",
}
# Commands another test or CI runs as written, or that need what this machine lacks.
ELSEWHERE = {
    "scripts/setup.sh && .venv/bin/python -m lvr_jax.demo":
        "tests/test_entrypoints.py::test_demo_runs_end_to_end",
    "lvr_jax.demo --seed": "tests/test_entrypoints.py::test_demo_runs_end_to_end",
    "lvr_jax.demo --summarize": "tests/test_entrypoints.py::test_demo_runs_end_to_end",
    "scripts/setup.sh && .venv/bin/python -m pytest": ".ci/run",
    "lvr_jax.datagen": "tests/datagen/test_vllm_e2e.py::test_structured_replies_from_vllm_become",
    "rollout_bridge.server": "tests/rollout_bridge/test_server.py::test_greedy_generation_matches",
    "lvr_jax.train --config=configs/longvila_r1_7b_grpo.py":
        "tests/rollout_bridge/test_grpo_server.py::test_run_recovers_when_a_killed_server",
    "lvr_jax.sharding.multihost_check": "tests/sharding/test_multihost.py::test_two_processes",
    # one cell of its table: the `hour` recipe at 4,096 frames (a full table takes 10 min)
    "benchmarks.recipe_memory":
        "tests/test_recipes.py::test_an_hour_of_video_fits_80gb_per_device",
    "JAX_PROCESS_ID=": "tests/test_train_mesh.py::test_two_processes_end_where_one_device_ends",
    "lvr_jax.model.assemble": "needs a SigLIP and a Qwen2 download; the command on tiny parts "
        "written by transformers is tests/model/test_assemble.py::"
        "test_command_line_writes_a_loadable_directory_and_names_bad_inputs",
    "huggingface-cli download": "needs the Hugging Face Hub (no network here); loading a VILA "
        "directory is tests/model/test_checkpoint.py::test_released_layout_round_trips",
}


def readme_commands() -> list[str]:
    """Shell commands of the bash blocks (continuations joined), then inline `python -m`s."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    commands += re.findall(r"`((?:python -m|huggingface-cli) [^`]+)`", README)
    # one entry per command: drop repeats and commands that another one extends
    return [c for i, c in enumerate(commands) if c not in commands[:i]
            and not any(o != c and o.startswith(c + " ") for o in commands)]


def key_of(command: str, table: dict) -> str | None:
    """The longest table key the command holds."""
    found = [k for k in table if k in command]
    return max(found, key=len) if found else None


def test_every_readme_command_is_accounted_for():
    for command in readme_commands():
        assert key_of(command, SHORTEN) or key_of(command, ELSEWHERE), \
            f"README command has no test: {command}"
    for where in ELSEWHERE.values():
        if "::" in where:
            file, name = where.split(" is ")[-1].split("::")
            assert f"def {name}" in (ROOT / file).read_text(), where


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory like the repository root: configs/ and the demo's data."""
    from lvr_jax.data.synthetic import generate

    path = tmp_path_factory.mktemp("readme")
    (path / "configs").symlink_to(ROOT / "configs")
    generate(str(path / "runs" / "demo" / "data"), num_videos=12, frames=32, size=64, seed=3,
             progress=False)
    return path


def runnable() -> list[str]:
    return [c for c in readme_commands() if key_of(c, SHORTEN) and not key_of(c, ELSEWHERE)]


@pytest.mark.parametrize("command", runnable())
def test_readme_command_runs(command, sandbox):
    argv = shlex.split(command) + shlex.split(SHORTEN[key_of(command, SHORTEN)])
    assert argv[:2] == ["python", "-m"], command
    if "--python" in argv:  # the vLLM server's interpreter
        if os.environ.get("LVR_SKIP_VLLM") == "1":
            pytest.skip("LVR_SKIP_VLLM=1")
        argv[argv.index("--python") + 1] = str(ensure_vllm_venv())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *argv[1:]], cwd=sandbox, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"

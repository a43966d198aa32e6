"""The paper-scale recipes compile for 8 devices from shapes alone (no weights)."""

import importlib.util
import pathlib

import jax
import pytest

from lvr_jax import build
from lvr_jax.sharding import mesh as mesh_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def recipe(name: str, platform: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(platform)


GPU_80GB = 80e9 - 5.5 * 2**30  # what an 80 GB GPU leaves to XLA (about 74.5 GiB)


@pytest.mark.parametrize("name", ["longvila_r1_7b_sft", "longvila_r1_7b_grpo"])
@pytest.mark.parametrize("platform", ["gpu8", "tpu"])
def test_7b_recipe_phases_fit_80gb_per_device_as_shipped(name, platform):
    """Each phase of a step of the recipe as shipped (256 frames, its batch sizes, its mesh)
    compiled for 8 devices from shapes alone (SFT: the update; GRPO: the rollout of one
    chunk, a log-prob pass, the update): its peak by XLA's memory analysis (on this CPU;
    `benchmarks/gpu_step` is there to check a GPU) fits 80 GB."""
    assert jax.device_count() == 8
    config = recipe(name, platform)
    assert config.data.num_frames == 256
    mesh = mesh_lib.make_mesh(config.mesh)
    phases = build.compile_phases(config, mesh)
    assert sorted(phases) == (["update"] if name.endswith("sft") else
                              ["log-probs", "rollout", "update"])
    for phase, compiled in phases.items():
        peak = build.peak_bytes(compiled.memory_analysis())
        assert peak < GPU_80GB, f"{name}:{platform} {phase} needs {peak / 2**30:.1f} GiB"
    assert build.preset_config(config).llm.num_hidden_layers == 28

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


@pytest.mark.parametrize("name", ["longvila_r1_7b_sft", "longvila_r1_7b_grpo"])
@pytest.mark.parametrize("platform", ["gpu8", "tpu"])
def test_7b_recipe_step_compiles_on_8_devices(name, platform):
    assert jax.device_count() == 8
    config = recipe(name, platform)
    # Real 7B shapes; only the lengths shrink so that compiling on 2 CPU cores stays short.
    config.data.update(num_frames=8, max_length=256, batch_size=2)
    config.rl.update(update_batch_size=2, max_new_tokens=64)
    mesh = mesh_lib.make_mesh(config.mesh)
    compiled = build.compile_step(config, mesh)
    assert compiled.memory_analysis() is not None
    assert build.preset_config(config).llm.num_hidden_layers == 28

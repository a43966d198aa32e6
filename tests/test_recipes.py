"""The paper-scale recipes compile for 8 devices from shapes alone (no weights)."""

import jax
import pytest

from benchmarks import recipe_memory
from lvr_jax import memory_report
from lvr_jax.config import preset_config
from lvr_jax.sharding import mesh as mesh_lib

recipe = recipe_memory.recipe  # configs/<name>.py's get_config(platform)
GPU_80GB = recipe_memory.GPU_80GB  # what an 80 GB GPU leaves to XLA: 69.0 GiB


@pytest.mark.parametrize("name", ["longvila_r1_7b_sft", "longvila_r1_7b_grpo"])
@pytest.mark.parametrize("platform", ["gpu8", "tpu"])
def test_7b_recipe_phases_fit_80gb_per_device_as_shipped(name, platform):
    """Each phase of a step of the recipe as shipped (256 frames, its batch sizes, its mesh)
    compiled for 8 devices from shapes alone (both: one video's frame encoding and the
    update; GRPO also the rollout of one chunk and a log-prob pass): its peak by XLA's
    memory analysis (on this CPU; `benchmarks/gpu_step` is there to check a GPU), with what
    the step holds beside it (weights, optimizer state, reference policy), fits 80 GB."""
    assert jax.device_count() == 8
    config = recipe(name, platform)
    assert config.data.num_frames == 256
    mesh = mesh_lib.make_mesh(config.mesh)
    report = memory_report.phase_costs(config, mesh)
    streamed = ["frame encoding", "optimizer step", "update micro-batch"]
    assert sorted(report) == (streamed if name.endswith("sft") else
                              sorted(streamed + ["log-probs", "rollout"]))
    for phase, cost in report.items():
        peak = memory_report.peak_bytes(cost.memory)
        assert peak > 0 and cost.total >= peak and cost.calls > 0
        assert cost.flops > 0 or phase == "optimizer step"  # Adam has no matmul
        assert cost.total < GPU_80GB, f"{name}:{platform} {phase} needs {cost.total / 2**30:.1f} GiB"
    assert "optimizer state" in report["frame encoding"].held
    if name.endswith("grpo"):  # micro-batches streamed from host memory (rl.offload_prompts)
        assert "reference policy" in report["update micro-batch"].held
    assert preset_config(config).llm.num_hidden_layers == 28


def benchmark_cell(capsys, tmp_path, recipe_name, platform, strategy, frames) -> str:
    """The row `python -m benchmarks.recipe_memory` prints for one cell (and its plot)."""
    out = tmp_path / "memory.png"
    recipe_memory.main(["--recipe", recipe_name, "--platforms", platform, "--strategies",
                        strategy, "--frames", str(frames), "--out", str(out)])
    assert out.stat().st_size > 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(f"| `{platform}` | {strategy} |")]
    assert len(rows) == 1
    return rows[0]


def test_an_hour_of_video_fits_80gb_per_device(capsys, tmp_path):
    """4,096 frames of the 7B (about 1.05M tokens per sequence, an hour at about 1 fps) in one
    GRPO step, `longvila_r1_7b_grpo.py:hour` as shipped (ring attention over 8 devices, four
    prompts per rollout chunk, each group's 5 samples decoding against its one prompt cache,
    one group per log-prob pass and streamed micro-batch, `model.remat_group=4`): every
    phase with what the step holds beside it under 80 GB per device (the benchmark's cell:
    its worst phase, and the ceiling that says all fit)."""
    config = recipe("longvila_r1_7b_grpo", "hour")
    assert config.data.num_frames == 4096 and config.rl.update_batch_size == 128
    assert config.rl.rollout.prompts_per_chunk == 4
    row = benchmark_cell(capsys, tmp_path, "longvila_r1_7b_grpo", "hour", "ring", 4096)
    assert "(over)" not in row and row.endswith("| >= 4,096 |"), row


def test_the_3b_recipe_fits_80gb_per_device_at_its_frames(capsys, tmp_path):
    """The 3B-class recipe (Qwen2.5-3B, 3x3 projector, temporal pairs: 61 tokens per frame)
    at its shipped 3,600 frames, the paper's 3B ceiling, fits with room to spare."""
    config = recipe("longvila_3b_grpo", "gpu8")
    model = preset_config(config)
    assert config.data.num_frames == 3600 and model.num_video_tokens(2) == 122
    assert model.llm.num_hidden_layers == 36 and model.llm.hidden_size == 2048
    row = benchmark_cell(capsys, tmp_path, "longvila_3b_grpo", "gpu8", "ulysses", 3600)
    assert "(over)" not in row and row.endswith("| >= 3,600 |"), row

"""Shared fixtures: the tiny tokenizer and reference VILA checkpoints built offline."""

import os
import pathlib
import subprocess
import sys

# Tests see 8 simulated CPU devices (sharding tests need them); set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402
import torch  # noqa: E402

from lvr_jax.tokenizer import build_tiny_tokenizer  # noqa: E402
from tests import hf_reference  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_vila_dir(tmp_path_factory, tokenizer):
    """Builds (and caches) a reference VILA directory: (path, hf_llm, hf_vision, projector)."""
    built = {}

    def make(projector_type="mlp_downsample_2x2_fix", image_size=70, **llm_kwargs):
        key = (projector_type, image_size, tuple(sorted(llm_kwargs.items())))
        if key not in built:
            llm = hf_reference.qwen2(vocab_size=tokenizer.vocab_size, **llm_kwargs)
            vision = hf_reference.siglip(image_size=image_size)
            projector = hf_reference.ProjectorReference(
                projector_type, vision.config.hidden_size, llm.config.hidden_size)
            hf_reference.randomize(projector, seed=2)
            path = str(tmp_path_factory.mktemp("vila"))
            hf_reference.write_vila_dir(path, llm, vision, projector, projector_type, tokenizer)
            built[key] = (path, llm, vision, projector)
        return built[key]

    return make


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """A small synthetic long-video set (train/test splits) shared by the training tests."""
    from lvr_jax.data.synthetic import generate

    out = str(tmp_path_factory.mktemp("synthetic"))
    generate(out, num_videos=12, frames=32, size=64, seed=1, progress=False)
    return out


@pytest.fixture
def tiny_train_config(synthetic_set):
    """configs/demo.py shrunk further: a training step takes well under a second."""
    from tests.tiny_recipe import tiny_config

    return lambda stage, steps: tiny_config(stage, synthetic_set, steps)


# The README's demo command, shortened (tests/test_entrypoints.py reads its output).
# 30 videos: the GRPO stage's batch of 32 prompts needs 32 RL questions outside Spatial.
SHORTENED_DEMO = ["--videos", "30", "--drill_steps", "2", "--sft_steps", "3", "--grpo_steps", "2",
                  "--eval_limit", "4", "--seed", "1"]


@pytest.fixture(scope="session")
def shortened_demo(tmp_path_factory):
    """One run of `python -m lvr_jax.demo` on a shortened recipe: (workdir, completed process).

    The entrypoint test checks what it wrote; the notebook test starts from a copy of it, so
    its stages resume from the finished checkpoints instead of training the same steps again.
    """
    workdir = tmp_path_factory.mktemp("demo")
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "lvr_jax.demo", "--workdir", str(workdir),
                          *SHORTENED_DEMO], cwd=root, capture_output=True, text=True, timeout=900)
    return workdir, out

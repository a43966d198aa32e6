"""Shared fixtures: the tiny tokenizer and reference VILA checkpoints built offline."""

import os

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

"""Fixtures of the server tests: a tiny model the server starts from and two successors."""

import pytest

from rollout_bridge import export
from tests.rollout_bridge.servers import tiny_model


@pytest.fixture(scope="module")
def models(tokenizer):
    """The model the server starts from (A) and two 'trained' successors (B, C)."""
    return [tiny_model(tokenizer, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def model_dir(models, tokenizer, tmp_path_factory):
    """A's LLM directory (modules that need another one define their own)."""
    return export.export_dir(models[0], str(tmp_path_factory.mktemp("llm")), tokenizer)

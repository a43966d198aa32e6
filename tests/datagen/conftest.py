"""Datagen fixtures: generated long videos, a tiny VILA checkpoint, pipeline configs."""

import os
import shutil

import pytest

from lvr_jax.data import synthetic
from tests.datagen.chat_server import chat_server
from tests.datagen.helpers import FPS, SECONDS


@pytest.fixture(scope="session")
def generated_videos(tmp_path_factory):
    """Three 24-second synthetic event videos (mp4) in a folder of their own."""
    root = tmp_path_factory.mktemp("datagen_videos")
    synthetic.generate(str(root), num_videos=3, frames=SECONDS * FPS, size=64, fps=FPS,
                       progress=False)
    return str(root / "videos")


@pytest.fixture
def videos_dir(generated_videos, tmp_path):
    """A writable copy of the generated videos (tests add broken files to it)."""
    target = tmp_path / "videos"
    shutil.copytree(generated_videos, target)
    return str(target)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny LongVILA saved as a VILA directory with the tiny tokenizer."""
    from flax import nnx

    from lvr_jax.model import PRESETS, LongVILA, save_pretrained
    from lvr_jax.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    path = str(tmp_path_factory.mktemp("tiny_vila"))
    save_pretrained(LongVILA(config, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer)
    return path


@pytest.fixture
def server():
    """(base_url, script) of a scriptable OpenAI-compatible server on loopback."""
    with chat_server() as served:
        yield served

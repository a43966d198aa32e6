"""Helpers of the datagen tests: fast pipeline configs and reading outputs."""

import json
import os

from lvr_jax.datagen.config import get_config

SECONDS, FPS = 24, 4  # generated videos last 24 s: clips 0-10, 10-20, 20-24


def pipeline_config(videos_dir: str, out_dir: str, base_url: str, **overrides):
    """A fast config: OpenAI-compatible captioner and reasoning LLM both at `base_url`."""
    config = get_config()
    config.videos_dir, config.out_dir = videos_dir, out_dir
    config.frames_per_clip, config.frame_size = 2, 32
    config.caption.backend, config.caption.base_url = "openai", base_url
    config.reasoning.base_url, config.reasoning.api_key_env = base_url, ""
    config.retries, config.backoff_seconds, config.timeout_seconds = 2, 0.01, 30.0
    config.val_fraction, config.progress = 0.34, False
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

"""Defaults of the LongVideo-Reason generation pipeline (`python -m lvr_jax.datagen`).

    python -m lvr_jax.datagen --config=lvr_jax/datagen/config.py \\
        --config.videos_dir=/data/raw --config.out_dir=/data/lvr \\
        --config.caption.backend=openai --config.caption.base_url=http://127.0.0.1:8001/v1 \\
        --config.reasoning.base_url=http://127.0.0.1:8000/v1 --config.reasoning.model=my-llm

Fields
  videos_dir          root of the raw videos; records name videos relative to it
  videos_glob         glob under videos_dir ("**/*" keeps files with a video extension)
  out_dir             train.jsonl, val.jsonl, rejected.jsonl, summary.json, done/<video-id>.json
  clip_seconds        length of the clips each video is split into (the paper: 10 s)
  frames_per_clip     frames sampled uniformly inside each clip and shown to the captioner
  frame_size          side (pixels) of the square frames sent to an OpenAI-compatible captioner
  min_clip_seconds    a shorter tail is merged into the clip before it
  caption.backend     "embedded" (this project's LongVILA at caption.checkpoint) or "openai"
  caption.*           base_url, model, api_key_env (name of the env var holding the key; ""
                      for none), max_tokens, temperature, batch_size (embedded: clips per call)
  reasoning.*         the reasoning LLM's OpenAI-compatible endpoint: base_url, model,
                      api_key_env, temperature, max_tokens; structured_output=True also sends
                      the JSON schema as `response_format` (vLLM and OpenAI honour it), and
                      max_string_chars > 0 caps each string of that schema
  questions_per_video questions asked per video, shared out by category_targets
  category_targets    relative mix of temporal / goal / plot / spatial questions; kept
                      questions of a category are capped at its share
  concurrency         requests in flight per endpoint
  videos_in_flight    videos processed at once (a crash loses at most these)
  retries, backoff_seconds, timeout_seconds   per request: retries after the first try, the
                      first back-off (doubled each retry, with jitter), the most one try
                      takes (connecting to the last byte)
  request_deadline_seconds  the most one request takes with all its tries and back-offs
  stop_after_failed_requests  an endpoint that fails this many requests in a row (each after
                      its retries) stops the run; one that never answered stops it at its
                      first failed request, and HTTP 401/403/404 stop it at once
  val_fraction, seed  each video goes to val with this probability, by a seeded hash of its id
"""

from __future__ import annotations

import ml_collections


def caption_config() -> ml_collections.ConfigDict:
    """Where clip captions come from: the embedded model or an OpenAI-compatible VLM."""
    return ml_collections.ConfigDict(dict(
        backend="embedded", checkpoint="", base_url="", model="", api_key_env="",
        max_tokens=128, temperature=0.2, batch_size=8))


def reasoning_config() -> ml_collections.ConfigDict:
    """The reasoning LLM that writes questions, chains of thought and answers."""
    return ml_collections.ConfigDict(dict(
        base_url="http://127.0.0.1:8000/v1", model="", api_key_env="OPENAI_API_KEY",
        temperature=0.6, max_tokens=4096, structured_output=False, max_string_chars=0))


def get_config() -> ml_collections.ConfigDict:
    """The default pipeline: 10 s clips, 4 frames each, 4 questions per video (one per category)."""
    config = ml_collections.ConfigDict()
    config.videos_dir = ""
    config.videos_glob = "**/*"
    config.out_dir = ""
    config.clip_seconds = 10.0
    config.min_clip_seconds = 2.0
    config.frames_per_clip = 4
    config.frame_size = 448
    config.caption = caption_config()
    config.reasoning = reasoning_config()
    config.questions_per_video = 4
    config.category_targets = ml_collections.ConfigDict(
        dict(temporal=1, goal=1, plot=1, spatial=1))
    config.concurrency = 4
    config.videos_in_flight = 1
    config.retries = 3
    config.backoff_seconds = 1.0
    config.timeout_seconds = 300.0
    config.request_deadline_seconds = 600.0
    config.stop_after_failed_requests = 3
    config.val_fraction = 0.1
    config.seed = 0
    config.progress = True
    return config

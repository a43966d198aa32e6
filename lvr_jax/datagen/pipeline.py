"""The generation pipeline: clips -> captions -> reasoning questions -> filtered training records.

`run(config)` processes every video under `config.videos_dir` that has no state file yet,
`videos_in_flight` at a time, then rebuilds the JSONL outputs and prints nothing itself:
it returns the summary (see summary.py). A video whose endpoint keeps failing is left
without a state file, so the next run tries it again. An endpoint that is down (client.py:
not answering, failing request after request) stops the run early: no further video is
started, and the summary's `run.stopped` says why (`summary.failure` turns that, or a run
that generated nothing, into the one-line reason the entrypoint exits with).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import random
from typing import Any

import ml_collections
from tqdm import tqdm

from lvr_jax.data.video import BadVideoError
from lvr_jax.datagen import prompts, records
from lvr_jax.datagen.client import ChatClient, EndpointDown, EndpointError, RetryPolicy
from lvr_jax.datagen.clips import iter_clips, probe
from lvr_jax.datagen.parse import Rejection, ReplyError, category_quotas, filter_items, parse_reply
from lvr_jax.datagen.summary import summarize

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Context:
    """What every video's processing shares: settings, captioner, reasoning client, quotas."""

    config: ml_collections.ConfigDict
    captioner: Any
    reasoning: ChatClient
    quotas: dict[str, int]
    rng: random.Random


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first missing or invalid setting."""
    if not config.videos_dir or not config.out_dir:
        raise ValueError("set --config.videos_dir (raw videos) and --config.out_dir (outputs)")
    if not os.path.isdir(config.videos_dir):
        raise ValueError(f"videos_dir {config.videos_dir!r} is not a directory")
    if config.caption.backend not in ("embedded", "openai"):
        raise ValueError(f"caption.backend is {config.caption.backend!r}; use 'embedded' or 'openai'")
    if config.caption.backend == "embedded" and not config.caption.checkpoint:
        raise ValueError("caption.backend='embedded' needs caption.checkpoint (a VILA directory)")
    if config.caption.backend == "openai" and not config.caption.base_url:
        raise ValueError("caption.backend='openai' needs caption.base_url (and caption.model)")
    if not config.reasoning.base_url:
        raise ValueError("reasoning.base_url is empty; give the reasoning LLM's /v1 URL")
    if not 0.0 <= config.val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {config.val_fraction}")
    if config.caption.backend == "embedded" and not os.path.isdir(config.caption.checkpoint):
        raise ValueError(f"caption.checkpoint {config.caption.checkpoint!r} is not a folder; "
                         "give a VILA directory (e.g. a training run's model/ export)")
    if config.frames_per_clip < 1 or config.questions_per_video < 1:
        raise ValueError("frames_per_clip and questions_per_video must be at least 1")
    _check_time_limits(config)
    category_quotas(config.questions_per_video, dict(config.category_targets))  # raises if bad


def _check_time_limits(config: ml_collections.ConfigDict) -> None:
    """The request bounds: positive times, retries >= 0, at least one failure before a stop."""
    for field in ("timeout_seconds", "request_deadline_seconds"):
        if not config[field] > 0:
            raise ValueError(f"{field} must be above 0 seconds, got {config[field]}")
    if config.retries < 0 or config.stop_after_failed_requests < 1:
        raise ValueError(f"retries must be at least 0 and stop_after_failed_requests at least "
                         f"1, got {config.retries} and {config.stop_after_failed_requests}")


def _client(endpoint: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> ChatClient:
    return ChatClient(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
                      concurrency=config.concurrency, timeout_seconds=config.timeout_seconds,
                      policy=RetryPolicy(config.retries, config.backoff_seconds),
                      request_seconds=config.request_deadline_seconds,
                      stop_after=config.stop_after_failed_requests)


def make_captioner(config: ml_collections.ConfigDict):
    """The captioner the config names (loading the embedded model takes a while)."""
    from lvr_jax.datagen.captioners import EmbeddedCaptioner, OpenAICaptioner

    c = config.caption
    if c.backend == "openai":
        return OpenAICaptioner(_client(c, config), config.frame_size, c.max_tokens, c.temperature)
    return EmbeddedCaptioner(c.checkpoint, config.clip_seconds, c.max_tokens, c.temperature,
                             c.batch_size, config.seed)


def _take(iterator, n: int) -> list:
    return list(itertools.islice(iterator, n))


async def caption_video(path: str, info, ctx: Context) -> list[dict[str, Any]]:
    """[{start, end, caption}] for every clip, decoding and captioning a chunk at a time."""
    config = ctx.config
    clips = iter_clips(path, info, config.clip_seconds, config.frames_per_clip,
                       ctx.captioner.frame_size, config.min_clip_seconds)
    chunk_size = max(config.concurrency, config.caption.batch_size)
    captions = []
    while chunk := await asyncio.to_thread(_take, clips, chunk_size):
        texts = await ctx.captioner.caption(chunk)
        captions += [{"start": c.start, "end": c.end, "caption": t} for c, t in zip(chunk, texts)]
    return captions


async def ask_questions(captions: list[dict], duration: float, ctx: Context
                        ) -> tuple[list[Any] | None, Rejection | None, int]:
    """(raw items, None, retries) from the reasoning LLM, or (None, why, retries) when every
    reply stayed malformed. Endpoint failures raise EndpointError."""
    config, r = ctx.config, ctx.config.reasoning
    messages = prompts.reasoning_messages(captions, duration, ctx.quotas)
    extra = ({"response_format": prompts.response_format(config.questions_per_video,
                                                         r.max_string_chars)}
             if r.structured_output else {})
    failure = None
    for attempt in range(config.retries + 1):
        if attempt:
            await asyncio.sleep(ctx.reasoning.policy.delay(attempt - 1, ctx.rng))
        reply = await ctx.reasoning.chat(messages, max_tokens=r.max_tokens,
                                         temperature=r.temperature, **extra)
        try:
            return parse_reply(reply.text, reply.finish_reason), None, attempt
        except ReplyError as error:
            log.info("malformed reply (%s), try %d of %d", error, attempt + 1, config.retries + 1)
            failure = Rejection(error.reason, f"{error.detail} (after {attempt + 1} tries)",
                                reply.text[:4000])
    return None, failure, config.retries


def _state(video: str, config, status: str, **fields) -> dict[str, Any]:
    split = records.split_of(video, config.seed, config.val_fraction)
    base = {"video": video, "status": status, "split": split, "duration": None, "clips": [],
            "records": [], "rejected": [], "reply_retries": 0}
    return {**base, **fields}


async def process_video(video: str, ctx: Context) -> dict[str, Any]:
    """The finished state of one video (kept records, rejections); EndpointError propagates."""
    config = ctx.config
    path = os.path.join(config.videos_dir, video)
    try:
        info = await asyncio.to_thread(probe, path)
        captions = await caption_video(path, info, ctx)
    except BadVideoError as error:
        log.warning("%s; skipped", error)
        reject = records.rejection_row(Rejection("bad_video", str(error)), video)
        return _state(video, config, "bad_video", rejected=[reject])
    items, failure, retries = await ask_questions(captions, info.duration, ctx)
    fields = dict(duration=round(info.duration, 3), clips=captions, reply_retries=retries)
    if items is None:
        return _state(video, config, "malformed_reply",
                      rejected=[records.rejection_row(failure, video)], **fields)
    kept, rejected = filter_items(items, ctx.quotas)
    vid = records.video_id(video)
    rows = [records.training_record(q, video, f"{vid}-{n}") for n, q in enumerate(kept)]
    return _state(video, config, "done", records=rows,
                  rejected=[records.rejection_row(r, video) for r in rejected], **fields)


async def _worker(queue: asyncio.Queue, ctx: Context, bar: tqdm, run: dict[str, Any]) -> None:
    while not queue.empty() and not run["stopped"]:
        video = queue.get_nowait()
        try:
            state = await process_video(video, ctx)
        except EndpointError as error:
            if isinstance(error, EndpointDown) and not run["stopped"]:
                log.error("stopping the run: %s", error)
                run["stopped"] = str(error)
            log.error("video %r not finished: %s; it is retried on the next run", video, error)
            run["failed"] += 1
            run["errors"][video] = str(error)
        else:
            records.write_state(ctx.config.out_dir, state)
            run["finished"] += 1
            run["kept"] += len(state["records"])
        bar.update(1)
        bar.set_postfix(kept=run["kept"], failed=run["failed"])


async def resolve_model(client: ChatClient) -> None:
    """Fills an empty model name with the first one the endpoint serves (GET /models)."""
    if client.model:
        return
    client.model = await client.first_model()
    log.info("using model %r served at %s", client.model, client.url)


async def _resolve_models(ctx: Context, run: dict[str, Any]) -> None:
    """Model names the config leaves empty; an endpoint that is down stops the run here."""
    try:
        await resolve_model(ctx.reasoning)
        if ctx.config.caption.backend == "openai":
            await resolve_model(ctx.captioner.client)
    except EndpointError as error:  # no model list: no request of the run can go out
        log.error("stopping the run before any video: %s", error)
        run["stopped"] = str(error)


async def run_async(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Processes the pending videos and rebuilds the outputs; returns the summary."""
    videos = records.find_videos(config.videos_dir, config.videos_glob)
    pending = [v for v in videos if not records.is_done(config.out_dir, v)]
    run = {"found": len(videos), "skipped": len(videos) - len(pending), "finished": 0,
           "failed": 0, "kept": 0, "errors": {}, "stopped": None}
    quotas = category_quotas(config.questions_per_video, dict(config.category_targets))
    ctx = Context(config, None, _client(config.reasoning, config), quotas,
                  random.Random(config.seed))
    try:
        if pending:
            ctx.captioner = make_captioner(config)
            await _resolve_models(ctx, run)
        queue: asyncio.Queue = asyncio.Queue()
        for video in pending:
            queue.put_nowait(video)
        with tqdm(total=len(pending), desc="videos", unit="video",
                  disable=not config.progress) as bar:
            await asyncio.gather(*(_worker(queue, ctx, bar, run)
                                   for _ in range(max(1, config.videos_in_flight))))
    finally:
        await ctx.reasoning.close()
        if ctx.captioner is not None:
            await ctx.captioner.close()
        records.write_outputs(config.out_dir)
    summary = summarize(records.read_states(config.out_dir), run)
    records.write_atomic(os.path.join(config.out_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Checks the config and runs the pipeline to the end; returns the summary."""
    check_config(config)
    os.makedirs(os.path.join(config.out_dir, records.STATE_DIR), exist_ok=True)
    return asyncio.run(run_async(config))

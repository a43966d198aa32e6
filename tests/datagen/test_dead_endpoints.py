"""Endpoints that are down: nothing listening, HTTP 500s, bodies that are not JSON, no answer,
an answer trickled forever. The run stops at the first video instead of retrying every one,
names the endpoint, bounds each request in time, and the entrypoint exits 1 in one line."""

import asyncio
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from lvr_jax.datagen.client import ChatClient, EndpointError, RetryPolicy
from lvr_jax.datagen.pipeline import run
from lvr_jax.datagen.summary import failure, format_summary
from tests.datagen.helpers import pipeline_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIPS = 3  # each generated video is captioned in 3 clips


def closed_port_url() -> str:
    """The /v1 URL of a loopback port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def more_videos(videos_dir: str, copies: int) -> None:
    """`copies` more videos in `videos_dir`, copies of the first."""
    source = os.path.join(videos_dir, "synth_00000.mp4")
    for k in range(copies):
        shutil.copy(source, os.path.join(videos_dir, f"synth_copy_{k}.mp4"))


@pytest.mark.parametrize("broken", [500, "garbage", "hang"])
def test_an_endpoint_that_never_answers_stops_the_run_at_the_first_video(
        videos_dir, tmp_path, server, broken):
    base_url, script = server
    script.broken = broken
    config = pipeline_config(videos_dir, str(tmp_path / "out"), base_url, timeout_seconds=0.5)
    started = time.monotonic()
    summary = run(config)
    assert time.monotonic() - started < 30
    stopped = summary["run"]["stopped"]
    assert stopped and f"{base_url} is not answering" in stopped
    assert (summary["run"]["finished"], summary["run"]["failed"]) == (0, 1)
    # one video's requests at most (3 clips x 3 tries), never the next videos'
    assert 1 <= len(script.requests) <= CLIPS * (config.retries + 1)
    assert os.listdir(os.path.join(config.out_dir, "done")) == []
    why = failure(summary)
    assert why.startswith("stopped early, 3 of 3 videos left for the next run") and "\n" not in why
    assert "stopped early" in format_summary(summary)


@pytest.mark.parametrize("model", ["", "set"])
def test_nothing_listening_stops_the_run_naming_the_url(videos_dir, tmp_path, model):
    url = closed_port_url()
    config = pipeline_config(videos_dir, str(tmp_path / "out"), url,
                             **{"reasoning.model": model, "caption.model": model})
    summary = run(config)
    assert f"{url} is not answering" in summary["run"]["stopped"]
    assert "ConnectError" in summary["run"]["stopped"]
    assert summary["run"]["finished"] == 0 and summary["run"]["failed"] == (1 if model else 0)


def test_an_endpoint_that_fails_requests_in_a_row_stops_the_run(videos_dir, tmp_path, server):
    base_url, script = server
    more_videos(videos_dir, 3)  # 6 videos, done one at a time
    script.broken, script.broken_from = 500, CLIPS + 2  # the first video's requests succeed
    config = pipeline_config(videos_dir, str(tmp_path / "out"), base_url,
                             stop_after_failed_requests=2)
    summary = run(config)
    # video 2 fails (a clip's request failed; its siblings are cancelled), video 3 as well:
    # two failed requests in a row, so videos 4 to 6 are not started
    assert (summary["run"]["finished"], summary["run"]["failed"]) == (1, 2)
    assert f"{base_url} failed 2 requests in a row, the last: " in summary["run"]["stopped"]
    assert "HTTP 500" in summary["run"]["stopped"]


def test_requests_refused_with_4xx_fail_their_video_only(videos_dir, tmp_path, server):
    base_url, script = server
    script.broken = 400  # this request is refused; the endpoint itself is up
    summary = run(pipeline_config(videos_dir, str(tmp_path / "out"), base_url))
    assert summary["run"]["stopped"] is None
    assert (summary["run"]["finished"], summary["run"]["failed"]) == (0, 3)
    assert failure(summary).startswith("none of the 3 videos finished (3 failed; the first: ")


def test_a_wrong_key_or_url_stops_the_run_at_once(videos_dir, tmp_path, server):
    base_url, script = server
    script.broken = 401
    summary = run(pipeline_config(videos_dir, str(tmp_path / "out"), base_url))
    assert "answers HTTP 401" in summary["run"]["stopped"] and len(script.requests) <= CLIPS


def chat_once(base_url: str, **client_args) -> float:
    """Seconds one chat request to `base_url` took to fail; fails the test if it answered."""
    async def ask():
        client = ChatClient(base_url, "fake-llm", **client_args)
        try:
            with pytest.raises(EndpointError) as error:
                await client.chat([{"role": "user", "content": "hi"}], max_tokens=4,
                                  temperature=0.0)
            return error.value
        finally:
            await client.close()

    started = time.monotonic()
    error = asyncio.run(ask())
    return time.monotonic() - started, str(error)


def test_one_try_is_bounded_from_connect_to_last_byte(server):
    base_url, script = server
    script.broken = "trickle"  # a byte every 0.1 s: httpx's per-read timeout never fires
    seconds, error = chat_once(base_url, timeout_seconds=1.0,
                               policy=RetryPolicy(retries=0, backoff_seconds=0.01))
    assert seconds < 5 and "no answer within 1 s (timeout_seconds)" in error


def test_a_request_with_all_its_tries_is_bounded(server):
    base_url, script = server
    script.broken = "hang"
    seconds, error = chat_once(base_url, timeout_seconds=1.0, request_seconds=2.5,
                               policy=RetryPolicy(retries=10, backoff_seconds=0.01))
    assert seconds < 6 and "no answer within 2.5 s of tries (request_deadline_seconds)" in error


def datagen(videos_dir: str, out_dir: str, base_url: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lvr_jax.datagen", f"--config.videos_dir={videos_dir}",
               f"--config.out_dir={out_dir}", "--config.frames_per_clip=2",
               "--config.frame_size=32", "--config.caption.backend=openai",
               f"--config.caption.base_url={base_url}", f"--config.reasoning.base_url={base_url}",
               "--config.retries=1", "--config.backoff_seconds=0.01", "--config.progress=False"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_entrypoint_exits_1_in_one_line_when_the_endpoint_is_down(videos_dir, tmp_path):
    url = closed_port_url()
    out = datagen(videos_dir, str(tmp_path / "out"), url)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lvr_jax.datagen: error: stopped early, 3 of 3 videos left")
    assert f"{url} is not answering" in last


def test_entrypoint_exits_1_when_no_record_was_generated(tmp_path, server):
    base_url, _ = server
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    out = datagen(str(videos), str(tmp_path / "out"), base_url)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "lvr_jax.datagen: error: no training record was kept: videos by status {'bad_video': 1}")

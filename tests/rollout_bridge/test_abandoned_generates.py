"""Generate requests whose client gave up.

The server does not start queued work of a client that has gone, and stops the
transformers engine between tokens once the client of the running request has gone, so a
later request is not stuck behind abandoned ones. The client does not send a generate
again after a read timeout (it may still be running), retries what was refused before it
was sent, and gives up on a silent server within a bounded time.
"""

import asyncio
import concurrent.futures
import logging
import threading
import time

import httpx2
import pytest
import torch
from aiohttp import web

from rollout_bridge.client import RetryPolicy, RolloutClient, RolloutServerUnavailable
from rollout_bridge.engines import TransformersEngine
from rollout_bridge.server import RolloutServer
from tests.rollout_bridge.servers import serving_in_thread
from rollout_bridge.launch import free_port

SMALL = {"prompts": [{"before": [1, 2]}], "max_tokens": 2, "temperature": 0.0}


class SlowEngine:
    """An engine whose generate takes `seconds` and cannot be stopped (as vLLM's)."""

    name, rejects, dtype, max_model_len, shapes = "slow", (ValueError,), torch.float32, 1024, {}

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0
        self.embed_table = torch.zeros(16, 4)

    def embed(self, ids):
        return torch.zeros(len(ids), 4)

    def generate(self, prompts, s, seed=0, stop=None):
        self.calls += 1
        time.sleep(self.seconds)
        return [[([1], [0.0])] * s.num_samples for _ in prompts]


def abandon(url: str, body: dict, count: int, after_s: float) -> None:
    """`count` generate requests at once, each dropped by its client after `after_s`."""
    def post(_):
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(f"{url}/generate", json=body, timeout=after_s)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(post, range(count)))


def timed_small_request(url: str) -> float:
    start = time.monotonic()
    answer = httpx2.post(f"{url}/generate", json=SMALL, timeout=60)
    assert answer.status_code == 200, answer.text
    return time.monotonic() - start


def test_queued_generates_of_clients_that_left_are_not_started():
    """As measured in the issue: requests dropped after 0.5 s kept the engine busy and a
    small request sent after them waited for all of them."""
    engine = SlowEngine(seconds=1.5)
    with serving_in_thread(RolloutServer(engine).app(1 << 20)) as url:
        abandon(url, {"prompts": [{"before": [3]}]}, count=4, after_s=0.5)
        waited = timed_small_request(url)
    assert engine.calls == 2  # the one running when its client left, then the small one
    assert waited < 5, waited  # not 4 x 1.5 s of abandoned work (7 s)


def test_a_transformers_generate_whose_client_left_stops_between_tokens(model_dir, caplog):
    engine = TransformersEngine(model_dir)
    long = {"prompts": [{"before": [1, 2, 3]}], "n": 16, "max_tokens": 1000}
    with serving_in_thread(RolloutServer(engine).app(1 << 20)) as url:
        with caplog.at_level(logging.WARNING, logger="rollout_bridge.server"):
            abandon(url, long, count=1, after_s=1.0)
            waited = timed_small_request(url)
    assert waited < 15, waited  # 16 x 1000 tokens take minutes on two cores
    assert "stopped between tokens" in caplog.text


class CountingServer:
    """A fake rollout server whose routes count their calls and answer as told."""

    def __init__(self, answer: str):
        self.answer, self.calls = answer, 0

    async def route(self, request):
        self.calls += 1
        if self.answer == "504":
            return web.json_response({"error": "upstream timed out"}, status=504)
        if self.answer == "silent":  # until the client gives up on it
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)
        return web.json_response({"version": 0, "outputs": [], "status": "ok"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.route)
        app.router.add_get("/health", self.route)
        return app


@pytest.mark.parametrize("answer", ["silent", "504"])
def test_a_generate_that_may_still_be_running_is_not_sent_again(answer):
    fake = CountingServer(answer)
    retry = RetryPolicy(timeout_s=0.5, retries=3, backoff_s=0.1, wait_s=5)
    with serving_in_thread(fake.app()) as url:
        client = RolloutClient([url], retry=retry)
        start = time.monotonic()
        with pytest.raises(RolloutServerUnavailable, match="not sent again"):
            client.generate([{"before": [1]}])
        client.close()
    assert fake.calls == 1 and time.monotonic() - start < 2


def test_a_silent_server_is_given_up_on_within_wait_plus_one_timeout():
    """Requests that may be sent again (health) are, but not past wait_s: `retries` is a
    floor only while tries fail fast."""
    fake = CountingServer("silent")
    retry = RetryPolicy(timeout_s=0.5, retries=6, backoff_s=0.1, max_backoff_s=0.2, wait_s=1)
    with serving_in_thread(fake.app()) as url:
        client = RolloutClient([url], retry=retry)
        start = time.monotonic()
        with pytest.raises(RolloutServerUnavailable, match="ReadTimeout"):
            client.health()
        client.close()
    took = time.monotonic() - start
    assert fake.calls >= 2 and took < 2.5, (fake.calls, took)  # 6 tries took 3.9 s


def test_a_generate_refused_before_it_was_sent_is_sent_again():
    """Connection refused: the server was not up yet, nothing runs there."""
    fake, port, up = CountingServer("ok"), free_port(), threading.Event()
    done = threading.Event()

    def serve_later():
        time.sleep(1.0)
        with serving_in_thread(fake.app(), port):
            up.set()
            done.wait(30)

    thread = threading.Thread(target=serve_later)
    thread.start()
    client = RolloutClient([f"http://127.0.0.1:{port}"],
                           retry=RetryPolicy(timeout_s=5, backoff_s=0.2, wait_s=20))
    try:
        assert client.generate([{"before": [1]}])["version"] == 0
    finally:
        done.set()
        thread.join()
        client.close()
    assert up.is_set() and fake.calls == 1

"""What the trainer uses: push weights, upload prompt embeddings, generate; with retries.

    client = RolloutClient(["http://10.0.0.5:8470"], token=os.environ["ROLLOUT_TOKEN"])
    client.push_weights(model, version=1)
    key = client.upload_embeddings(video_embeds_nd)
    client.generate([{"before": ids_a, "embeddings": key, "after": ids_b}], n=8, version=1)

`lvr_jax.rl.engines.ServerEngine` makes a client the learner's rollout engine. A server
that stops answering is waited for (retries with backoff up to `wait_s`), but a generate
that reached it and timed out is not sent again (it may still run there). Weight chunks to
a server on loopback go through shared-memory slots it lends (`rollout_bridge.shm`, which
checks each file before writing), everything else over HTTP. While another client pushes
to a server, a push waits (up to `wait_s`) for it to end.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import httpx2
import numpy as np

from rollout_bridge import shm, wire

log = logging.getLogger("rollout_bridge.client")
Body = Union[bytes, list]  # a chunk: bytes, or buffers sent one after another (no join)
RETRY_STATUS = (502, 503, 504)  # a proxy or a server still starting; a 500 is a bug: raise it
# Why a slot chunk goes over HTTP after all: no file to open here, or one that is no slot
# (shm.SlotRefused), or a lend that makes no sense. A server's 4xx on the chunk is raised.
SLOT_FAILURES = (OSError, ValueError, LookupError, TypeError)
TRANSPORTS = ("auto", "http")  # auto: shared memory where the server is on this host


class RolloutError(RuntimeError):
    """A request the server refused (4xx); `code` is the server's error code."""

    def __init__(self, url: str, status: int, code: str, message: str):
        super().__init__(f"rollout server {url} answered {status} ({code}): {message}")
        self.url, self.status, self.code = url, status, code


class RolloutServerUnavailable(RuntimeError):
    """A server that did not answer within the deadline; the message names its URL."""

    def __init__(self, url: str, waited_s: float, cause: str):
        super().__init__(f"rollout server {url} did not answer for {waited_s:.0f} s ({cause})")
        self.url = url


@dataclasses.dataclass
class RetryPolicy:
    """Per request: `timeout_s`; on failure back off from `backoff_s` (doubling, capped at
    `max_backoff_s`) until `wait_s` have passed, at least `retries` tries where they fail
    sooner; no try starts after `wait_s` + `max_backoff_s`, so a request ends within that
    + `timeout_s`."""

    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    wait_s: float = 300.0


class RolloutClient:
    """Talks to one or more rollout servers; generate requests are spread across them."""

    def __init__(self, urls: Sequence[str], token: Optional[str] = None,
                 retry: RetryPolicy = RetryPolicy(), chunk_bytes: int = 64 << 20,
                 dtype: Optional[str] = None, upload_threads: int = 4, transport: str = "auto"):
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL (config.rl.rollout.urls)")
        if transport not in TRANSPORTS:
            raise ValueError(f"weight transport {transport!r} is not one of {TRANSPORTS}")
        self.transport, self.slot_maps = transport, shm.SlotMaps()
        self.urls = [u.rstrip("/") for u in urls]
        self.retry, self.chunk_bytes, self.dtype = retry, chunk_bytes, dtype
        self.upload_threads = upload_threads
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx2.Client(headers=headers, timeout=retry.timeout_s)
        self.known_keys: dict[str, set[str]] = {u: set() for u in self.urls}

    # ---- transport ---------------------------------------------------------------------
    def request(self, url: str, method: str, path: str, *, resend: bool = True,
                **kwargs) -> httpx2.Response:
        """One request with retries; errors raise RolloutError, silence RolloutServerUnavailable.
        A request the server got but did not answer in time (read timeout, 504) is sent again
        only with `resend`: without, the server may still be working on it."""
        start, delay, tries = time.monotonic(), self.retry.backoff_s, 0
        while True:
            tries += 1
            try:
                response = self.http.request(method, url + path, **kwargs)
                if response.status_code not in RETRY_STATUS:
                    return _checked(url, response)
                cause = f"HTTP {response.status_code}: {response.text[:200]}"
                running = response.status_code == 504
            except httpx2.TransportError as e:
                cause = f"{type(e).__name__}: {e}"
                # Refused, or lost with the server (a restart): nothing of it runs there.
                # A read timeout leaves a live server working on it.
                running = isinstance(e, httpx2.ReadTimeout)
            waited = time.monotonic() - start
            if running and not resend:
                raise RolloutServerUnavailable(url, waited, f"{cause}; not sent again: the "
                                               "server may still be working on it")
            if waited + delay > self.retry.wait_s and (tries >= self.retry.retries
                                                       or waited >= self.retry.wait_s):
                raise RolloutServerUnavailable(url, waited, cause)
            log.warning("rollout server %s: %s; retrying in %.1f s", url, cause, delay)
            time.sleep(delay)
            delay = min(2 * delay, self.retry.max_backoff_s)

    def health(self, url: Optional[str] = None) -> dict:
        return self.request(url or self.urls[0], "GET", "/health").json()

    # ---- weights -----------------------------------------------------------------------
    def push_weights(self, model, version: int, urls: Optional[Sequence[str]] = None,
                     replace: bool = False) -> int:
        """Exports the LLM of `model` and pushes it to every server (or `urls`) as `version`;
        the next chunk is exported while `upload_threads` earlier ones upload."""
        from rollout_bridge.export import iter_weight_chunks
        chunks = lambda: iter_weight_chunks(model, self.chunk_bytes, dtype=self.dtype)  # noqa: E731
        for url in urls or self.urls:
            self.push_chunks(url, chunks, version, threads=self.upload_threads, replace=replace)
        return version

    def push_chunks(self, url: str, chunks: Callable[[], Iterable[Body]], version: int,
                    threads: int = 1, replace: bool = False) -> None:
        """One push (begin, chunks, commit); restarted if the server restarts mid-push.
        A body is bytes or a list of buffers; `threads` > 1 uploads that many at once.
        `replace` drops another client's push in progress (a restarted trainer's
        predecessor); without, this push waits for that one to end."""
        for attempt in range(3):
            try:
                begun = self._begin(url, replace)
                push_id, shared = begun["push_id"], begun.get("shm")
                slots = (self.transport == "auto" and isinstance(shared, dict)
                         and wire.is_loopback_url(url))
                upload_all(self._chunk_sender(url, push_id, shared if slots else None),
                           chunks(), threads)
                self.request(url, "POST", f"/weights/{push_id}/commit", json={"version": version})
                return
            except RolloutError as e:
                if e.code != "unknown_push" or attempt == 2:
                    raise
                log.warning("push to %s was interrupted (%s); pushing again", url, e)

    def _begin(self, url: str, replace: bool) -> dict:
        """POST /weights; while another client's push is in progress there (409
        push_in_progress), backs off and asks again for up to `wait_s`."""
        start, delay = time.monotonic(), self.retry.backoff_s
        while True:
            try:
                return self.request(url, "POST", "/weights", json={"replace": replace}).json()
            except RolloutError as e:
                if e.code != "push_in_progress" or time.monotonic() - start + delay > \
                        self.retry.wait_s:
                    raise
                log.warning("%s; asking again in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(2 * delay, self.retry.max_backoff_s)

    def _chunk_sender(self, url: str, push_id: str,
                      shared: Optional[dict]) -> Callable[[Body], None]:
        """send(body) for one push: into a shared-memory slot while the server lends them
        (`shared`: its slot directory and uid; None: a server not on loopback, or HTTP asked)
        and they check out as its slots, else as the body of a PUT (a chunk over the
        server's slot budget: that one alone)."""
        def put(body: Body) -> None:
            self.request(url, "PUT", f"/weights/{push_id}", content=body, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(body_size(body))})

        def send(body: Body) -> None:
            nonlocal shared
            if shared is not None:
                try:
                    return self._send_through_slot(url, push_id, body, shared)
                except RolloutError as e:
                    if e.code not in ("too_large", "shm_unavailable"):
                        raise
                    shared = shared if e.code == "too_large" else None
                    log.info("%s: %s", url, e)
                except SLOT_FAILURES as e:
                    shared = None
                    log.warning("%s lends shared memory this host cannot open or will not "
                                "write (%s): this push goes over HTTP", url, e)
            put(body)
        return send

    def _send_through_slot(self, url: str, push_id: str, body: Body, shared: dict) -> None:
        nbytes = body_size(body)
        room = max(nbytes, self.chunk_bytes) + shm.SLACK  # any chunk fits any slot
        lent = self.request(url, "POST", f"/weights/{push_id}/slots", json={"bytes": room}).json()
        if not nbytes <= lent["capacity"]:
            raise shm.SlotRefused(f"slot {lent['slot']} of {lent['capacity']} bytes is lent "
                                  f"for a chunk of {nbytes}")
        self.slot_maps.write(lent["path"], lent["capacity"],
                             body if isinstance(body, list) else [body],
                             directory=shared["dir"], owner=shared["uid"])
        self.request(url, "POST", f"/weights/{push_id}/slots/{lent['slot']}",
                     json={"bytes": nbytes, "lend": lent["lend"]})

    # ---- embeddings --------------------------------------------------------------------
    def upload_embeddings(self, embeds_nd: np.ndarray, url: Optional[str] = None) -> str:
        """Stores [N, D] embeddings on the server(s) under their content key; skips known ones."""
        body = wire.embeds_body(np.asarray(embeds_nd))
        key = wire.content_key(body)
        for u in [url] if url else self.urls:
            if key in self.known_keys[u]:
                continue
            try:
                self.request(u, "HEAD", f"/embeddings/{key}")
            except RolloutError:  # 404: not there yet
                self.request(u, "PUT", f"/embeddings/{key}", content=body,
                             headers={"Content-Type": "application/octet-stream"})
            self.known_keys[u].add(key)
        return key

    def forget_embeddings(self, url: str) -> None:
        """After a restart or eviction: check with the server again before trusting a key."""
        self.known_keys[url].clear()

    # ---- generation --------------------------------------------------------------------
    def generate(self, prompts: list[dict], *, url: Optional[str] = None, n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_tokens: int = 64, stop_token_ids: Sequence[int] = (), seed: int = 0,
                 version: Optional[int] = None) -> dict:
        """{"version", "outputs": per prompt, n of {"token_ids", "logprobs"}} from one server."""
        body = {"prompts": prompts, "n": n, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "max_tokens": max_tokens, "stop_token_ids": list(stop_token_ids),
                "seed": seed, "version": version}
        return self.request(url or self.urls[0], "POST", "/generate", json=body,
                            resend=False).json()

    def close(self) -> None:
        self.http.close()
        self.slot_maps.close()


def body_size(body: Body) -> int:
    return len(body) if isinstance(body, bytes) else sum(memoryview(b).nbytes for b in body)


def upload_all(put: Callable[[Body], object], bodies: Iterable[Body], threads: int) -> None:
    """put(body) for every body, `threads` at a time while the next bodies are made (at most
    threads + 1 exist at once). After a failure the uploads in flight finish; the error
    raised is the first that is not `unknown_push` (the server drops a push on a bad chunk,
    so the chunks after it only report that)."""
    if threads <= 1:
        for body in bodies:
            put(body)
        return
    with concurrent.futures.ThreadPoolExecutor(threads, "weight-upload") as pool:
        pending: list[concurrent.futures.Future] = []
        for body in bodies:
            pending.append(pool.submit(put, body))
            if len(pending) > threads:
                done, running = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                if any(f.exception() for f in done):
                    break
                pending = list(running)
        concurrent.futures.wait(pending)
    errors = [f.exception() for f in pending if f.exception()]
    if errors:
        raise next((e for e in errors if not (isinstance(e, RolloutError)
                                             and e.code == "unknown_push")), errors[0])


def _checked(url: str, response: httpx2.Response) -> httpx2.Response:
    if response.status_code < 400:
        return response
    try:
        info = response.json()
    except ValueError:
        info = {}
    raise RolloutError(url, response.status_code, info.get("code", "http_error"),
                       info.get("error", response.text[:500] or response.reason_phrase))

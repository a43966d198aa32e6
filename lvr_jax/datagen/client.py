"""An async client for OpenAI-compatible chat endpoints (vLLM, OpenAI, the rollout server).

Requests share one semaphore (the concurrency limit); transport errors, timeouts, 408,
409, 429 and 5xx answers and bodies that are no chat completion are retried with exponential
back-off and jitter; other HTTP errors fail at once. What is left after the retries is an
`EndpointError` naming the URL. Time is bounded twice: each try by `timeout_seconds` from
connecting to the last byte, each request with its retries and back-offs by
`request_seconds`. An endpoint that never answered and fails a request, that fails
`stop_after` requests in a row, or that answers 401/403/404 is *down*: every later request
raises `EndpointDown` at once, and the pipeline stops the run.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os
import random
from typing import Any, Awaitable, Callable, TypeVar

import httpx2
import numpy as np
from PIL import Image

T = TypeVar("T")
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_MAX_BACKOFF = 60.0


class EndpointError(RuntimeError):
    """An endpoint that kept failing (or refused the request); the message names it."""


class EndpointDown(EndpointError):
    """An endpoint judged dead (not answering, failing request after request, refusing the
    key or the URL): retrying it for every video would only cost time."""


class RequestRefused(EndpointError):
    """The endpoint answered this request with a 4xx that no retry changes (too long, say):
    the request failed, the endpoint is not down."""


class RetryableError(RuntimeError):
    """A failure worth another try (raised inside `with_retries`)."""


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """The first choice of a chat completion."""

    text: str
    finish_reason: str | None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries after the first try, and the first back-off in seconds (doubled each time)."""

    retries: int = 3
    backoff_seconds: float = 1.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Back-off before retry number `attempt` (0-based): exponential, jittered, capped."""
        return min(_MAX_BACKOFF, self.backoff_seconds * 2**attempt) * rng.uniform(0.5, 1.0)


async def with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str,
                       rng: random.Random | None = None,
                       down: Callable[[], EndpointDown | None] = lambda: None) -> T:
    """Awaits `call()`, retrying RetryableError; EndpointError(what + last error) when out of
    tries; `down()`'s error as soon as it returns one (another request found the endpoint dead)."""
    rng = rng or random.Random()
    for attempt in range(policy.retries + 1):
        if dead := down():
            raise dead
        try:
            return await call()
        except RetryableError as error:
            last = error
            if attempt < policy.retries:
                await asyncio.sleep(policy.delay(attempt, rng))
    raise EndpointError(f"{what} failed after {policy.retries + 1} tries: {last}")


def image_part(frame_hw3: np.ndarray, quality: int = 90) -> dict[str, Any]:
    """A uint8 RGB frame as an OpenAI `image_url` content part (base64 JPEG data URL)."""
    buffer = io.BytesIO()
    Image.fromarray(frame_hw3).save(buffer, format="JPEG", quality=quality)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}


def _one_line(text: str, limit: int) -> str:
    """`text` cut to `limit` characters on one line (bodies may be HTML or tracebacks)."""
    return " ".join(text.split())[:limit]


def _reply_of(body: Any, url: str) -> ChatReply:
    try:
        choice = body["choices"][0]
        return ChatReply(choice["message"].get("content") or "", choice.get("finish_reason"))
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableError(f"{url} answered without choices[0].message: "
                             f"{_one_line(str(body), 200)}")


_DEAD_STATUS = frozenset({401, 403, 404})  # a wrong key or URL: every request would get it


class ChatClient:
    """POSTs chat completions to `{base_url}/chat/completions` under a concurrency limit, and
    notices when the endpoint is down (see the module docstring)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "",
                 concurrency: int = 4, timeout_seconds: float = 300.0,
                 policy: RetryPolicy = RetryPolicy(), request_seconds: float = 600.0,
                 stop_after: int = 3):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.policy = model, policy
        self.timeout_seconds, self.request_seconds = timeout_seconds, request_seconds
        self.stop_after = max(1, stop_after)
        self.answered, self.failures = False, 0  # ever answered; failed requests in a row
        self.down: EndpointDown | None = None
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx2.AsyncClient(timeout=timeout_seconds, headers=headers,
                                        trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, **kwargs) -> httpx2.Response:
        """One HTTP exchange, the whole of it within timeout_seconds (httpx's own timeout
        bounds each read, so a server that trickles bytes would never time out)."""
        try:
            return await asyncio.wait_for(self._http.request(method, url, **kwargs),
                                          self.timeout_seconds)
        except asyncio.TimeoutError:
            raise RetryableError(f"no answer within {self.timeout_seconds:g} s "
                                 "(timeout_seconds)") from None
        except httpx2.TransportError as error:  # timeouts, refused connections, resets
            raise RetryableError(f"{type(error).__name__}: {error}") from error

    def _check_status(self, response: httpx2.Response) -> None:
        status, text = response.status_code, response.text
        if status in _RETRY_STATUS:
            raise RetryableError(f"HTTP {status}: {_one_line(text, 200)}")
        if status in _DEAD_STATUS:
            raise EndpointDown(f"{response.request.url} answers HTTP {status} "
                               f"({_one_line(text, 200)}); check base_url, api_key_env and "
                               "model")
        if status >= 400:
            raise RequestRefused(f"{self.url} refused the request with HTTP {status}: "
                                 f"{_one_line(text, 500)}")

    async def _post_once(self, payload: dict[str, Any]) -> ChatReply:
        response = await self._send("POST", self.url, json=payload)
        self._check_status(response)
        try:
            body = response.json()
        except ValueError:
            raise RetryableError(f"non-JSON body: {_one_line(response.text, 200)!r}") from None
        return _reply_of(body, self.url)

    async def _request(self, call: Callable[[], Awaitable[T]], what: str,
                       chat: bool = True) -> T:
        """`call()` with its retries in one concurrency slot, within request_seconds; its
        outcome tells whether the endpoint is down (only a chat reply shows it is up: a
        server may list its models and fail every completion)."""
        async with self._semaphore:
            try:
                result = await asyncio.wait_for(
                    with_retries(call, self.policy, what, down=lambda: self.down),
                    self.request_seconds)
            except asyncio.TimeoutError:
                raise self._failed(EndpointError(
                    f"{what}: no answer within {self.request_seconds:g} s of tries "
                    "(request_deadline_seconds)")) from None
            except EndpointDown as error:
                self.down = self.down or error
                raise self.down from None
            except RequestRefused:
                raise
            except EndpointError as error:  # out of tries
                raise self._failed(error) from None
        if chat:
            self.answered, self.failures = True, 0
        return result

    def _failed(self, error: EndpointError) -> EndpointError:
        """The error to raise for a request that failed: EndpointDown when it shows the
        endpoint is down (it never answered, or failed `stop_after` requests in a row)."""
        self.failures += 1
        if self.answered and self.failures < self.stop_after:
            return error
        if not self.answered:
            why = f"{self.base_url} is not answering: {error}"
        else:
            why = f"{self.base_url} failed {self.failures} requests in a row, the last: {error}"
        self.down = self.down or EndpointDown(why)
        return self.down

    async def first_model(self) -> str:
        """The id of the first model the endpoint lists at GET {base_url}/models."""
        url = self.base_url + "/models"

        async def get() -> str:
            response = await self._send("GET", url)
            self._check_status(response)
            try:
                return response.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                raise RetryableError(f"no model list: {type(error).__name__}: {error}") from error

        return await self._request(get, f"listing models at {url} (or set the model)",
                                   chat=False)

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int,
                   temperature: float, **extra: Any) -> ChatReply:
        """One completion of `messages`, retried on transient failures."""
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature, **extra}
        return await self._request(lambda: self._post_once(payload),
                                   f"chat request to {self.url}")

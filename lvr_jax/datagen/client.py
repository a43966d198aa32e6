"""An async client for OpenAI-compatible chat endpoints (vLLM, OpenAI, the rollout server).

Requests share one semaphore (the concurrency limit); transport errors, timeouts, 408,
409, 429 and 5xx answers are retried with exponential back-off and jitter; other HTTP
errors fail at once. What is left after the retries is an `EndpointError` naming the URL.
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
                       rng: random.Random | None = None) -> T:
    """Awaits `call()`, retrying RetryableError; EndpointError(what + last error) when out of tries."""
    rng = rng or random.Random()
    for attempt in range(policy.retries + 1):
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


def _reply_of(body: Any, url: str) -> ChatReply:
    try:
        choice = body["choices"][0]
        return ChatReply(choice["message"].get("content") or "", choice.get("finish_reason"))
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableError(f"{url} answered without choices[0].message: {str(body)[:200]}")


class ChatClient:
    """POSTs chat completions to `{base_url}/chat/completions` under a concurrency limit."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "",
                 concurrency: int = 4, timeout_seconds: float = 300.0,
                 policy: RetryPolicy = RetryPolicy()):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.policy = model, policy
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx2.AsyncClient(timeout=timeout_seconds, headers=headers,
                                        trust_env=False)

    async def close(self) -> None:
        await self._http.aclose()

    async def _post_once(self, payload: dict[str, Any]) -> ChatReply:
        try:
            async with self._semaphore:
                response = await self._http.post(self.url, json=payload)
        except httpx2.TransportError as error:  # timeouts, refused connections, resets
            raise RetryableError(f"{type(error).__name__}: {error}") from error
        if response.status_code in _RETRY_STATUS:
            raise RetryableError(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise EndpointError(f"{self.url} refused the request with HTTP "
                                f"{response.status_code}: {response.text[:500]}")
        try:
            body = response.json()
        except ValueError:
            raise RetryableError(f"non-JSON body: {response.text[:200]!r}") from None
        return _reply_of(body, self.url)

    async def first_model(self) -> str:
        """The id of the first model the endpoint lists at GET {base_url}/models."""
        url = self.url.removesuffix("/chat/completions") + "/models"

        async def get() -> str:
            try:
                response = await self._http.get(url)
                response.raise_for_status()
                return response.json()["data"][0]["id"]
            except (httpx2.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
                raise RetryableError(f"{type(error).__name__}: {error}") from error

        return await with_retries(get, self.policy, f"listing models at {url} (or set the model)")

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int,
                   temperature: float, **extra: Any) -> ChatReply:
        """One completion of `messages`, retried on transient failures."""
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature, **extra}
        return await with_retries(lambda: self._post_once(payload), self.policy,
                                  f"chat request to {self.url}")

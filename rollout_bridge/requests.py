"""Validation of generate requests: every bad field becomes a 4xx naming the field."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from lvr_jax.sampling import SamplingParams

_KEY = re.compile(r"^[0-9a-f]{64}$")
GENERATE_FIELDS = ("prompts", "n", "temperature", "top_p", "top_k", "max_tokens",
                   "stop_token_ids", "seed", "version")
PROMPT_FIELDS = ("before", "embeddings", "after")
# 0 is greedy. Tiny temperatures overflow logits / T (1e-300 gives inf, then NaN
# probabilities); vLLM raises anything below 0.01 to 0.01 and refuses above 2, so both
# engines serve the same range.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids before the video, the video's embeddings key (or None), token ids after."""

    before: list[int]
    embeddings: Optional[str]
    after: list[int]


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    prompts: list[Prompt]
    sampling: SamplingParams
    seed: int
    version: Optional[int]  # the weight version the caller expects, if it cares


class BadRequest(Exception):
    """A 4xx answer: the server sends {"error": message, "code": code} with `status`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(message: str) -> BadRequest:
    return BadRequest(400, "bad_request", message)


def _known_fields(body: dict, allowed: tuple[str, ...], where: str) -> None:
    """BadRequest naming the first field not in `allowed` (a misspelt one is never ignored)."""
    unknown = [name for name in body if name not in allowed]
    if unknown:
        raise _bad(f"{where} has unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _is_token_id(value, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


def _ids(value, field: str, vocab: int) -> list[int]:
    if not isinstance(value, list) or not all(_is_token_id(i, vocab) for i in value):
        raise _bad(f"{field} must be a list of token ids (integers, not booleans) in "
                   f"[0, {vocab})")
    return value


def _prompt(raw, i: int, vocab: int) -> Prompt:
    if not isinstance(raw, dict):
        raise _bad(f"prompts[{i}] must be an object with before/embeddings/after")
    _known_fields(raw, PROMPT_FIELDS, f"prompts[{i}]")
    key = raw.get("embeddings")
    if key is not None and (not isinstance(key, str) or not _KEY.match(key)):
        raise _bad(f"prompts[{i}].embeddings must be a sha256 hex key from PUT /embeddings")
    prompt = Prompt(_ids(raw.get("before", []), f"prompts[{i}].before", vocab), key,
                    _ids(raw.get("after", []), f"prompts[{i}].after", vocab))
    if not prompt.before and key is None and not prompt.after:
        raise _bad(f"prompts[{i}] is empty")
    return prompt


def _number(body: dict, name: str, kind, default, low, high):
    value = body.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{name} must be a {kind.__name__} in [{low}, {high}], got {value!r}")
    return value


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _temperature(body: dict) -> float:
    value = body.get("temperature", 1.0)
    if _is_real(value) and (value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        return float(value)
    raise _bad(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
               f"got {value!r} (smaller ones overflow logits / temperature; 0 is greedy)")


def _top_p(body: dict) -> float:
    value = body.get("top_p", 1.0)
    if _is_real(value) and 0 < value <= 1:
        return float(value)
    raise _bad(f"top_p must be a float in (0, 1], got {value!r}")


def parse_generate(body: dict, server) -> GenerateJob:
    """A GenerateJob, or BadRequest naming the first bad field."""
    _known_fields(body, GENERATE_FIELDS, "the generate request")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise _bad("prompts must be a non-empty list")
    stops = _ids(body.get("stop_token_ids", []), "stop_token_ids", server.vocab)
    sampling = SamplingParams(
        num_samples=_number(body, "n", int, 1, 1, server.max_n),
        temperature=_temperature(body), top_p=_top_p(body),
        top_k=_number(body, "top_k", int, 0, 0, server.vocab),
        max_new_tokens=_number(body, "max_tokens", int, 64, 1, server.max_new_tokens),
        stop_token_ids=tuple(stops))
    seed = _number(body, "seed", int, 0, 0, 2**63 - 1)
    version = body.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise _bad("version must be an int (the weight version the caller expects)")
    return GenerateJob([_prompt(p, i, server.vocab) for i, p in enumerate(prompts)],
                       sampling, seed, version)

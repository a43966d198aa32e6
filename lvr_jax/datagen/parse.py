"""Parsing and filtering the reasoning LLM's replies: pure functions of text and dicts.

A reply must be one JSON object `{"questions": [...]}` (code fences and a leading
`<think>...</think>` block are tolerated). A reply that cannot be read raises `ReplyError`
with a reason; each item is then validated on its own and either kept as a `Question` or
rejected as a `Rejection` with a reason from `REASONS`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

from lvr_jax.data.schema import CATEGORIES, LETTERS, RecordError, category_name

# Reasons a whole reply is unusable (retried, then the video is skipped and counted).
REPLY_REASONS = ("empty_reply", "bad_json", "truncated_reply", "wrong_shape")
# Reasons one question is dropped.
REASONS = ("not_an_object", "missing_field", "unknown_category", "empty_question",
           "not_four_options", "duplicate_options", "bad_answer_letter", "empty_reasoning",
           "reserved_tag", "duplicate_question", "over_target")
_FIELDS = ("category", "question", "options", "reasoning", "answer")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_OPTION_LABEL = re.compile(r"^\s*\(?([A-Da-d])[.):]\s+")
_SPACES = re.compile(r"\s+")
# Tags of the training answer format: inside a question or reasoning they would break it.
_RESERVED_TAG = re.compile(r"</?(think|answer)>", re.IGNORECASE)


class ReplyError(ValueError):
    """A reply that is not the JSON object asked for; `reason` is one of REPLY_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Question:
    """One validated question with its chain of thought."""

    category: str  # one of CATEGORIES
    question: str
    options: tuple[str, str, str, str]
    reasoning: str
    answer: str  # "A" .. "D"


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A dropped item (or a whole reply) and why."""

    reason: str
    detail: str
    item: Any = None


def _strip_wrappers(text: str) -> str:
    """The reply without <think> blocks and, when fenced, the inside of its first code fence."""
    text = _THINK_BLOCK.sub("", text).strip()
    if text.startswith("<think>"):  # thinking that never closed: the JSON never came
        raise ReplyError("truncated_reply", "reply is an unfinished <think> block")
    fenced = _FENCE.search(text)
    if fenced:
        return fenced.group(1).strip()
    return re.sub(r"^```(?:json|JSON)?\s*", "", text)  # an opened fence the reply never closed


def _looks_truncated(text: str) -> bool:
    """True when brackets/quotes are left open: the model stopped mid-object."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return depth > 0 or in_string


def extract_json(text: str, finish_reason: str | None = None) -> Any:
    """The first JSON object in a reply; ReplyError(empty/bad_json/truncated_reply) otherwise."""
    if not text or not text.strip():
        raise ReplyError("empty_reply", "reply holds no text")
    body = _strip_wrappers(text)
    start = body.find("{")
    if start < 0:
        raise ReplyError("bad_json", f"no JSON object in reply starting {text[:80]!r}")
    try:
        # strict=False: raw newlines/control characters inside strings are common in LLM output
        value, _ = json.JSONDecoder(strict=False).raw_decode(body[start:])
    except json.JSONDecodeError as error:
        if finish_reason == "length" or _looks_truncated(body[start:]):
            raise ReplyError("truncated_reply", f"JSON ends early ({error.msg}; "
                                                f"finish_reason={finish_reason})") from None
        raise ReplyError("bad_json", f"{error.msg} at char {error.pos} of the JSON") from None
    return value


def parse_reply(text: str, finish_reason: str | None = None) -> list[Any]:
    """The raw items of a reply `{"questions": [...]}`; ReplyError when it has another shape."""
    value = extract_json(text, finish_reason)
    if not isinstance(value, dict) or not isinstance(value.get("questions"), list):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ReplyError("wrong_shape", f"expected {{\"questions\": [...]}}, got {keys}")
    return value["questions"]


def _strip_labels(options: Sequence[str]) -> list[str]:
    """Drops 'A. ' .. 'D. ' prefixes when all four options carry their own letter in order."""
    labels = [_OPTION_LABEL.match(option) for option in options]
    if all(m and m.group(1).upper() == letter for m, letter in zip(labels, LETTERS)):
        return [option[m.end():] for option, m in zip(options, labels)]
    return list(options)


def normalized(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the key for duplicate checks."""
    return _SPACES.sub(" ", text).strip().lower().rstrip(" .?!")


def _answer_letter(value: Any) -> str | None:
    """'A', 'a', '(A)', 'A.' or 'A. text' -> 'A'; None for anything else."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"\s*\(?([A-Da-d])\)?(?:[.):]\s*.*)?\s*", value, re.DOTALL)
    return match.group(1).upper() if match else None


def validate_item(item: Any) -> Question | Rejection:
    """One raw item -> Question, or Rejection naming the first problem found."""
    if not isinstance(item, dict):
        return Rejection("not_an_object", f"item is a {type(item).__name__}", item)
    missing = [f for f in _FIELDS if f not in item or item[f] is None]
    if missing:
        return Rejection("missing_field", f"missing {', '.join(missing)}", item)
    try:
        category = category_name(item["category"], "item")
    except RecordError:
        return Rejection("unknown_category", f"category {item['category']!r} is not one of "
                                             f"{list(CATEGORIES)}", item)
    question, reasoning = item["question"], item["reasoning"]
    if not isinstance(question, str) or not question.strip():
        return Rejection("empty_question", "question is empty", item)
    options = item["options"]
    if (not isinstance(options, list) or len(options) != 4
            or not all(isinstance(o, str) and o.strip() for o in options)):
        count = len(options) if isinstance(options, list) else type(options).__name__
        return Rejection("not_four_options", f"options must be 4 non-empty strings, got {count}",
                         item)
    options = [o.strip() for o in _strip_labels(options)]
    if len({normalized(o) for o in options}) < 4:
        return Rejection("duplicate_options", f"options repeat: {options}", item)
    letter = _answer_letter(item["answer"])
    if letter is None:
        return Rejection("bad_answer_letter", f"answer {item['answer']!r} is not A, B, C or D",
                         item)
    if not isinstance(reasoning, str) or not reasoning.strip():
        return Rejection("empty_reasoning", "reasoning is empty", item)
    tagged = [text for text in (question, reasoning, *options) if _RESERVED_TAG.search(text)]
    if tagged:
        return Rejection("reserved_tag", f"<think>/<answer> tag inside {tagged[0][:80]!r}", item)
    return Question(category, question.strip(), tuple(options), reasoning.strip(), letter)


def category_quotas(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Shares `total` questions out by category weights (largest remainder), keyed by name."""
    by_name = {category_name(key, "category_targets"): float(w) for key, w in weights.items()}
    weight_sum = sum(by_name.values())
    if weight_sum <= 0 or any(w < 0 for w in by_name.values()):
        raise ValueError(f"category_targets {dict(weights)} must be >= 0 with a positive sum")
    exact = {name: total * w / weight_sum for name, w in by_name.items()}
    quotas = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(exact, key=lambda n: (quotas[n] - exact[n], CATEGORIES.index(n)))
    for name in by_remainder[:total - sum(quotas.values())]:
        quotas[name] += 1
    return {name: quotas.get(name, 0) for name in CATEGORIES}


def filter_items(items: Sequence[Any], quotas: Mapping[str, int] | None = None
                 ) -> tuple[list[Question], list[Rejection]]:
    """Validates items in order; drops repeats of a question and those past a category's quota."""
    kept, rejected, seen = [], [], set()
    counts = dict.fromkeys(CATEGORIES, 0)
    for item in items:
        result = validate_item(item)
        if isinstance(result, Question):
            key = normalized(result.question)
            if key in seen:
                result = Rejection("duplicate_question", f"question repeats: {result.question!r}",
                                   item)
            elif quotas is not None and counts[result.category] >= quotas.get(result.category, 0):
                result = Rejection("over_target", f"more {result.category} questions than the "
                                                  f"{quotas.get(result.category, 0)} asked", item)
            else:
                seen.add(key)
                counts[result.category] += 1
        (kept if isinstance(result, Question) else rejected).append(result)
    return kept, rejected

"""Rule-based rewards of REFERENCE.md §4: format, accuracy (library grader), overlong shaping.

Pure functions of response texts; `weigh` is the one place that weighs accuracy and format.
"""

from __future__ import annotations

import re

import numpy as np

from mathruler.grader import grade_answer

from lvr_jax.data.schema import answer_text

_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(text: str) -> float:
    """1.0 if the whole response is `<think>...</think> <answer>...</answer>`, else 0.0."""
    return 1.0 if _FORMAT.fullmatch(text.strip()) else 0.0


def accuracy_reward(text: str, answer: str) -> float:
    """1.0 if the answer inside <answer> (or the whole text) grades equal to the truth."""
    predicted = answer_text(text)
    return 1.0 if predicted and grade_answer(predicted, answer_text(answer)) else 0.0


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft length penalty: 0 up to max - buffer, then linear down to -1 at max."""
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return (max_length - buffer - length) / buffer
    return -1.0


def weigh(accuracy, fmt, format_weight: float = 0.1):
    """(1 - w) * accuracy + w * format: 0.9 / 0.1 as in LongVILA-R1 (floats or arrays)."""
    return (1.0 - format_weight) * accuracy + format_weight * fmt


def score(text: str, answer: str, format_weight: float = 0.1) -> float:
    """The reward of one response."""
    return weigh(accuracy_reward(text, answer), format_reward(text), format_weight)


def score_responses(texts, answers, lengths, *, format_weight: float = 0.1,
                    max_length: int = 0, overlong_buffer: int = 0) -> dict[str, np.ndarray]:
    """Reward parts per response: accuracy, format and `score` (the reward, with DAPO's
    overlong penalty when `overlong_buffer` > 0)."""
    acc = np.array([accuracy_reward(t, a) for t, a in zip(texts, answers)])
    fmt = np.array([format_reward(t) for t in texts])
    reward = weigh(acc, fmt, format_weight)
    if overlong_buffer > 0:
        reward = reward + np.array([overlong_penalty(int(n), max_length, overlong_buffer)
                                    for n in lengths])
    return {"score": reward, "accuracy": acc, "format": fmt}

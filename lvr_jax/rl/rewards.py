"""Rule-based rewards of REFERENCE.md §4: format, accuracy (library grader), overlong shaping.

Pure functions of a response text; `score` is the one place that weighs them.
"""

from __future__ import annotations

import re

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


def score(text: str, answer: str, format_weight: float = 0.1) -> float:
    """(1 - w) * accuracy + w * format: 0.9 / 0.1 as in LongVILA-R1."""
    return (1.0 - format_weight) * accuracy_reward(text, answer) + format_weight * format_reward(text)

"""How an evaluation decides that an answer is right: one scorer per name, chosen by `eval.scorer`.

- "math" (default): the accuracy reward of training (`rl.rewards.accuracy_reward`): the last
  `<answer>` span with all whitespace removed, graded by mathruler (case-insensitive letters,
  numeric equivalence).
- "official": the scorer of the LongVideo-Reason-eval script (NVlabs/Long-RL `eval/eval.py`),
  for numbers comparable with the paper's 72.0: the first one-line `<answer>` span, stripped,
  equal character for character to the ground truth; the whole completion when there is no
  such span.

The script first tries math_verify on the whole completion; with a letter ground truth
(`<answer>B</answer>`) math_verify extracts nothing from the truth, so that step never
credits an answer on this benchmark and only the string comparison decides.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from lvr_jax.config import ConfigError
from lvr_jax.data.schema import answer_text
from lvr_jax.rl.rewards import accuracy_reward

# No DOTALL, as the script: an <answer> span holding a line break is no span.
_TAG = re.compile(r"<answer>(.*?)</answer>")
_FINAL_PHRASE = "Therefore the final answer is:"
_FINAL_TAG = re.compile(r"<answer>Therefore the final answer is: (.*?)</answer>")


def official_answer(text: str) -> str:
    """The model's answer as the official script reads it: the first one-line <answer> span
    (after "Therefore the final answer is: " when the text holds that phrase), stripped; else
    the whole text, stripped."""
    found = (_FINAL_TAG if _FINAL_PHRASE in text else _TAG).search(text)
    return (found.group(1) if found else text).strip()


def official_truth(answer: str) -> str:
    """The ground truth as the official script reads it: its first <answer> span, or all of it."""
    found = _TAG.search(answer)
    return (found.group(1) if found else answer).strip()


def official_correct(text: str, answer: str) -> bool:
    """Plain string equality of the two: case, inner spaces and punctuation all count."""
    return official_answer(text) == official_truth(answer)


def math_answer(text: str) -> str:
    """The model's answer as the accuracy reward reads it, upper-cased to compare with letters."""
    return answer_text(text).upper()


def math_correct(text: str, answer: str) -> bool:
    """The accuracy reward of training, as a boolean."""
    return accuracy_reward(text, answer) == 1.0


@dataclasses.dataclass(frozen=True)
class Scorer:
    name: str
    about: str  # one line for table titles (Markdown): what is compared and how
    extract: Callable[[str], str]  # the model's answer, reported as `parsed`
    correct: Callable[[str, str], bool]  # (completion, ground truth) -> right or wrong


SCORERS = {
    "math": Scorer("math", "`<answer>` span without whitespace, graded by mathruler",
                   math_answer, math_correct),
    "official": Scorer("official", "LongVideo-Reason-eval: `<answer>` span == truth, "
                       "plain string equality", official_answer, official_correct),
}
DEFAULT_SCORER = "math"


def get_scorer(name: str) -> Scorer:
    """The scorer called `name`; an unknown name is a ConfigError naming eval.scorer."""
    if name not in SCORERS:
        raise ConfigError(f"eval.scorer (--scorer) is {name!r}; use one of "
                          f"{', '.join(SCORERS)}")
    return SCORERS[name]

"""The two scorers: the official LongVideo-Reason-eval string equality beside the math grader."""

import pytest

from lvr_jax.config import ConfigError, base_config
from lvr_jax.eval import scoring


@pytest.mark.parametrize("text,expected", [
    ("<think>x</think><answer>B</answer>", True),  # tagged
    ("<think>x</think><answer>  B \t</answer>", True),  # the span is stripped
    ("B", True),  # no tag: the whole completion, stripped
    ("\n B \n", True),
    ("<answer>Therefore the final answer is: B</answer>", True),  # the script's special phrase
    ("<think>x</think><answer>b</answer>", False),  # case counts
    ("<think>x</think><answer>B.</answer>", False),  # "B." is not "B"
    ("<think>x</think><answer>B. The red car</answer>", False),
    ("<think>x</think><answer>(B)</answer>", False),
    ("<think>x</think><answer>B C</answer>", False),
    ("The answer is B", False),  # no tag: all of it is compared
    ("<think>x</think><answer>\nB\n</answer>", False),  # a span with a line break is no span
    ("<answer>B</answer> on second thought <answer>C</answer>", True),  # the first span counts
    ("<answer>C</answer> on second thought <answer>B</answer>", False),
    ("<think>x</think><answer></answer>", False),
])
def test_official_scorer_is_plain_string_equality_of_the_answer_span(text, expected):
    assert scoring.official_correct(text, "B") is expected


@pytest.mark.parametrize("truth", ["B", " B ", "<answer>B</answer>", "<answer> B </answer>"])
def test_official_ground_truth_is_its_answer_span_or_all_of_it_stripped(truth):
    assert scoring.official_truth(truth) == "B"
    assert scoring.official_correct("<think>x</think><answer>B</answer>", truth)


def test_official_answer_is_what_the_predictions_report():
    assert scoring.official_answer("<think>x</think><answer> b </answer>") == "b"
    assert scoring.official_answer("I pick C.\n") == "I pick C."
    assert scoring.official_answer("<answer>\nB</answer>") == "<answer>\nB</answer>"


# (completion, math right, official right) against the truth "B"
CRAFTED = [
    ("<think>x</think><answer>B</answer>", True, True),
    ("<think>x</think><answer>b</answer>", True, False),
    ("<think>x</think><answer> (B) </answer>", True, False),
    ("<think>x</think><answer>\nB\n</answer>", True, False),
    ("<answer>A</answer> no, <answer>B</answer>", True, False),
    ("<answer>B</answer> no, <answer>A</answer>", False, True),
    ("<think>x</think><answer>C</answer>", False, False),
    ("B", True, True),
]


def test_the_two_scorers_give_different_numbers_on_the_same_completions():
    math = [scoring.get_scorer("math").correct(t, "B") for t, _, _ in CRAFTED]
    official = [scoring.get_scorer("official").correct(t, "B") for t, _, _ in CRAFTED]
    assert math == [m for _, m, _ in CRAFTED] and official == [o for _, _, o in CRAFTED]
    assert sum(math) / len(CRAFTED) == 0.75 and sum(official) / len(CRAFTED) == 0.375


def test_math_scorer_is_the_accuracy_reward_and_the_default():
    from lvr_jax.rl.rewards import accuracy_reward

    for text, _, _ in CRAFTED:
        assert scoring.math_correct(text, "B") == (accuracy_reward(text, "B") == 1.0)
    assert scoring.math_answer("<answer> b </answer>") == "B"
    assert scoring.DEFAULT_SCORER == base_config().eval.scorer == "math"


def test_an_unknown_scorer_names_the_config_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"eval.scorer \(--scorer\) is 'exact'; use one of "
                                          r"math, official"):
        scoring.get_scorer("exact")

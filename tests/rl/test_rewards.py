"""Rewards of REFERENCE.md §4."""

import pytest

from lvr_jax.rl import rewards


@pytest.mark.parametrize("text,expected", [
    ("<think>red came first</think><answer>A</answer>", 1.0),
    ("<think>a\nmultiline\nthought</think>\n  <answer> B </answer>", 1.0),
    ("<answer>A</answer>", 0.0),
    ("<think>x</think><answer>A</answer> trailing words", 0.0),
    ("The answer is A", 0.0),
])
def test_format_reward(text, expected):
    assert rewards.format_reward(text) == expected


@pytest.mark.parametrize("text,truth,expected", [
    ("<think>x</think><answer>B</answer>", "B", 1.0),
    ("<think>x</think><answer> b </answer>", "B", 1.0),  # case and whitespace
    ("<think>x</think><answer>C</answer>", "B", 0.0),
    ("B", "B", 1.0),  # no tag: the whole response is graded
    ("<think>x</think><answer>0.5</answer>", "1/2", 1.0),  # numeric equivalence
    ("<think>x</think><answer></answer>", "B", 0.0),
    ("<think>x</think><answer>A</answer>", "<think>y</think><answer>A</answer>", 1.0),
])
def test_accuracy_reward(text, truth, expected):
    assert rewards.accuracy_reward(text, truth) == expected


def test_score_weighs_accuracy_and_format():
    assert rewards.score("<think>x</think><answer>B</answer>", "B") == pytest.approx(1.0)
    assert rewards.score("<think>x</think><answer>C</answer>", "B") == pytest.approx(0.1)
    assert rewards.score("B", "B") == pytest.approx(0.9)
    assert rewards.score("B", "B", format_weight=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("length,expected", [(80, 0.0), (96, 0.0), (100, -0.25), (112, -1.0),
                                             (113, -1.0)])
def test_overlong_penalty(length, expected):
    assert rewards.overlong_penalty(length, max_length=112, buffer=16) == pytest.approx(expected)

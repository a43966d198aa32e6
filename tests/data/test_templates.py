"""The prompt of REFERENCE.md §3, one video placeholder, loss only on the answer."""

from __future__ import annotations

import numpy as np
import pytest

from lvr_jax.data import templates
from lvr_jax.data.schema import split_options

EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<vila/video>You are a helpful assistant. The user asks a question, and then "
    "you solves it.\n\nPlease first think deeply about the question based on the given video, and "
    "then provide the final answer. The reasoning process and answer are enclosed within <think> "
    "</think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
    "</think> <answer> the letter of your choice (A, B, C, or D) </answer>.\n\n Question: "
    "Which came first?\nA. red\nB. blue\nC. green\nD. white<|im_end|>\n"
    "<|im_start|>assistant\n")
QUESTION = templates.format_question("Which came first?", ["red", "blue", "green", "white"])


def test_prompt_is_the_reference_chat_template():
    assert templates.chat_prompt(QUESTION) == EXPECTED_PROMPT


def test_question_layout_round_trips_through_the_official_parser():
    assert split_options(QUESTION, "o") == ("Which came first?", ("red", "blue", "green", "white"))


@pytest.mark.parametrize("question", ["<video>\nWhat?", "What? <vila/video>", "<image>What?"])
def test_prompt_holds_exactly_one_video_placeholder(tokenizer, question):
    ids = templates.encode_prompt(tokenizer, question)
    assert int((ids == tokenizer.video_id).sum()) == 1 and ids.dtype == np.int32


def test_sft_loss_mask_covers_exactly_the_answer_and_end_token(tokenizer):
    target = "<think>The red one came first.</think><answer>A</answer>"
    input_ids, loss_mask = templates.encode_sft(tokenizer, QUESTION, target)
    assert input_ids.shape == loss_mask.shape and set(np.unique(loss_mask)) == {0, 1}
    start = int(np.argmax(loss_mask))
    assert loss_mask[start:].all() and not loss_mask[:start].any()
    assert tokenizer.decode(input_ids[:start]) == EXPECTED_PROMPT
    assert tokenizer.decode(input_ids[start:]) == target + "<|im_end|>"
    assert input_ids[-1] == tokenizer.eos_id


@pytest.mark.parametrize("answer, reasoning, target", [
    ("<think>x</think><answer>B</answer>", None, "<think>x</think><answer>B</answer>"),
    ("<think>x</think><answer>B</answer>", "ignored", "<think>x</think><answer>B</answer>"),
    ("<answer>C</answer>", "because", "<think>because</think><answer>C</answer>"),
    ("D", "since", "<think>since</think><answer>D</answer>"),
    (" D ", None, "<answer>D</answer>"),
])
def test_sft_target_from_each_answer_shape(answer, reasoning, target):
    assert templates.sft_target(answer, reasoning) == target

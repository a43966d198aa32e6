"""The one chat prompt of REFERENCE.md §3, for SFT (prompt + target) and RL/evaluation (prompt).

Qwen2 chat template with the system turn "You are a helpful assistant."; the user turn is the
single video placeholder followed by the reasoning instruction and the question; the model
answers in the assistant turn. SFT computes loss only on the target (answer + `<|im_end|>`).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from lvr_jax.data.schema import LETTERS, answer_span
from lvr_jax.tokenizer import IM_END, IM_START, VIDEO_TOKEN, Tokenizer

SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "You are a helpful assistant. The user asks a question, and then you solves it.\n\n"
    "Please first think deeply about the question based on the given video, and then provide "
    "the final answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> the letter of your choice (A, B, C, or D) </answer>.\n\n Question: {question}")
# Reasoning off (VideoMME-style direct answers): the reply is the letter alone.
DIRECT_INSTRUCTION = ("Answer the question about the given video with the letter of the correct "
                      "option (A, B, C, or D) only.\n\n Question: {question}")
# Placeholders that may appear in third-party question text; the prompt adds its own, once.
_MEDIA_PLACEHOLDERS = re.compile(r"<vila/video>|<video>|<image>")


def format_question(question: str, options: Sequence[str]) -> str:
    """A question followed by its options as 'A. ...' lines (the LongVideo-Reason layout)."""
    lines = [question.strip()] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines)


def user_text(question: str, think: bool = True) -> str:
    """The user turn: the video placeholder, then the instruction holding the question."""
    clean = _MEDIA_PLACEHOLDERS.sub("", question).strip()
    return VIDEO_TOKEN + (INSTRUCTION if think else DIRECT_INSTRUCTION).format(question=clean)


def chat_prompt(question: str, think: bool = True) -> str:
    """The full prompt text, ending where the assistant starts to answer."""
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{user_text(question, think)}{IM_END}\n"
            f"{IM_START}assistant\n")


def sft_target(answer: str, reasoning: str | None = None) -> str:
    """The SFT target: the answer as written when it holds <think>; else built from `reasoning`."""
    if "<think>" in answer:
        return answer.strip()
    final = f"<answer>{answer_span(answer)}</answer>"
    return f"<think>{reasoning.strip()}</think>{final}" if reasoning else final


def encode_prompt(tokenizer: Tokenizer, question: str, think: bool = True) -> np.ndarray:
    """Prompt token ids (int32); checks that the video placeholder is there exactly once."""
    ids = np.asarray(tokenizer.encode(chat_prompt(question, think)), dtype=np.int32)
    count = int((ids == tokenizer.video_id).sum())
    if count != 1:
        raise ValueError(f"prompt holds {count} video placeholders; exactly one is required")
    return ids


def encode_text_sft(tokenizer: Tokenizer, question: str, target: str):
    """(input_ids, loss_mask) of a text-only exchange (no video, no instruction): the
    demo's option drills."""
    prompt = tokenizer.encode(f"{IM_START}user\nQuestion: {question}{IM_END}\n"
                              f"{IM_START}assistant\n")
    return _with_target(tokenizer, np.asarray(prompt, np.int32), target)


def encode_sft(tokenizer: Tokenizer, question: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, loss_mask) int32 [L]: prompt then target + <|im_end|>; mask 1 on the target."""
    return _with_target(tokenizer, encode_prompt(tokenizer, question), target)


def _with_target(tokenizer: Tokenizer, prompt: np.ndarray, target: str):
    target_ids = np.asarray(tokenizer.encode(target + IM_END), dtype=np.int32)
    input_ids = np.concatenate([prompt, target_ids])
    loss_mask = np.concatenate([np.zeros_like(prompt), np.ones_like(target_ids)])
    return input_ids, loss_mask

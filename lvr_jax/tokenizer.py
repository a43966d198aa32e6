"""Tokenizers: the checkpoint's own (`llm/tokenizer.json`) or a tiny offline byte-level BPE.

Real VILA checkpoints bring a Qwen2 tokenizer with the VILA tokens added. Tests and the
demo have no hub, so `build_tiny_tokenizer` trains a small byte-level BPE on a built-in
corpus that holds the same special tokens; both are used through one `Tokenizer` class.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VIDEO_TOKEN = "<vila/video>"
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# Order fixes the ids of the tiny tokenizer: the special tokens come first.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, *REASONING_TOKENS,
                  "<vila/sentinel>", "<image>", VIDEO_TOKEN)

_CORPUS = """\
You are a helpful assistant. The user asks a question, and then you solves it.
Please first think deeply about the question based on the given video, and then provide
the final answer. The reasoning process and answer are enclosed within <think> </think>
and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>
<answer> the letter of your choice (A, B, C, or D) </answer>.
Question: Which object appeared first in the video? What happened after the red circle
moved to the left? Why did the blue square disappear? Where did the green triangle go?
What will most likely happen next? Options: A. B. C. D. The answer is A. The answer is B.
The answer is C. The answer is D. Temporal Goal & Purpose Plot & Narrative Spatial
red green blue yellow purple orange white black circle square triangle star diamond
appears disappears moves left right up down top bottom corner center collides touches
first then later finally before after because so therefore at the start at the end
frame second minute seconds minutes long short medium video clip event events object
Going through the video in order: the magenta square appears in the bottom left at 0.2 s;
then the blue square appears in the bottom right at 0.9 s; then the cyan circle appears in
the top left at 1.6 s. So the object that appeared first is the yellow square, option B.
What was the red triangle trying to reach when it started to move? At 3.4 s the green
circle leaves the top right and heads to the bottom left; at 4.4 s it touches the white
diamond, which disappears. So the answer is option C. After the blue square touched the
cyan circle, which object moved next and then left the video? Next, at 5.0 s the magenta
square moves from the top left to the top right and leaves the video at 6.5 s, while the
orange star stays in the bottom right. So it was in the top left corner, option D.
Where was the purple star just before it left the video? It reaches the empty corner.
0 1 2 3 4 5 6 7 8 9 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0 2.5 3.5 4.5 5.5 6.5 7.5
"""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids this project needs by name."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.video_id = self.token_id(VIDEO_TOKEN)
        self.pad_id = self.token_id(PAD_TOKEN)
        self.eos_id = self.token_id(IM_END)
        newline = tok.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            raise ValueError(f'tokenizer encodes "\\n" as {len(newline)} tokens; one is required')
        self.newline_id = newline[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str) -> None:
        """Writes tokenizer.json and a config that transformers' AutoTokenizer reads."""
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": IM_END,
            "pad_token": PAD_TOKEN,
            "model_max_length": 131072,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads `tokenizer.json` from a directory (an `llm/` folder or a VILA root)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer folder {directory!r} does not exist (or is not a "
                                "folder); give a VILA directory or its llm/ folder")
    for candidate in (directory, os.path.join(directory, "llm")):
        path = os.path.join(candidate, "tokenizer.json")
        if os.path.exists(path):
            return Tokenizer(tokenizers.Tokenizer.from_file(path))
    raise FileNotFoundError(f"no tokenizer.json in {directory!r} or its llm/ folder")


def build_tiny_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """Trains a deterministic byte-level BPE with the Qwen2 chat and VILA tokens, offline."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return Tokenizer(tok)

"""Option drills: well-formed text-only questions, and an SFT from scratch that starts
after them."""

import os
import re

import numpy as np
import pytest

from lvr_jax import trainer
from lvr_jax.data.schema import LETTERS
from lvr_jax.data.synthetic_script import (CORNER_OPTIONS, OBJECT_OPTIONS, make_questions,
                                           make_script, story_drill)
from lvr_jax.sft.option_drills import drill_batch, drill_rng


def test_drills_ask_for_the_letter_of_the_named_option_and_train_only_the_answer(tokenizer):
    batch = drill_batch(tokenizer, np.random.default_rng(0), 16)
    for ids, mask, valid in zip(batch["input_ids"], batch["loss_mask"], batch["token_mask"]):
        text = tokenizer.decode(ids[valid == 1].tolist())
        target = tokenizer.decode(ids[mask == 1].tolist())
        named = text.split("Which option says ")[1].split("?")[0]
        question = text.split("<|im_end|>")[0]
        options = dict(line.split(". ", 1) for line in question.split("\n")
                       if line[:2] in {f"{x}." for x in LETTERS})
        letter = next(k for k, v in options.items() if v.lower() == named.lower())
        assert target.startswith("<think>")
        assert target.endswith(f"<answer>{letter}</answer><|im_end|>")
        assert f"{named}, option {letter}." in target
        assert mask.sum() < valid.sum() and not mask[:5].any()


def test_sft_from_scratch_starts_from_the_drilled_model(tmp_path, tiny_train_config):
    config = tiny_train_config("sft", 2)
    config.drills.update(steps=3, batch_size=4)
    trainer.run(config, str(tmp_path))
    assert config.model.init == str(tmp_path / "drills" / "model")
    assert os.path.exists(tmp_path / "drills" / "model" / "llm" / "model.safetensors")
    assert os.path.exists(tmp_path / "model" / "llm" / "model.safetensors")


def test_story_drills_conclude_from_their_summary_with_the_conclusions_letter(tokenizer):
    batch = drill_batch(tokenizer, drill_rng(0), 16, kind="story")
    for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
        target = tokenizer.decode(ids[mask == 1].tolist())
        named, letter = re.search(r"So the answer is the (.+?), option (\w)\.", target).groups()
        options = OBJECT_OPTIONS if named.endswith("object") else CORNER_OPTIONS
        assert options.index(f"The {named}") == LETTERS.index(letter)
        assert target.startswith("<think>First ")
        assert target.endswith(f"<answer>{letter}</answer><|im_end|>")


def video_reasonings(seed: int, num_videos: int) -> set[str]:
    """The chains of thought of the synthetic set's first videos (lvr_jax.data.synthetic)."""
    out = set()
    for k in range(num_videos):
        rng = np.random.default_rng([seed, 0, k])
        out |= {q["reasoning"] for q in make_questions(make_script(rng, 64, 4), rng)}
    return out


def test_story_drills_never_replay_the_synthetic_videos_stories():
    rng = drill_rng(0)
    drills = {story_drill(rng)["reasoning"] for _ in range(200)}
    assert not video_reasonings(0, 200) & drills
    # the stream the drills would share by default: its first drill is video 0's story
    assert story_drill(np.random.default_rng(0))["reasoning"] in video_reasonings(0, 1)


def test_an_unknown_drill_kind_is_refused_by_name(tokenizer):
    with pytest.raises(ValueError, match="drills.kind .*'stories'"):
        drill_batch(tokenizer, drill_rng(0), 2, kind="stories")

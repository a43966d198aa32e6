"""Option drills: well-formed text-only questions, and an SFT from scratch that starts
after them."""

import os

import numpy as np

from lvr_jax import train
from lvr_jax.data.schema import LETTERS
from lvr_jax.sft.option_drills import drill_batch


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
    train.run(config, str(tmp_path))
    assert config.model.init == str(tmp_path / "drills" / "model")
    assert os.path.exists(tmp_path / "drills" / "model" / "llm" / "model.safetensors")
    assert os.path.exists(tmp_path / "model" / "llm" / "model.safetensors")

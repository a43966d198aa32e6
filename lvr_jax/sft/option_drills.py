"""Text-only multiple-choice drills: the demo's stand-in for a pretrained LLM.

LongVILA-R1 starts from Qwen2, which already reads "A. ... B. ..." option lists. The
demo's LLM starts from random weights; taught only by video questions (one answer letter
per question), it learns to name the right object but not to find that object's letter:
in "D. The blue circle" the letter comes before the words it labels, a two-hop lookup.
A few minutes of short drills ("Which option says the blue circle?") in large batches
teach it before CoT-SFT on the videos.

`drills.kind = "story"` drills the demo's own questions instead: a random story's question
and its whole chain of thought, without the video. The demo's options are fixed, so the
lookup is easy, yet a model taught only by videos reads its letter (and its conclusion) from
the video and ignores the text before them; drilled, it reasons from its summary.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from lvr_jax import training
from lvr_jax.config import preset_config
from lvr_jax.data.batching import PadBatch
from lvr_jax.data.synthetic_script import option_drill, story_drill
from lvr_jax.data.templates import encode_text_sft, format_question, sft_target
from lvr_jax.model import LongVILA, save_pretrained
from lvr_jax.sft.learner import text_loss
from lvr_jax.sharding import hosts
from lvr_jax.tokenizer import Tokenizer, build_tiny_tokenizer


# Drills are 40-90 tokens: buckets of 16 keep the shapes to compile few.
DRILL_BUCKETS = tuple(range(16, 257, 16))


DRILLS = {"options": option_drill, "story": story_drill}


def drill_batch(tokenizer: Tokenizer, rng: np.random.Generator, size: int,
                kind: str = "options") -> dict:
    """`size` fresh drills, right-padded to a bucket: input_ids, loss_mask, token_mask."""
    if kind not in DRILLS:
        raise ValueError(f"config.drills.kind must be one of {sorted(DRILLS)}, got {kind!r}")
    examples = []
    for _ in range(size):
        d = DRILLS[kind](rng)
        target = sft_target(f"<think>{d['reasoning']}</think><answer>{d['answer']}</answer>")
        ids, mask = encode_text_sft(tokenizer, format_question(d["question"], d["options"]),
                                    target)
        examples.append({"input_ids": ids, "loss_mask": mask})
    pad = PadBatch({"input_ids": tokenizer.pad_id, "loss_mask": 0}, "token_mask",
                   DRILL_BUCKETS, "right")
    return pad(examples)


def drill_rng(seed: int) -> np.random.Generator:
    """The drills' own stream: the synthetic set draws video k's story from
    default_rng([seed, 0, k]), and default_rng(seed) would replay video 0's."""
    return np.random.default_rng([seed, 7919])


def drill_optimizer(config):
    """AdamW at `drills.lr` after a short warm-up, otherwise the recipe's optimizer."""
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    optim.update(lr=config.drills.lr, schedule="constant", warmup_steps=20, weight_decay=0.0)
    return training.make_optimizer(optim)


def train_drills(config, model, tokenizer: Tokenizer):
    """`drills.steps` steps of the LLM on fresh drills -> the trained model."""
    tx = drill_optimizer(config)
    state = training.TrainState.create(model, training.param_filter(["llm"]), tx)
    update = training.jit_update(tx, text_loss)
    rng = drill_rng(config.seed)
    with tqdm(range(config.drills.steps), desc="option drills") as bar:
        for _ in bar:
            batch = drill_batch(tokenizer, rng, config.drills.batch_size, config.drills.kind)
            state.trainable, state.opt_state, metrics = update(
                state.trainable, state.frozen, state.opt_state, graphdef=state.graphdef,
                batch=batch)
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    return state.model()


def drilled_init(config, workdir: str) -> str:
    """The preset model after `drills.steps` drills, exported once to `workdir/drills/model`
    by the first process (on one of its devices); the directory an SFT from scratch starts
    from."""
    out = os.path.join(workdir, "drills", "model")
    if hosts.is_writer() and not os.path.exists(os.path.join(out, "config.json")):
        tokenizer = build_tiny_tokenizer()
        model = LongVILA(preset_config(config, tokenizer), rngs=nnx.Rngs(config.seed))
        save_pretrained(train_drills(config, model, tokenizer), out, tokenizer=tokenizer)
    hosts.barrier("drills")  # the other processes load what the first wrote
    return out

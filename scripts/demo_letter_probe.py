"""Does the demo model take its answer letter from its own conclusion? A teacher-forced probe.

    python scripts/demo_letter_probe.py --model runs/demo/sft/model --data runs/demo/data -n 160

For the first N validation questions the model reads the question's own SFT target (the true
video summary and conclusion, "So the answer is the red object, option") and the letter it
ranks first among A-D is compared with the conclusion's letter; then the conclusion's object
is swapped for the next option and the probe asks again. A model that reads its conclusion
follows the text in both cases; one that guesses the letter from the video stays with the
truth when the text is swapped (README, "What held GRPO back on the demo").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re

import jax.numpy as jnp

from lvr_jax import build
from lvr_jax.config import demo_config
from lvr_jax.data.pipeline import eval_dataset
from lvr_jax.data.schema import LETTERS, load_eval_records
from lvr_jax.data.synthetic_script import CORNERS, OPTION_COLOURS
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.video_embeddings import VideoEmbedder

CONCLUSION = re.compile(r"So the answer is the (.+?) (object|corner), option")
OPTIONS = {"object": list(OPTION_COLOURS), "corner": list(CORNERS)}


def conclusion_prefixes(target: str) -> dict[str, tuple[str, str]]:
    """{"true"/"swapped": (target text up to "option", the letter that text names)}."""
    think = target.split("<think>")[1].split("</think>")[0]
    found = CONCLUSION.search(think)
    names = OPTIONS[found.group(2)]
    true = names.index(found.group(1))
    out = {}
    for kind, k in (("true", true), ("swapped", (true + 1) % 4)):
        text = f"<think>{think[:found.start()]}So the answer is the {names[k]} {found.group(2)}, option"
        out[kind] = (text, LETTERS[k])
    return out


def probe(model_dir: str, data_dir: str, n: int) -> dict[str, float]:
    config = demo_config("sft", data_dir)
    config.model.init = model_dir
    tokenizer, model = build.build_model(config, None)
    val = os.path.join(data_dir, "val.jsonl")
    with open(val, encoding="utf-8") as f:
        targets = [json.loads(line)["answer"] for line, _ in zip(f, range(n))]
    data = dataclasses.replace(build.data_config(config, model), think=True, batch_size=16)
    videos = VideoEmbedder(model, EmbeddingCache())
    letter_ids = jnp.asarray([tokenizer.encode(f"option {x}")[-1] for x in LETTERS[:4]])
    counts, k = collections.Counter(), 0
    for batch in eval_dataset(data, tokenizer, load_eval_records(val)[:n]):
        embeds, valid = videos.prompts(model, batch)
        for i, truth in enumerate(batch["answer"]):
            for kind, (text, named) in conclusion_prefixes(targets[k]).items():
                ids = jnp.asarray(tokenizer.encode(text))[None]
                x = jnp.concatenate([embeds[i:i + 1], model.llm.embed(ids)], axis=1)
                mask = jnp.concatenate([valid[i:i + 1], jnp.ones(ids.shape, bool)], axis=1)
                logits = model.llm(inputs_embeds=x, valid=mask)
                letter = LETTERS[int(jnp.argmax(logits[0, -1, letter_ids]))]
                counts[f"{kind}: letter follows the text"] += letter == named
                counts[f"{kind}: letter is right"] += letter == truth
            k += 1
    return {key: value / k for key, value in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a VILA directory (a run's model/)")
    parser.add_argument("--data", default="runs/demo/data", help="the synthetic set")
    parser.add_argument("-n", type=int, default=160, help="validation questions")
    args = parser.parse_args()
    for key, value in probe(args.model, args.data, args.n).items():
        print(f"{key:<34} {value:.1%}")


if __name__ == "__main__":
    main()

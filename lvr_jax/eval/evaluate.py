"""Multiple-choice evaluation with the embedded sampler: accuracy overall and per category.

Answers are extracted and graded by the scorer named `scorer` (`eval.scoring`: "math", the
accuracy reward of training, by default; "official", the LongVideo-Reason-eval script's); an
answer that is not one of the option letters counts as wrong and is also counted as unparseable.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from tqdm import tqdm

from lvr_jax.data.pipeline import DataConfig, eval_dataset
from lvr_jax.data.schema import LETTERS
from lvr_jax.eval.scoring import DEFAULT_SCORER, get_scorer
from lvr_jax.model.sampler import SamplingParams
from lvr_jax.model.vlm import LongVILA
from lvr_jax.rl.rollout import JaxEngine, response_texts
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.mesh import DEFAULT_RULES
from lvr_jax.sharding.video_embeddings import VideoEmbedder
from lvr_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class EvalResult:
    predictions: list[dict]
    scorer: str = DEFAULT_SCORER  # the name of the scorer that graded them

    @property
    def accuracy(self) -> float:
        return float(np.mean([p["correct"] for p in self.predictions])) if self.predictions else 0.0

    def accuracy_by(self, field: str) -> dict[str, float]:
        """Accuracy per value of a prediction field ("category", "duration"); None values skipped."""
        groups = collections.defaultdict(list)
        for p in self.predictions:
            if p.get(field) is not None:
                groups[p[field]].append(p["correct"])
        return {k: float(np.mean(v)) for k, v in sorted(groups.items())}

    @property
    def per_category(self) -> dict[str, float]:
        return self.accuracy_by("category")

    @property
    def per_duration(self) -> dict[str, float]:
        """VideoMME-style buckets (short / medium / long) when the records give a duration."""
        return self.accuracy_by("duration")

    @property
    def unparseable(self) -> int:
        return sum(not p["parsed_ok"] for p in self.predictions)


def evaluate(model: LongVILA, tokenizer: Tokenizer, data: DataConfig, max_new_tokens: int = 256,
             temperature: float = 0.0, cache: EmbeddingCache | None = None,
             progress: bool = True, engine=None, records=None,
             scorer: str = DEFAULT_SCORER, mesh=None, rules=DEFAULT_RULES) -> EvalResult:
    """Answers every record of `data.records` (or of `records`) once and grades it with `scorer`.

    `engine` (an `rl.rollout.RolloutEngine`) generates; default the embedded sampler
    (a `ServerEngine` generates on rollout servers). With a `mesh` each video's frames are
    encoded split over it (`rules`: the recipe's `mesh.rules`)."""
    grade = get_scorer(scorer)
    videos = VideoEmbedder(model, cache, mesh, rules)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_token_ids=(tokenizer.eos_id,))
    engine = engine or JaxEngine(tokenizer.pad_id)
    predictions = []
    batches = eval_dataset(data, tokenizer, records)
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        embeds, valid = videos.prompts(model, batch)
        gen = engine.generate(model, embeds, valid, params, jax.random.key(0))
        for i, text in enumerate(response_texts(tokenizer, gen, params.stop_token_ids)):
            parsed = grade.extract(text)
            predictions.append({
                "id": batch["id"][i], "category": batch["category"][i],
                "duration": batch["duration"][i],
                "answer": batch["answer"][i], "prediction": text, "parsed": parsed,
                "parsed_ok": parsed in LETTERS,
                "correct": grade.correct(text, batch["answer"][i])})
    return EvalResult(predictions, scorer)

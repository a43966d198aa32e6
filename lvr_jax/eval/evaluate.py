"""Multiple-choice evaluation with the embedded sampler: accuracy overall and per category.

Answers are extracted and graded by the scorer named `scorer` (`eval.scoring`: "math", the
accuracy reward of training, by default; "official", the LongVideo-Reason-eval script's); an
answer that is not one of the option letters counts as wrong and is also counted as unparseable.
A question that cannot be asked (its video is missing or broken, its prompt too long) is
skipped: it is listed in `EvalResult.skipped` with its reason, and the accuracy is over the
questions answered.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from tqdm import tqdm

from lvr_jax.data.pipeline import DataConfig, SkippedRecord, eval_dataset
from lvr_jax.data.schema import LETTERS
from lvr_jax.eval.scoring import DEFAULT_SCORER, get_scorer
from lvr_jax.model.vlm import LongVILA
from lvr_jax.rl.engines import JaxEngine
from lvr_jax.rl.rollout import response_texts
from lvr_jax.sampling import SamplingParams
from lvr_jax.sharding import forwards
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.mesh import DEFAULT_RULES
from lvr_jax.sharding.video_embeddings import VideoEmbedder
from lvr_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class EvalResult:
    predictions: list[dict]  # one per question answered
    scorer: str = DEFAULT_SCORER  # the name of the scorer that graded them
    # one per question skipped: {"id", "record", "reason", "message"}
    skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.predictions)

    @property
    def questions(self) -> int:
        """Questions asked for: answered and skipped."""
        return len(self.predictions) + len(self.skipped)

    def counts(self) -> str:
        """`answered 8 of 12, 4 skipped`: what the accuracy is over."""
        return f"answered {self.answered} of {self.questions}, {len(self.skipped)} skipped"

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


def skipped_row(skip: SkippedRecord) -> dict:
    """A skipped question as written in the reports: its id, where it is, why it was skipped."""
    return {"id": skip.id, "record": skip.record, "reason": skip.reason, "message": skip.message}


class Evaluator:
    """Answers evaluation records and grades them; built once, called with each model to
    evaluate (the same frozen video encoder): the video path (`VideoEmbedder`, its cache and
    compiled encoders), the engine (default the embedded sampler, its prefill sequence-
    parallel on `mesh` as `mesh_config` says) and the scorer.

    `video_output`: what the video path caches (`video_embeddings.OUTPUTS`): "embeddings"
    when tower and projector are frozen; "features" while SFT trains the projector."""

    def __init__(self, model: LongVILA, tokenizer: Tokenizer, max_new_tokens: int = 256,
                 temperature: float = 0.0, cache: EmbeddingCache | None = None, engine=None,
                 scorer: str = DEFAULT_SCORER, mesh=None, mesh_config=None,
                 video_output: str = "embeddings", progress: bool = True):
        rules = mesh_config.rules if mesh_config is not None else DEFAULT_RULES
        self.videos = VideoEmbedder(model, cache, mesh, rules, output=video_output)
        self.engine = engine or JaxEngine(tokenizer.pad_id,
                                           forwards.sampler_forwards(mesh, mesh_config))
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                     stop_token_ids=(tokenizer.eos_id,))
        self.tokenizer, self.scorer, self.grade = tokenizer, scorer, get_scorer(scorer)
        self.progress = progress

    def __call__(self, model: LongVILA, data: DataConfig, records=None) -> EvalResult:
        """Every record of `data.records` (or of `records`) answered once by `model` and
        graded, or skipped with its reason."""
        predictions, skipped = [], []
        batches = eval_dataset(data, self.tokenizer, records,
                               on_skip=lambda s: skipped.append(skipped_row(s)))
        for batch in tqdm(batches, desc="evaluate", disable=not self.progress):
            embeds, valid = self.videos.prompts(model, batch)
            gen = self.engine.generate(model, embeds, valid, self.params, jax.random.key(0))
            texts = response_texts(self.tokenizer, gen, self.params.stop_token_ids)
            predictions += [self.prediction(batch, i, text) for i, text in enumerate(texts)]
        return EvalResult(predictions, self.scorer, skipped)

    def prediction(self, batch: dict, i: int, text: str) -> dict:
        """Record i of `batch` with the answer `text` and its grade."""
        parsed = self.grade.extract(text)
        return {"id": batch["id"][i], "category": batch["category"][i],
                "duration": batch["duration"][i], "answer": batch["answer"][i],
                "prediction": text, "parsed": parsed, "parsed_ok": parsed in LETTERS,
                "correct": self.grade.correct(text, batch["answer"][i])}


def evaluate(model: LongVILA, tokenizer: Tokenizer, data: DataConfig, max_new_tokens: int = 256,
             temperature: float = 0.0, cache: EmbeddingCache | None = None,
             progress: bool = True, engine=None, records=None,
             scorer: str = DEFAULT_SCORER, mesh=None, mesh_config=None) -> EvalResult:
    """Answers every record of `data.records` (or of `records`) once and grades it with
    `scorer`: one `Evaluator`, for one model."""
    return Evaluator(model, tokenizer, max_new_tokens, temperature, cache, engine, scorer, mesh,
                     mesh_config, progress=progress)(model, data, records)

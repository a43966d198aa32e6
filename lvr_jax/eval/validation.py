"""Validation during training: greedy accuracy on a fixed slice of validation questions.

Built once per run: its records, its data settings and one `Evaluator` (video path, compiled
encoders, the embedded sampler with the run's mesh and prefill); each call evaluates the
weights of that moment.
"""

from __future__ import annotations

import dataclasses

from lvr_jax import build
from lvr_jax.data.schema import load_eval_records
from lvr_jax.eval.evaluate import Evaluator
from lvr_jax.model import LongVILA
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.stages import stage_of


class Validation:
    """The first `eval.val_size` records of `eval.val_records` (else of `eval.records`),
    graded by `eval.scorer`, every `eval.every` steps; `__call__(model)` -> metrics."""

    def __init__(self, config, model: LongVILA, tokenizer, mesh=None):
        e = config.eval
        self.records = load_eval_records(e.val_records or e.records)[:e.val_size or None]
        self.data = dataclasses.replace(build.data_config(config, model), batch_size=e.batch_size)
        # the stage's own video path: cached whole under GRPO, features under SFT (whose
        # projector trains), nothing where the tower trains
        self.evaluator = Evaluator(model, tokenizer, e.max_new_tokens,
                                   cache=EmbeddingCache.of(config.cache, disk=False),
                                   scorer=e.scorer, mesh=mesh, mesh_config=config.mesh,
                                   video_output=stage_of(config).video_output(config),
                                   progress=False)

    def __call__(self, model: LongVILA) -> dict:
        result = self.evaluator(model, self.data, self.records)
        return {"val_accuracy": result.accuracy, "val_unparseable": result.unparseable,
                "val_skipped": len(result.skipped)}

"""Evaluating checkpoints: each (frames, reasoning mode) setting, written by `report`."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

from lvr_jax import build
from lvr_jax.eval import report
from lvr_jax.eval.evaluate import Evaluator
from lvr_jax.rl.engines import make_engine
from lvr_jax.sharding.embedding_cache import EmbeddingCache

log = logging.getLogger("lvr_jax.eval")


def model_dir(checkpoint: str) -> str:
    """A VILA directory: `checkpoint` itself, or the `model/` export of a training workdir."""
    for candidate in (checkpoint, os.path.join(checkpoint, "model")):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise FileNotFoundError(f"--checkpoint {checkpoint!r} is neither a VILA directory (config.json) "
                            "nor a training workdir with a model/ export")


def skip_reasons(result) -> str:
    """`; skipped: 3 bad_video, 1 too_long (listed in results.md)`, or nothing."""
    if not result.skipped:
        return ""
    by_reason = collections.Counter(s["reason"] for s in result.skipped)
    return "; skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items())) + \
        " (listed in results.md and the setting's JSON)"


def evaluate_checkpoint(config, checkpoint: str, frame_counts: list[int], thinks: list[bool],
                        records, out_dir: str) -> list[dict]:
    """Every (frames, mode) setting of one checkpoint; the video embeddings are shared by modes."""
    config = config.copy_and_resolve_references()
    config.model.init = model_dir(checkpoint)
    mesh = build.make_run_mesh(config)
    tokenizer, model = build.build_model(config, mesh)
    engine = make_engine(config, tokenizer.pad_id, mesh)
    engine.sync_weights(model, 0)
    evaluator = Evaluator(model, tokenizer, config.eval.max_new_tokens,
                          cache=EmbeddingCache.of(config.cache), engine=engine,
                          scorer=config.eval.scorer, mesh=mesh, mesh_config=config.mesh)
    rows = []
    for frames in frame_counts:
        for think in thinks:
            setting = report.Setting(checkpoint, frames, think)
            data = dataclasses.replace(
                build.data_config(config, model), num_frames=frames, think=think,
                batch_size=config.eval.batch_size)
            result = evaluator(model, data, records)
            rows.append(report.write_setting(out_dir, setting, result))
            log.warning("%s: %.1f%% of the questions answered (%s; %d unparseable), "
                        "scorer %s%s", setting.label, 100 * result.accuracy, result.counts(),
                        result.unparseable, result.scorer, skip_reasons(result))
    return rows

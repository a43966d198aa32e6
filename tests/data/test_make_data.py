"""`build.make_data`, the trainer's batches: each epoch's report of skipped records is
logged once (by the pipeline's skip stage), not once more by a callback."""

from __future__ import annotations

import json
import logging
import os

from tests.data.conftest import write_jsonl


def test_each_epoch_report_is_logged_once(synthetic_dir, tmp_path, caplog):
    from lvr_jax import build
    from tests.tiny_recipe import tiny_config

    with open(os.path.join(synthetic_dir, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:8]
    rows[2]["videos"] = "videos/missing.mp4"
    records = write_jsonl(str(tmp_path / "sft.jsonl"), rows)
    config = tiny_config("sft", synthetic_dir, 1)
    config.data.update(records=records, num_workers=0, num_epochs=2, num_frames=4)
    tokenizer, model = build.build_model(config)
    with caplog.at_level(logging.WARNING):
        batches = list(build.make_data(config, model, tokenizer))
    assert len(batches) == 2 * 7 // config.data.batch_size  # batches run across epochs
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [m.splitlines()[0] for m in reports] == [
        "epoch 0: 1 of 8 records skipped (1 bad_video):",
        "epoch 1: 1 of 8 records skipped (1 bad_video):"]

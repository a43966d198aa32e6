"""Evaluation: the entrypoint's files, the tables, and unparseable answers counted as wrong."""

import json
import os
import pathlib
import subprocess
import sys

from lvr_jax.eval import report
from lvr_jax.eval.evaluate import EvalResult

ROOT = pathlib.Path(__file__).resolve().parents[2]


def prediction(category, correct, parsed_ok=True, duration=None):
    return {"category": category, "correct": correct, "parsed_ok": parsed_ok,
            "duration": duration}


def test_unparseable_answers_are_wrong_and_counted_never_dropped():
    result = EvalResult([prediction("Temporal", True, duration="short"),
                         prediction("Temporal", False, parsed_ok=False, duration="long"),
                         prediction("Spatial", False), prediction("Spatial", True)])
    row = {**report.summary(result), "checkpoint": "runs/x/model", "num_frames": 16, "think": True}
    assert row["accuracy"] == 0.5 and row["questions"] == 4 and row["unparseable"] == 1
    assert row["per_category"] == {"Spatial": 0.5, "Temporal": 0.5}
    assert row["per_duration"] == {"long": 0.0, "short": 1.0}
    table = report.markdown_table([row]).splitlines()
    assert table[0].split(" | ")[3:7] == ["overall", "Temporal", "Spatial", "short"]
    assert table[2].startswith("| runs/x/model | 16 | on | **50.0%** | 50.0% | 50.0% | 100.0% |")


def test_checkpoint_names_say_which_run():
    assert report.checkpoint_name("runs/demo/sft/model") == "sft"
    assert report.checkpoint_name("runs/demo/grpo") == "grpo"
    assert report.Setting("ckpt/7b/", 64, False).label == "7b-64f-direct"


def test_entrypoint_compares_frame_counts_and_reasoning_modes(make_vila_dir, synthetic_set,
                                                              tmp_path):
    checkpoint, _, _, _ = make_vila_dir()
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "lvr_jax.eval", "--config=configs/demo.py:sft",
           f"--config.eval.records={synthetic_set}/test_eval.jsonl",
           f"--config.data.video_root={synthetic_set}", "--config.eval.max_new_tokens=12",
           f"--checkpoint={checkpoint}", "--num_frames=4,8", "--think=on,off", "--limit=3",
           f"--out={out}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    name = report.checkpoint_name(checkpoint)
    labels = [f"{name}-{f}f-{m}" for f in (4, 8) for m in ("think", "direct")]
    for label in labels:
        saved = json.loads((out / f"{label}.json").read_text())
        assert len(saved["predictions"]) == 3
        assert saved["correct"] == sum(p["correct"] for p in saved["predictions"])
        assert all(not p["correct"] for p in saved["predictions"] if not p["parsed_ok"])
        assert (out / f"{label}_categories.png").exists()
    assert len((out / "results.md").read_text().splitlines()) == 2 + len(labels)
    assert os.path.getsize(out / "accuracy_vs_frames.png") > 0
    assert "| overall |" in run.stdout


def test_checkpoint_that_is_not_a_model_is_named(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lvr_jax.eval", "--config=configs/demo.py:sft",
                          f"--checkpoint={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and f"--checkpoint {str(tmp_path)!r} is neither" in run.stderr


def test_evaluation_on_a_rollout_server_gives_the_embedded_samplers_answers(tokenizer,
                                                                            synthetic_set,
                                                                            tmp_path):
    from lvr_jax.data.pipeline import DataConfig
    from lvr_jax.data.schema import load_eval_records
    from lvr_jax.eval.evaluate import evaluate
    from rollout_bridge import export
    from rollout_bridge.client import RolloutClient, ServerRollout
    from tests.rollout_bridge.servers import running_server, tiny_model

    model = tiny_model(tokenizer)
    llm_dir = export.export_dir(model, str(tmp_path / "llm"), tokenizer)
    data = DataConfig(records=f"{synthetic_set}/test_eval.jsonl", video_root=synthetic_set,
                      num_frames=4, frame_size=model.config.vision.image_size, batch_size=3,
                      num_workers=0)
    records = load_eval_records(data.records)[:3]
    local = evaluate(model, tokenizer, data, 10, records=records, progress=False)
    with running_server(llm_dir, "transformers", log_dir=str(tmp_path)) as server:
        engine = ServerRollout(RolloutClient([server.url]), pad_id=tokenizer.pad_id)
        engine.sync_weights(model, 0)
        remote = evaluate(model, tokenizer, data, 10, records=records, progress=False,
                          engine=engine)
    assert [p["prediction"] for p in remote.predictions] == \
        [p["prediction"] for p in local.predictions]
    assert all(p["prediction"] for p in local.predictions)

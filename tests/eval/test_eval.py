"""Evaluation: the entrypoint's files, the tables, unparseable answers counted as wrong, and
the scorer that graded them named everywhere."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

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
    assert row["scorer"] == "math"  # the default
    table = report.markdown_table([row]).splitlines()
    assert table[0].startswith("**Accuracy, scorer: math (")
    assert table[2].split(" | ")[3:8] == ["scorer", "overall", "Temporal", "Spatial", "short"]
    assert table[4].startswith(
        "| runs/x/model | 16 | on | math | **50.0%** | 50.0% | 50.0% | 100.0% |")


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
           "--scorer=official", f"--out={out}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    name = report.checkpoint_name(checkpoint)
    labels = [f"{name}-{f}f-{m}" for f in (4, 8) for m in ("think", "direct")]
    for label in labels:
        saved = json.loads((out / f"{label}.json").read_text())
        assert len(saved["predictions"]) == 3 and saved["scorer"] == "official"
        assert saved["correct"] == sum(p["correct"] for p in saved["predictions"])
        assert all(not p["correct"] for p in saved["predictions"] if not p["parsed_ok"])
        assert (out / f"{label}_categories.png").exists()
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 + len(labels) and table[0].startswith("**Accuracy, scorer: official (")
    assert all(line.split(" | ")[3] == "official" for line in table[4:])
    assert [r["scorer"] for r in json.loads((out / "results.json").read_text())] == \
        ["official"] * len(labels)
    assert os.path.getsize(out / "accuracy_vs_frames.png") > 0
    assert "| official | **" in run.stdout and "scorer: official" in run.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.eval.scorer=exact"], "eval.scorer (--scorer) is 'exact'; use one of math, "
                                     "official"),
    (["--scorer=exact"], "flag --scorer=exact: value should be one of <math|official>"),
])
def test_an_unknown_scorer_is_one_line_and_exit_2(tmp_path, args, message):
    run = subprocess.run([sys.executable, "-m", "lvr_jax.eval", "--config=configs/demo.py:sft",
                          f"--checkpoint={tmp_path}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "is neither" not in run.stderr


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
    from lvr_jax.rl.engines import ServerEngine
    from rollout_bridge.client import RolloutClient
    from tests.rollout_bridge.servers import tiny_model
    from rollout_bridge.launch import running_server

    model = tiny_model(tokenizer)
    llm_dir = export.export_dir(model, str(tmp_path / "llm"), tokenizer)
    data = DataConfig(records=f"{synthetic_set}/test_eval.jsonl", video_root=synthetic_set,
                      num_frames=4, frame_size=model.config.vision.image_size, batch_size=3,
                      num_workers=0)
    records = load_eval_records(data.records)[:3]
    local = evaluate(model, tokenizer, data, 10, records=records, progress=False)
    with running_server(llm_dir, "transformers", log_dir=str(tmp_path)) as server:
        engine = ServerEngine(RolloutClient([server.url]), pad_id=tokenizer.pad_id)
        engine.sync_weights(model, 0)
        remote = evaluate(model, tokenizer, data, 10, records=records, progress=False,
                          engine=engine)
    assert [p["prediction"] for p in remote.predictions] == \
        [p["prediction"] for p in local.predictions]
    assert all(p["prediction"] for p in local.predictions)


class ScriptedEngine:
    """A rollout engine that answers the prompts, in order, with the given completion texts
    (the scorer, not generation, is what its test checks)."""

    def __init__(self, tokenizer, completions):
        self.tokenizer, self.remaining = tokenizer, list(completions)

    def sync_weights(self, model, step):
        pass

    def generate(self, model, embeds, valid, params, rng):
        from lvr_jax.model.sampler import Generation
        ids = [self.tokenizer.encode(self.remaining.pop(0)) for _ in range(embeds.shape[0])]
        tokens = np.full((len(ids), max(map(len, ids))), self.tokenizer.pad_id, np.int32)
        for row, seq in zip(tokens, ids):
            row[:len(seq)] = seq
        return Generation(tokens, np.zeros(tokens.shape, np.float32),
                          np.array([len(seq) for seq in ids]))


def test_the_scorer_decides_the_numbers_and_every_file_names_it(tokenizer, synthetic_set,
                                                                tmp_path):
    from lvr_jax.data.pipeline import DataConfig
    from lvr_jax.data.schema import load_eval_records
    from lvr_jax.eval.evaluate import evaluate
    from lvr_jax.model import PRESETS, LongVILA
    from flax import nnx

    preset = PRESETS["tiny"](vocab_size=tokenizer.vocab_size)
    model = LongVILA(preset.replace(video_token_id=tokenizer.video_id,
                                    newline_token_id=tokenizer.newline_id), rngs=nnx.Rngs(0))
    data = DataConfig(records=f"{synthetic_set}/test_eval.jsonl", video_root=synthetic_set,
                      num_frames=4, frame_size=model.config.vision.image_size, batch_size=2,
                      num_workers=0)
    records = load_eval_records(data.records)[:4]
    other = {"A": "B", "B": "C", "C": "D", "D": "A"}
    completions = [f"<think>x</think><answer>{records[0].answer}</answer>",  # both right
                   f"<think>x</think><answer>{records[1].answer.lower()}</answer>",  # math only
                   f"<think>x</think><answer>\n{records[2].answer}\n</answer>",  # math only
                   f"<think>x</think><answer>{other[records[3].answer]}</answer>"]  # neither
    rows = []
    for name in ("math", "official"):
        result = evaluate(model, tokenizer, data, 4, records=records, progress=False,
                          engine=ScriptedEngine(tokenizer, completions), scorer=name)
        assert [p["prediction"] for p in result.predictions] == completions
        setting = report.Setting(f"{tmp_path}/ckpt-{name}", 4, True)
        rows.append(report.write_setting(str(tmp_path / "eval"), setting, result))
        saved = json.loads((tmp_path / "eval" / f"{setting.label}.json").read_text())
        assert saved["scorer"] == name and saved["accuracy"] == result.accuracy
    assert [r["accuracy"] for r in rows] == [0.75, 0.25]
    assert rows[1]["unparseable"] == 2  # "b" and the span with line breaks are no letter
    report.write_comparison(str(tmp_path / "eval"), rows)
    table = (tmp_path / "eval" / "results.md").read_text().splitlines()
    assert table[0].startswith("**Accuracy, scorer: math (") and "; official (" in table[0]
    assert [line.split(" | ")[3:5] for line in table[4:]] == [["math", "**75.0%**"],
                                                              ["official", "**25.0%**"]]

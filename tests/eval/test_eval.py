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
    with open(f"{synthetic_set}/test_eval.jsonl") as f:  # three questions, then a broken one
        rows = [json.loads(line) for line in f][:4]
    rows[3]["videos"] = "videos/missing.mp4"
    records = tmp_path / "test_eval.jsonl"
    records.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cmd = [sys.executable, "-m", "lvr_jax.eval", "--config=configs/demo.py:sft",
           f"--config.eval.records={records}",
           f"--config.data.video_root={synthetic_set}", "--config.eval.max_new_tokens=12",
           f"--checkpoint={checkpoint}", "--num_frames=4,8", "--think=on,off",
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
        assert (saved["questions"], saved["answered"], saved["skipped"]) == (4, 3, 1)
        assert saved["skipped_records"][0]["record"] == "line 4 of test_eval.jsonl"
        assert f"{label}: " in run.stderr  # the log line of each setting
    assert run.stderr.count("(answered 3 of 4, 1 skipped; ") == len(labels)
    assert run.stderr.count("; skipped: 1 bad_video (listed in results.md") == len(labels)
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 4 + len(labels) + 4  # and the skipped question under the table
    assert table[0].startswith("**Accuracy, scorer: official (")
    settings = table[4:4 + len(labels)]
    assert all(line.split(" | ")[3] == "official" for line in settings)
    assert all(line.endswith("| answered 3 of 4, 1 skipped |") for line in settings)
    assert table[-2] == f"- {', '.join(labels)}: 1 of 4 skipped (1 bad_video)"
    missing = f"{synthetic_set}/videos/missing.mp4"
    assert table[-1].startswith(f"  - id {rows[3]['id']}: video '{missing}' does not exist")
    assert table[-1].endswith("(line 4 of test_eval.jsonl)")
    assert "\n".join(table) in run.stdout  # the printed table is the file's
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


def tiny_random_model(tokenizer):
    """The tiny preset with random weights (what it answers, the scripted engine decides)."""
    from flax import nnx

    from lvr_jax.model import PRESETS, LongVILA

    preset = PRESETS["tiny"](vocab_size=tokenizer.vocab_size)
    return LongVILA(preset.replace(video_token_id=tokenizer.video_id,
                                   newline_token_id=tokenizer.newline_id), rngs=nnx.Rngs(0))


def test_skipped_questions_are_counted_and_listed_in_every_file(tokenizer, synthetic_set,
                                                                tmp_path):
    import dataclasses

    from lvr_jax.data.pipeline import DataConfig
    from lvr_jax.data.schema import load_eval_records
    from lvr_jax.eval.evaluate import evaluate
    from lvr_jax.eval.runner import skip_reasons

    model = tiny_random_model(tokenizer)
    (tmp_path / "empty.mp4").write_bytes(b"")
    records = load_eval_records(f"{synthetic_set}/test_eval.jsonl")[:4]
    records[1] = dataclasses.replace(records[1], video="videos/missing.mp4")
    records[3] = dataclasses.replace(records[3], video=str(tmp_path / "empty.mp4"))
    data = DataConfig(records=f"{synthetic_set}/train.jsonl", video_root=synthetic_set,
                      num_frames=4, frame_size=model.config.vision.image_size, batch_size=2,
                      num_workers=0)
    answers = [f"<answer>{r.answer}</answer>" for r in (records[0], records[2])]
    result = evaluate(model, tokenizer, data, 4, records=records, progress=False,
                      engine=ScriptedEngine(tokenizer, answers))
    assert (result.answered, result.questions, result.accuracy) == (2, 4, 1.0)
    assert [(s["id"], s["record"], s["reason"]) for s in result.skipped] == [
        (records[1].id, "line 2 of test_eval.jsonl", "bad_video"),
        (records[3].id, "line 4 of test_eval.jsonl", "bad_video")]
    assert "missing.mp4' does not exist" in result.skipped[0]["message"]
    assert "is empty (0 bytes)" in result.skipped[1]["message"]
    assert result.counts() == "answered 2 of 4, 2 skipped"
    assert skip_reasons(result).startswith("; skipped: 2 bad_video")

    setting = report.Setting(str(tmp_path / "ckpt"), 4, True)
    row = report.write_setting(str(tmp_path / "eval"), setting, result)
    saved = json.loads((tmp_path / "eval" / f"{setting.label}.json").read_text())
    assert (saved["questions"], saved["answered"], saved["skipped"]) == (4, 2, 2)
    assert saved["skipped_records"] == result.skipped and len(saved["predictions"]) == 2
    report.write_comparison(str(tmp_path / "eval"), [row, {**row, "think": False}])
    table = (tmp_path / "eval" / "results.md").read_text()
    assert table.count("| answered 2 of 4, 2 skipped |") == 2
    assert ("- ckpt-4f-think, ckpt-4f-direct: 2 of 4 skipped (2 bad_video)\n"
            f"  - id {records[1].id}: video '{synthetic_set}/videos/missing.mp4' does not "
            "exist") in table
    assert json.loads((tmp_path / "eval" / "results.json").read_text())[0]["skipped"] == 2


def test_a_long_skipped_list_says_how_many_more():
    skipped = [{"id": None, "record": f"line {k} of e.jsonl", "reason": "bad_video",
                "message": f"video 'v{k}.mp4' does not exist (line {k} of e.jsonl)"}
               for k in range(1, 26)]
    result = EvalResult([prediction("Temporal", True)], skipped=skipped)
    row = {**report.summary(result), "checkpoint": "runs/x/model", "num_frames": 16, "think": True}
    lines = report.markdown_table([row]).splitlines()
    assert "answered 1 of 26, 25 skipped" in lines[4]
    assert lines[-1] == "  - ... and 5 more (all in x-16f-think.json)"
    assert lines[-2] == "  - video 'v20.mp4' does not exist (line 20 of e.jsonl)"


def test_evaluation_errors_name_the_evaluation_records_not_the_training_ones(
        tokenizer, synthetic_set, tmp_path):
    from lvr_jax.data.pipeline import DataConfig
    from lvr_jax.data.schema import load_eval_records
    from lvr_jax.data.skipping import NoUsableRecordsError
    from lvr_jax.eval.evaluate import evaluate

    model = tiny_random_model(tokenizer)
    wrong_root = str(tmp_path / "not_the_videos")
    data = DataConfig(records=f"{synthetic_set}/train.jsonl", video_root=wrong_root,
                      num_frames=4, frame_size=model.config.vision.image_size, batch_size=2,
                      num_workers=0)  # as build.data_config makes it: the training records
    records = load_eval_records(f"{synthetic_set}/test_eval.jsonl")[:3]
    with pytest.raises(NoUsableRecordsError) as error:
        evaluate(model, tokenizer, data, 4, records=records, progress=False,
                 engine=ScriptedEngine(tokenizer, []))
    message = str(error.value)
    assert f"epoch 0 of {synthetic_set}/test_eval.jsonl (video_root {wrong_root!r})" in message
    assert "train.jsonl" not in message and "all 3 were skipped" in message

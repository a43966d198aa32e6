"""The whole pipeline over HTTP against a small real OpenAI-compatible server on loopback."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from lvr_jax.data.schema import CATEGORIES, load_train_records
from lvr_jax.datagen.client import RetryPolicy
from lvr_jax.datagen.pipeline import check_config, run
from lvr_jax.datagen.summary import format_summary
from tests.datagen.helpers import pipeline_config, read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
VIDEOS = ["synth_00000.mp4", "synth_00001.mp4", "synth_00002.mp4"]


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")


def test_videos_become_training_records_split_by_video(videos_dir, out_dir, server):
    base_url, script = server
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    train, val = (os.path.join(out_dir, f"{s}.jsonl") for s in ("train", "val"))
    loaded = load_train_records([train, val])
    assert len(loaded) == 12 and sorted({r.video for r in loaded}) == VIDEOS
    assert {r.category for r in loaded} == set(CATEGORIES)
    assert all(r.ground_truth == "B" and "\nD. event 3" in r.problem for r in loaded)
    train_videos = {r["videos"] for r in read_jsonl(train)}
    val_videos = {r["videos"] for r in read_jsonl(val)}
    assert train_videos and val_videos and not train_videos & val_videos
    assert summary["run"] == {"found": 3, "skipped": 0, "finished": 3, "failed": 0, "kept": 12,
                              "errors": {}, "stopped": None}
    assert summary["clips_captioned"] == 9 and summary["rejected"] == {}
    assert "kept Temporal (train / val)" in format_summary(summary)


def test_captioner_sends_frames_and_the_prompt_carries_timestamps(videos_dir, out_dir, server):
    base_url, script = server
    run(pipeline_config(videos_dir, out_dir, base_url, frames_per_clip=3))
    caption = script.caption_requests()[0]["messages"][-1]["content"]
    images = [p["image_url"]["url"] for p in caption if p["type"] == "image_url"]
    assert len(images) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in images)
    prompt = script.reasoning_requests()[0]["messages"][-1]["content"]
    assert "[0:00-0:10] A clip seen through 3 frames" in prompt and "[0:20-0:24]" in prompt
    assert "1 Temporal, 1 Goal & Purpose, 1 Plot & Narrative, 1 Spatial" in prompt
    assert all(r["model"] == "fake-llm" for r in script.requests)  # found at GET /v1/models
    state = json.load(open(os.path.join(out_dir, "done", "synth_00000.mp4.json")))
    assert [(c["start"], c["end"]) for c in state["clips"]] == [(0, 10), (10, 20), (20, 24)]


def test_rerun_skips_done_videos_and_redoes_a_removed_one(videos_dir, out_dir, server):
    base_url, script = server
    config = pipeline_config(videos_dir, out_dir, base_url)
    run(config)
    before = len(script.requests)
    again = run(config)
    assert len(script.requests) == before and again["run"]["skipped"] == 3
    os.remove(os.path.join(out_dir, "done", "synth_00001.mp4.json"))
    third = run(config)
    assert third["run"]["finished"] == 1 and len(script.caption_requests()) == 9 + 3
    assert len(load_train_records([os.path.join(out_dir, "train.jsonl"),
                                   os.path.join(out_dir, "val.jsonl")])) == 12


def test_transient_http_errors_are_retried(videos_dir, out_dir, server):
    base_url, script = server
    script.fail_statuses = [503, 429, 500]
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    assert summary["run"]["finished"] == 3 and summary["run"]["failed"] == 0


def test_endpoint_that_keeps_failing_leaves_the_video_for_the_next_run(videos_dir, out_dir,
                                                                       server):
    base_url, script = server
    script.fail_statuses = [400]  # refused requests are not retried
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    assert summary["run"]["failed"] == 1 and summary["run"]["finished"] == 2
    (error,) = summary["run"]["errors"].values()
    assert "HTTP 400" in error and base_url in error
    assert len(os.listdir(os.path.join(out_dir, "done"))) == 2
    assert run(pipeline_config(videos_dir, out_dir, base_url))["run"]["finished"] == 1


def test_malformed_replies_are_retried_then_skipped_and_counted(videos_dir, out_dir, server):
    base_url, script = server
    junk = ['{"questions": [{"category": "Temporal", "question": "Wh',  # truncated
            "Sure! Here are some questions.", '{"items": []}']
    script.reasoning_replies = junk + ["no json at all"]  # video 0: 3 bad tries; video 1: 1
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    rejected = read_jsonl(os.path.join(out_dir, "rejected.jsonl"))
    assert [(r["video"], r["reason"]) for r in rejected] == [("synth_00000.mp4", "wrong_shape")]
    assert "after 3 tries" in rejected[0]["detail"] and rejected[0]["item"] == '{"items": []}'
    assert summary["videos_by_status"] == {"malformed_reply": 1, "done": 2}
    assert summary["reply_retries"] == 2 + 1 and summary["run"]["kept"] == 8


def test_bad_questions_and_bad_videos_are_logged_with_reasons(videos_dir, out_dir, server):
    base_url, script = server
    with open(os.path.join(videos_dir, "zz_broken.mp4"), "wb") as f:
        f.write(b"not a video at all")
    good = {"category": "Spatial", "question": "Where?", "options": ["a", "b", "c", "d"],
            "reasoning": "Because at 0:05 ...", "answer": "C"}
    items = [good, dict(good, options=["a", "b", "c"]), dict(good, question="Where else?",
             options=["a", "a", "c", "d"]), dict(good, question="Q3", answer="E"),
             dict(good, question="Q4", reasoning=""), dict(good), dict(good, category="Mood"),
             dict(good, question="Another spatial one?")]
    script.reasoning_replies = [json.dumps({"questions": items})]
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    assert summary["rejected"] == {
        "bad_answer_letter": 1, "bad_video": 1, "duplicate_options": 1, "duplicate_question": 1,
        "empty_reasoning": 1, "not_four_options": 1, "over_target": 1, "unknown_category": 1}
    rejected = read_jsonl(os.path.join(out_dir, "rejected.jsonl"))
    bad_video = next(r for r in rejected if r["reason"] == "bad_video")
    assert bad_video["video"] == "zz_broken.mp4" and "zz_broken.mp4" in bad_video["detail"]
    assert summary["videos_by_status"] == {"done": 3, "bad_video": 1}


def test_requests_in_flight_stay_under_the_concurrency_limit(videos_dir, out_dir, server):
    base_url, script = server
    script.delay_seconds = 0.1
    run(pipeline_config(videos_dir, out_dir, base_url, concurrency=2, videos_in_flight=2))
    # the limit is per endpoint: 3 clips asked at once, 2 answered at a time
    assert script.max_in_flight["caption"] == 2 and script.max_in_flight["reasoning"] <= 2


def test_backoff_doubles_with_jitter_and_a_cap():
    import random

    policy, rng = RetryPolicy(retries=5, backoff_seconds=1.0), random.Random(0)
    delays = [policy.delay(attempt, rng) for attempt in range(8)]
    assert all(0.5 * min(60, 2**a) <= d <= min(60, 2**a) for a, d in enumerate(delays))


def test_config_errors_name_the_field(tmp_path):
    config = pipeline_config(str(tmp_path), str(tmp_path / "out"), "http://127.0.0.1:9/v1")
    config.caption.backend = "clip"
    with pytest.raises(ValueError, match="caption.backend"):
        check_config(config)
    config.caption.backend, config.caption.checkpoint = "embedded", ""
    with pytest.raises(ValueError, match="caption.checkpoint"):
        check_config(config)
    config.caption.checkpoint = str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="caption.checkpoint '.*ckpt' is not a folder"):
        check_config(config)
    config.caption.checkpoint, config.category_targets.temporal = str(tmp_path), -1
    with pytest.raises(ValueError, match="category_targets"):
        check_config(config)
    config.videos_dir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing' is not a directory"):
        check_config(config)


def test_crash_mid_video_loses_only_that_video(videos_dir, out_dir, server):
    base_url, script = server
    script.hold_reasoning_request = 2  # the second video's question request never returns
    command = [sys.executable, "-m", "lvr_jax.datagen", "--config=lvr_jax/datagen/config.py",
               f"--config.videos_dir={videos_dir}", f"--config.out_dir={out_dir}",
               "--config.frames_per_clip=2", "--config.frame_size=32",
               "--config.caption.backend=openai", f"--config.caption.base_url={base_url}",
               f"--config.reasoning.base_url={base_url}", "--config.val_fraction=0.34",
               "--config.progress=False"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert script.held.wait(120), process.communicate(timeout=60)[0].decode()[-3000:]
    finally:
        process.kill()  # SIGKILL: no clean-up code runs
        process.wait()
    assert os.listdir(os.path.join(out_dir, "done")) == ["synth_00000.mp4.json"]
    script.hold_reasoning_request = None
    summary = run(pipeline_config(videos_dir, out_dir, base_url))
    assert (summary["run"]["skipped"], summary["run"]["finished"]) == (1, 2)
    assert len(script.caption_requests()) == 3 + 3 + 6  # video 1 is captioned again, 0 is not
    assert len(load_train_records([os.path.join(out_dir, "train.jsonl"),
                                   os.path.join(out_dir, "val.jsonl")])) == 12


def test_embedded_captioner_feeds_the_reasoning_prompt(videos_dir, out_dir, server,
                                                       tiny_checkpoint):
    base_url, script = server
    summary = run(pipeline_config(videos_dir, out_dir, base_url, **{
        "caption.backend": "embedded", "caption.checkpoint": tiny_checkpoint,
        "caption.max_tokens": 6, "caption.batch_size": 2}))
    assert summary["run"]["kept"] == 12 and script.caption_requests() == []
    state = json.load(open(os.path.join(out_dir, "done", "synth_00002.mp4.json")))
    captions = [c["caption"] for c in state["clips"]]
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    prompt = script.reasoning_requests()[-1]["messages"][-1]["content"]
    assert f"[0:20-0:24] {' '.join(captions[2].split())}".strip() in prompt

"""grain pipelines on real files: batches, worker processes, bad videos, shuffling, resuming."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lvr_jax.data import templates
from lvr_jax.data.frame_cache import FrameCache
from lvr_jax.data.pipeline import (DataConfig, eval_dataset, rl_dataset, sft_dataset,
                                   training_records)
from lvr_jax.data.schema import load_train_records
from lvr_jax.data.skipping import NoUsableRecordsError
from lvr_jax.data.video import BadVideoError
from tests.data.conftest import BAD_VIDEOS, train_row, write_faststart_mp4, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(records: str, video_root: str, **changes) -> DataConfig:
    base = DataConfig(records=records, video_root=video_root, num_frames=16, frame_size=32,
                      batch_size=2, max_length=1024, num_workers=0, drop_remainder=False)
    return dataclasses.replace(base, **changes)


def _run(dataset) -> list[dict]:
    iterator = iter(dataset)
    try:
        return list(iterator)
    finally:
        iterator.close()


def _records(batches: list[dict]) -> list[str]:
    return [origin for batch in batches for origin in batch["record"]]


@pytest.fixture
def mixed_records(tmp_path, video_dir) -> str:
    """Good videos (mp4, webm) mixed with every bad kind; line k holds the k-th video."""
    videos = ["good.mp4", "missing.mp4", "good.webm", "empty.mp4", "truncated.mp4", "good2.mp4",
              "truncated_index_first.mp4", "not_a_video.mp4", "short.mp4", "faststart.mp4"]
    return write_jsonl(str(tmp_path / "train.jsonl"), [train_row(v) for v in videos])


def test_sft_batch_holds_tokens_loss_mask_and_frames(tmp_path, video_dir, tokenizer):
    rows = [train_row("good.mp4", "B"), train_row("good2.mp4", "C", "Why? " * 30)]
    config = _config(write_jsonl(str(tmp_path / "t.jsonl"), rows), video_dir, shuffle=False)
    (batch,) = _run(sft_dataset(config, tokenizer))
    length = batch["input_ids"].shape[1]
    assert length in config.buckets and batch["input_ids"].dtype == np.int32
    assert batch["loss_mask"].shape == batch["token_mask"].shape == (2, length)
    assert batch["frames"].shape == (2, 16, 32, 32, 3) and batch["frames"].dtype == np.uint8
    assert batch["frame_indices"].tolist()[1] == np.floor(np.linspace(0, 23, 16)).astype(int).tolist()
    for row, letter in enumerate("BC"):
        ids, mask = batch["input_ids"][row], batch["loss_mask"][row]
        assert tokenizer.decode(ids[mask == 1]).endswith(f"<answer>{letter}</answer><|im_end|>")
        assert (ids[batch["token_mask"][row] == 0] == tokenizer.pad_id).all()
        assert int((ids == tokenizer.video_id).sum()) == 1
    assert len(set(batch["video_key"])) == 2 and batch["record"] == ["line 1 of t.jsonl",
                                                                     "line 2 of t.jsonl"]


def test_worker_processes_give_the_same_batches(synthetic_dir, tokenizer):
    config = _config(os.path.join(synthetic_dir, "train.jsonl"), synthetic_dir, num_frames=8,
                     batch_size=4, drop_remainder=True)
    in_process = _run(sft_dataset(config, tokenizer))
    in_workers = _run(sft_dataset(dataclasses.replace(config, num_workers=2), tokenizer))
    assert _records(in_process) == _records(in_workers)
    for a, b in zip(in_process, in_workers):
        np.testing.assert_array_equal(a["frames"], b["frames"])
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_bad_videos_are_skipped_and_counted_in_worker_processes(mixed_records, video_dir,
                                                                tokenizer, caplog):
    reports = []
    config = _config(mixed_records, video_dir, num_workers=2, shuffle=False)
    with caplog.at_level(logging.WARNING):
        batches = _run(sft_dataset(config, tokenizer, on_epoch_end=reports.append))
    assert _records(batches) == [f"line {k} of train.jsonl" for k in (1, 3, 6, 10)]
    (report,) = reports
    assert (report.records, report.skipped, report.num_skipped) == (10, {"bad_video": 6}, 6)
    for name, words in BAD_VIDEOS.items():
        line = 1 + ["good.mp4", "missing.mp4", "good.webm", "empty.mp4", "truncated.mp4",
                    "good2.mp4", "truncated_index_first.mp4", "not_a_video.mp4",
                    "short.mp4"].index(name)
        (message,) = [m for m in report.messages if f"{name}'" in m]
        assert words.split(" (")[0] in message and f"(line {line} of train.jsonl)" in message
    assert "epoch 0: 6 of 10 records skipped (6 bad_video)" in caplog.text


def test_bad_video_stops_the_run_when_the_policy_is_error(mixed_records, video_dir, tokenizer):
    config = _config(mixed_records, video_dir, num_workers=2, shuffle=False, on_bad_video="error")
    with pytest.raises(BadVideoError) as error:
        _run(sft_dataset(config, tokenizer))
    message = str(error.value)
    assert "missing.mp4' does not exist" in message and "(line 2 of train.jsonl)" in message
    assert "on_bad_video='error'" in message


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_each_bad_video_kind_under_both_policies(tmp_path, video_dir, tokenizer, name):
    records = write_jsonl(str(tmp_path / "r.jsonl"), [train_row(v) for v in
                                                      ("good.mp4", name, "good2.mp4")])
    reports = []
    batches = _run(sft_dataset(_config(records, video_dir, shuffle=False), tokenizer,
                               on_epoch_end=reports.append))
    assert _records(batches) == ["line 1 of r.jsonl", "line 3 of r.jsonl"]
    assert reports[0].skipped == {"bad_video": 1}
    with pytest.raises(BadVideoError, match=f"{name}' .*\\(line 2 of r.jsonl\\)"):
        _run(sft_dataset(_config(records, video_dir, on_bad_video="error"), tokenizer))


def test_too_long_records_are_skipped_and_counted(tmp_path, video_dir, tokenizer):
    rows = [train_row("good.mp4"), train_row("good.mp4", "A", "Why? " * 400)]
    reports = []
    config = _config(write_jsonl(str(tmp_path / "t.jsonl"), rows), video_dir, max_length=256)
    batches = _run(sft_dataset(config, tokenizer, on_epoch_end=reports.append))
    assert _records(batches) == ["line 1 of t.jsonl"]
    assert reports[0].skipped == {"too_long": 1} and "exceed max_length 256" in reports[0].messages[0]


def test_each_epoch_is_a_seeded_shuffle_of_every_record(synthetic_dir, tokenizer):
    config = _config(os.path.join(synthetic_dir, "train.jsonl"), synthetic_dir, num_frames=4,
                     num_epochs=2, seed=5)
    order = _records(_run(sft_dataset(config, tokenizer)))
    n = len(load_train_records(config.records))
    first, second = order[:n], order[n:]
    assert sorted(first) == sorted(second) and len(set(first)) == n and first != second
    assert _records(_run(sft_dataset(config, tokenizer))) == order
    other_seed = _records(_run(sft_dataset(dataclasses.replace(config, seed=6), tokenizer)))
    assert other_seed != order


def test_shards_partition_the_records(synthetic_dir, tokenizer):
    config = _config(os.path.join(synthetic_dir, "val.jsonl"), synthetic_dir, num_frames=4)
    shards = [_records(_run(sft_dataset(dataclasses.replace(config, shard_index=i, shard_count=2),
                                        tokenizer))) for i in range(2)]
    everything = _records(_run(sft_dataset(config, tokenizer)))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_rl_batch_left_pads_prompts_and_keeps_the_ground_truth(synthetic_dir, tokenizer):
    config = _config(os.path.join(synthetic_dir, "val.jsonl"), synthetic_dir, num_frames=4,
                     batch_size=3, length_buckets=(128, 256, 512), shuffle=False)
    batch = _run(rl_dataset(config, tokenizer))[0]
    records = load_train_records(config.records)[:3]
    assert batch["ground_truth"] == [r.ground_truth for r in records]
    assert batch["prompt_ids"].shape[1] in (128, 256, 512)
    for row, record in enumerate(records):
        ids, mask = batch["prompt_ids"][row], batch["prompt_mask"][row]
        assert mask[-1] == 1 and (np.diff(mask) >= 0).all()  # padding on the left only
        assert tokenizer.decode(ids[mask == 1]) == templates.chat_prompt(record.problem)


def test_categories_keep_only_their_records(synthetic_dir, tokenizer, tmp_path):
    """data.categories (any spelling the schema takes) leaves the other categories out; a
    choice no record has is refused, naming the file."""
    path = os.path.join(synthetic_dir, "train.jsonl")
    config = _config(path, synthetic_dir, categories=("goal", "Temporal"))
    kept = training_records(config)
    assert {r.category for r in kept} == {"Goal & Purpose", "Temporal"}
    assert len(kept) == sum(r.category in ("Goal & Purpose", "Temporal")
                            for r in load_train_records(path))
    truths = {r.ground_truth for r in kept}
    batch = _run(rl_dataset(dataclasses.replace(config, batch_size=4, num_frames=4,
                                                shuffle=False), tokenizer))[0]
    assert set(batch["ground_truth"]) <= truths
    temporal = tmp_path / "temporal.jsonl"
    temporal.write_text("".join(line for line in open(path) if '"temporal"' in line))
    with pytest.raises(ValueError, match=r"temporal\.jsonl has a category in data.categories"):
        training_records(dataclasses.replace(config, records=str(temporal),
                                             categories=("spatial",)))
    with pytest.raises(ValueError, match="'nonsense'; expected one of"):
        training_records(dataclasses.replace(config, categories=("nonsense",)))


def test_a_record_file_smaller_than_one_batch_is_refused(synthetic_dir, tokenizer):
    # With drop_remainder every epoch would end before its first batch: a run that never ends.
    path = os.path.join(synthetic_dir, "val.jsonl")
    config = _config(path, synthetic_dir, batch_size=64, drop_remainder=True)
    with pytest.raises(ValueError, match=r"val\.jsonl: \d records, fewer than one batch"):
        rl_dataset(config, tokenizer)


def test_eval_reads_every_record_once_in_file_order(synthetic_dir, tokenizer):
    config = _config(os.path.join(synthetic_dir, "test_eval.jsonl"), synthetic_dir, num_frames=4,
                     batch_size=3, drop_remainder=True, num_epochs=None)
    batches = _run(eval_dataset(config, tokenizer))
    with open(config.records) as f:
        rows = [json.loads(line) for line in f]
    assert [a for b in batches for a in b["answer"]] == [r["answer"] for r in rows]
    assert [c for b in batches for c in b["category"]] == [r["category"] for r in rows]
    assert all(len(options) == 4 for b in batches for options in b["options"])


def test_frame_cache_is_filled_by_the_first_epoch(synthetic_dir, tokenizer, tmp_path):
    config = _config(os.path.join(synthetic_dir, "val.jsonl"), synthetic_dir, num_frames=4,
                     cache_dir=str(tmp_path / "frames"), num_epochs=2)
    batches = _run(sft_dataset(config, tokenizer))
    videos = {r.video for r in load_train_records(config.records)}
    assert len(FrameCache(config.cache_dir)) == len(videos)
    keys = {}
    for batch in batches:
        for origin, key in zip(batch["record"], batch["video_key"]):
            assert keys.setdefault(origin, key) == key  # decoded and cached frames agree


def test_restored_iterator_in_a_fresh_process_continues_with_the_next_record(
        synthetic_dir, video_dir, tokenizer, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(synthetic_dir, "train.jsonl"))][:11]
    rows.insert(5, train_row(os.path.join(video_dir, "empty.mp4")))
    config = _config(write_jsonl(str(tmp_path / "t.jsonl"), rows), synthetic_dir, num_frames=4,
                     num_workers=2, num_epochs=2, drop_remainder=True, seed=1)
    reports = []
    whole = _run(sft_dataset(config, tokenizer, on_epoch_end=reports.append))
    iterator = iter(sft_dataset(config, tokenizer))
    head = [next(iterator)["record"] for _ in range(4)]
    (tmp_path / "state.json").write_text(json.dumps(iterator.get_state()))
    iterator.close()
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    subprocess.run([sys.executable, "-m", "tests.data.resume_pipeline", str(tmp_path / "config.json"),
                    str(tmp_path / "state.json"), str(tmp_path / "out.json")],
                   cwd=REPO, check=True, timeout=300)
    resumed = json.loads((tmp_path / "out.json").read_text())
    assert head + resumed["batches"] == [batch["record"] for batch in whole]
    assert resumed["reports"] == [[r.epoch, r.records, r.skipped] for r in reports]
    assert reports[0].skipped == {"bad_video": 1} and reports[0].records == 12


def test_config_rejects_unknown_policies():
    with pytest.raises(ValueError, match="on_bad_video must be 'skip' or 'error'"):
        DataConfig(on_bad_video="ignore")
    with pytest.raises(ValueError, match="video_backend"):
        DataConfig(video_backend="opencv")


def test_a_run_whose_records_are_all_bad_stops_naming_file_and_root(tmp_path, video_dir,
                                                                     tokenizer):
    records = write_jsonl(str(tmp_path / "t.jsonl"), [train_row("good.mp4")] * 4)
    wrong_root = os.path.join(video_dir, "one_too_deep")
    config = _config(records, wrong_root, num_epochs=None)  # forever: must not spin
    with pytest.raises(NoUsableRecordsError) as error:
        _run(sft_dataset(config, tokenizer))
    message = str(error.value)
    assert "epoch 0" in message and records in message and wrong_root in message
    assert "all 4 were skipped" in message and "does not exist" in message


def test_read_ahead_is_bounded_by_the_config(tmp_path, video_dir, tokenizer, monkeypatch):
    from lvr_jax.data import pipeline

    decoded = []
    real_read = pipeline.read_frames
    monkeypatch.setattr(pipeline, "read_frames",
                        lambda *args: decoded.append(args[0]) or real_read(*args))
    records = write_jsonl(str(tmp_path / "t.jsonl"), [train_row("good.mp4")] * 40)
    config = _config(records, video_dir, num_epochs=None, batch_size=2)
    iterator = iter(sft_dataset(config, tokenizer))
    next(iterator)
    time.sleep(2.0)  # a consumer that stops: the pipeline must not keep decoding
    iterator.close()
    assert 2 <= len(decoded) <= config.examples_in_flight == 2 + 2 + 2


def test_memory_bound_scales_with_workers_and_batch():
    config = DataConfig(batch_size=8, num_workers=4, worker_buffer_size=2, num_frames=256,
                        frame_size=448)
    assert (config.read_options.num_threads, config.read_options.prefetch_buffer_size) == (1, 2)
    assert config.examples_in_flight == 4 * (1 + 2) + 4 * 2 + 8
    assert config.example_bytes == 256 * 448 * 448 * 3
    explicit = dataclasses.replace(config, read_threads=3, read_buffer=5)
    assert explicit.examples_in_flight == 4 * (3 + 5) + 4 * 2 + 8


@pytest.fixture(scope="module")
def huge_video_set(tmp_path_factory, video_dir) -> str:
    """Seven good records and, at line 4, one 4096 x 4096 video of 16 frames."""
    root = tmp_path_factory.mktemp("huge")
    frames = np.zeros((16, 4096, 4096, 3), np.uint8)
    for i in range(16):
        frames[i] = 13 * i
    write_faststart_mp4(str(root / "huge.mp4"), frames)
    os.symlink(os.path.join(video_dir, "good.mp4"), root / "good.mp4")
    rows = [train_row(video) for video in ["good.mp4"] * 3 + ["huge.mp4"] + ["good.mp4"] * 4]
    return write_jsonl(str(root / "t.jsonl"), rows)


def _read_in_a_fresh_process(config: DataConfig, tmp_path) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    out = subprocess.run([sys.executable, "-m", "tests.data.read_under_memory",
                          str(tmp_path / "config.json")], cwd=REPO, check=True, timeout=300,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("max_video_pixels", [4096 * 2160, 0])
def test_a_4096_pixel_video_is_read_under_a_memory_cap(huge_video_set, tmp_path, tokenizer,
                                                       max_video_pixels):
    """Over the pixel budget it is skipped and counted; without a budget the decoder scales it
    (native-resolution decoding peaked at 2.2 GB here)."""
    config = _config(huge_video_set, os.path.dirname(huge_video_set), frame_size=448,
                     shuffle=False, max_video_pixels=max_video_pixels)
    out = _read_in_a_fresh_process(config, tmp_path)
    assert out["peak_rss_mb"] < 1000
    good = [f"line {k} of t.jsonl" for k in (1, 2, 3, 5, 6, 7, 8)]
    if max_video_pixels:
        assert out["kept"] == good and out["skipped"] == [{"bad_video": 1}]
        (message,) = out["messages"][0]
        assert "huge.mp4' is 4096x4096" in message and "data.max_video_pixels" in message
    else:
        assert sorted(out["kept"]) == sorted(good + ["line 4 of t.jsonl"])
        assert out["frame_shapes"] == [[16, 448, 448, 3]]


def test_the_epoch_report_says_how_many_reasons_it_left_out(tmp_path, video_dir, tokenizer,
                                                            caplog):
    rows = [train_row("good.mp4")] + [train_row(f"missing_{k}.mp4") for k in range(25)]
    reports = []
    config = _config(write_jsonl(str(tmp_path / "t.jsonl"), rows), video_dir, shuffle=False,
                     num_frames=4)
    with caplog.at_level(logging.WARNING):
        _run(sft_dataset(config, tokenizer, on_epoch_end=reports.append))
    (report,) = reports
    assert len(report.messages) == 20 and report.num_skipped == 25
    assert str(report).endswith("(line 21 of t.jsonl)\n  ... and 5 more")
    assert "... and 5 more" in caplog.text


def test_records_handed_in_are_named_by_their_own_file(synthetic_dir, tokenizer, tmp_path):
    # evaluation passes its records with the training settings, whose records are train.jsonl
    from lvr_jax.data.schema import load_eval_records

    evaluation = os.path.join(synthetic_dir, "test_eval.jsonl")
    config = _config(os.path.join(synthetic_dir, "train.jsonl"), str(tmp_path), num_frames=4)
    with pytest.raises(NoUsableRecordsError) as error:
        _run(eval_dataset(config, tokenizer, load_eval_records(evaluation)))
    assert f"epoch 0 of {evaluation} (video_root" in str(error.value)
    assert "train.jsonl" not in str(error.value)

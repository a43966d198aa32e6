"""Video ids, discovery, the split by video and atomic state files."""

import json
import os

import pytest

from lvr_jax.data.schema import load_train_records
from lvr_jax.datagen import records
from lvr_jax.datagen.parse import Question


def test_video_ids_are_file_name_safe():
    assert records.video_id("a/b c.mp4") == "a__b_c.mp4"
    assert records.video_id("clip.webm") == "clip.webm"


def test_find_videos_lists_video_files_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "sub/a.webm", "notes.txt", "sub/c.MKV"):
        (tmp_path / name).write_bytes(b"x")
    assert records.find_videos(str(tmp_path)) == ["b.mp4", "sub/a.webm", "sub/c.MKV"]
    assert records.find_videos(str(tmp_path), "*.mp4") == ["b.mp4"]
    with pytest.raises(FileNotFoundError, match="videos_dir"):
        records.find_videos(str(tmp_path / "missing"))


def test_clashing_ids_are_refused(tmp_path):
    (tmp_path / "a b.mp4").write_bytes(b"x")
    (tmp_path / "a_b.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="share the id"):
        records.find_videos(str(tmp_path))


def test_split_is_stable_seeded_and_near_the_fraction():
    videos = [f"v{i}.mp4" for i in range(2000)]
    splits = [records.split_of(v, 0, 0.1) for v in videos]
    assert splits == [records.split_of(v, 0, 0.1) for v in videos]
    assert 0.08 < splits.count("val") / len(videos) < 0.12
    assert splits != [records.split_of(v, 1, 0.1) for v in videos]
    assert {records.split_of(v, 0, 0.0) for v in videos} == {"train"}


def test_training_records_load_with_the_schema(tmp_path):
    question = Question("Spatial", "Where is the cup?", ("Left", "Right", "Top", "Under"),
                        "At 0:20 the cup is put right of the laptop.", "B")
    row = records.training_record(question, "sub/v.mp4", "sub__v.mp4-0")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,) = load_train_records(str(path))
    assert record.problem == "Where is the cup?\nA. Left\nB. Right\nC. Top\nD. Under"
    assert record.answer == "<think>At 0:20 the cup is put right of the laptop.</think><answer>B</answer>"
    assert record.ground_truth == "B" and record.category == "Spatial" and record.video == "sub/v.mp4"


def test_state_files_are_written_whole(tmp_path):
    state = {"video": "a/b.mp4", "split": "train", "records": [], "rejected": []}
    records.write_state(str(tmp_path), state)
    assert records.is_done(str(tmp_path), "a/b.mp4")
    assert os.listdir(tmp_path / "done") == ["a__b.mp4.json"]  # no temporary file left
    assert list(records.read_states(str(tmp_path))) == [state]
    assert records.write_outputs(str(tmp_path)) == {"train": 0, "val": 0, "rejected": 0}

"""The TFDS builder writes array_record without TensorFlow; grain reads the records back."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import tensorflow_datasets  # noqa: F401  a dev dependency: missing, these tests must fail, not skip

from lvr_jax.data.pipeline import DataConfig, sft_dataset
from lvr_jax.data.schema import RecordError, load_eval_records, load_train_records
from lvr_jax.data.tfds_builder import build_tfds, tfds_records


@pytest.fixture(scope="module")
def built(synthetic_dir, tmp_path_factory) -> str:
    records = tmp_path_factory.mktemp("records")
    for name in ("train.jsonl", "test_eval.jsonl"):
        shutil.copy(os.path.join(synthetic_dir, name), records)
    return build_tfds(str(records), str(tmp_path_factory.mktemp("tfds")))


def _key(record):
    return record.origin


def test_records_read_back_through_grain_equal_the_files(built, synthetic_dir):
    assert "tensorflow" not in sys.modules
    train = sorted(tfds_records(built, "train"), key=_key)
    assert train == sorted(load_train_records(os.path.join(synthetic_dir, "train.jsonl")), key=_key)
    test_eval = sorted(tfds_records(built, "test_eval", kind="eval"), key=_key)
    expected = load_eval_records(os.path.join(synthetic_dir, "test_eval.jsonl"))
    assert test_eval == sorted(expected, key=_key)


def test_pipeline_takes_tfds_records(built, synthetic_dir, tokenizer):
    config = DataConfig(video_root=synthetic_dir, num_frames=4, frame_size=32, batch_size=4,
                        num_workers=0)
    iterator = iter(sft_dataset(config, tokenizer, records=tfds_records(built, "train")))
    batch = next(iterator)
    iterator.close()
    assert batch["frames"].shape == (4, 4, 32, 32, 3)


def test_a_bad_record_stops_the_build_with_its_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.jsonl").write_text('{"problem": "q", "videos": "v.mp4"}\n')
    with pytest.raises(RecordError, match="line 1 of train.jsonl: field 'answer' is missing"):
        build_tfds(str(tmp_path / "in"), str(tmp_path / "out"))

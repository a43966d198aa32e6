"""A tensorflow-datasets builder for LongVideo-Reason records (array_record; TensorFlow not needed).

For users who keep datasets in TFDS: `build_tfds(records_dir, data_dir)` validates every file
`<split>.jsonl|.json|.parquet` of `records_dir` and writes a TFDS dataset; `tfds_records` reads a
split back through grain as records that the pipelines take (`records=`). Videos stay files
under the video root; the dataset holds their relative paths. Needs `pip install lvr_jax[tfds]`.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import tensorflow_datasets as tfds

from lvr_jax.data.schema import (EvalRecord, TrainRecord, parse_eval_record, parse_train_record,
                                 read_rows, RecordError)
from lvr_jax.data.templates import format_question

_FORMATS = (".jsonl", ".json", ".parquet")
_TEXT_FIELDS = ("problem", "answer", "reasoning", "videos", "category", "duration", "id", "origin")


def _is_eval_row(row: Any) -> bool:
    return isinstance(row, dict) and "options" in row


def _to_example(row: dict, origin: str) -> dict[str, str]:
    """A validated row (training or evaluation format) as the builder's text features."""
    if _is_eval_row(row):
        record = parse_eval_record(row, origin)
        fields = {"problem": format_question(record.question, record.options),
                  "answer": record.answer, "category": record.category,
                  "duration": record.duration, "id": record.id}
    else:
        record = parse_train_record(row, origin)
        fields = {"problem": record.problem, "answer": record.answer, "reasoning": record.reasoning,
                  "category": record.category, "id": row.get("problem_id")}
    fields.update(videos=record.video, origin=origin)
    return {name: "" if fields.get(name) is None else str(fields[name]) for name in _TEXT_FIELDS}


class LvrRecords(tfds.core.GeneratorBasedBuilder):
    """LongVideo-Reason records read from the manual directory's `<split>.jsonl|json|parquet`."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <split>.jsonl (or .json / .parquet) record files here."

    def _info(self) -> tfds.core.DatasetInfo:
        features = {name: tfds.features.Text() for name in _TEXT_FIELDS}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        files = sorted(p for p in os.listdir(dl_manager.manual_dir) if p.endswith(_FORMATS))
        if not files:
            raise RecordError(f"no {'/'.join(_FORMATS)} record files in {dl_manager.manual_dir}")
        return {os.path.splitext(name)[0]: self._generate_examples(dl_manager.manual_dir / name)
                for name in files}

    def _generate_examples(self, path):
        for number, (origin, row) in enumerate(read_rows(os.fspath(path))):
            if isinstance(row, RecordError):
                raise row
            yield number, _to_example(row, origin)


def build_tfds(records_dir: str, data_dir: str) -> str:
    """Validates and writes the records of `records_dir` as a TFDS dataset; returns its directory."""
    config = tfds.download.DownloadConfig(manual_dir=records_dir)
    builder = LvrRecords(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=config)
    return os.fspath(builder.data_dir)


def _decode(example: dict[str, Any]) -> dict[str, Any]:
    row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
    return {k: v for k, v in row.items() if v != ""}


class _ToRecord:
    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, example: dict[str, Any]) -> TrainRecord | EvalRecord:
        row = _decode(example)
        origin = row.pop("origin", "tfds example")
        parse = parse_train_record if self.kind == "train" else parse_eval_record
        return parse(row, origin)


def tfds_records(dataset_dir: str, split: str, kind: str = "train") -> grain.MapDataset:
    """A split of a built dataset as a grain MapDataset of TrainRecord (kind='train') or EvalRecord."""
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    source = tfds.builder_from_directory(dataset_dir).as_data_source()[split]
    return grain.MapDataset.source(source).map(_ToRecord(kind))

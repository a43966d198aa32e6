"""Record formats of LongVideo-Reason (training and evaluation) and their validation.

Training records: `problem`, `answer` (may hold `<think>..</think><answer>X</answer>`),
`videos` (a path relative to the video root, or a one-element list), optional `reasoning`.
Evaluation records: `question`, `options` (four), `answer` (a letter), `category`, optional
`duration`, and the video; the official shape (`problem` with the options written inside,
`problem_type`, answer `<answer>X</answer>`) is read too. Every problem is reported as
`RecordError` naming the file, the line/item/row and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterator, Sequence

LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("Temporal", "Goal & Purpose", "Plot & Narrative", "Spatial")
_CATEGORY_ALIASES = {
    "temporal": "Temporal", "goal": "Goal & Purpose", "goal & purpose": "Goal & Purpose",
    "goal and purpose": "Goal & Purpose", "plot": "Plot & Narrative",
    "plot & narrative": "Plot & Narrative", "plot and narrative": "Plot & Narrative",
    "spatial": "Spatial",
}
log = logging.getLogger(__name__)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPTION_LINE = re.compile(r"^\s*\(?([A-D])[.)]\s*(.+?)\s*$")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_LISTED = 20  # bad records named in the warning; the rest are counted


class RecordError(ValueError):
    """A record that does not match its format; the message names where and which field."""


@dataclasses.dataclass(frozen=True)
class TrainRecord:
    """One LongVideo-Reason training record (SFT or RL)."""

    problem: str
    answer: str
    video: str
    origin: str  # where it came from, e.g. "line 17 of train.jsonl"
    reasoning: str | None = None
    category: str | None = None
    # the records file it was read from ("" when made in code); not part of equality
    file: str = dataclasses.field(default="", compare=False)

    @property
    def ground_truth(self) -> str:
        """The answer the reward compares against: the text in <answer></answer>, else all of it."""
        return answer_text(self.answer)


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One four-option multiple-choice evaluation question."""

    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A" .. "D"
    category: str  # one of CATEGORIES
    video: str
    origin: str
    duration: str | None = None
    id: str | None = None
    # the records file it was read from ("" when made in code); not part of equality
    file: str = dataclasses.field(default="", compare=False)


def answer_span(answer: str) -> str:
    """Text inside the last <answer>...</answer>, stripped; the whole text when there is no tag."""
    found = _ANSWER_TAG.findall(answer)
    return (found[-1] if found else answer).strip()


def answer_text(answer: str) -> str:
    """`answer_span` with all whitespace removed: what the accuracy reward compares."""
    return re.sub(r"\s+", "", answer_span(answer))


def _fail(origin: str, field: str, problem: str) -> RecordError:
    return RecordError(f"{origin}: field {field!r} {problem}")


def _text(row: dict, field: str, origin: str, required: bool = True) -> str | None:
    value = row.get(field)
    if value is None:
        if required:
            raise _fail(origin, field, "is missing")
        return None
    if not isinstance(value, str):
        raise _fail(origin, field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise _fail(origin, field, "is empty")
    return value


def _video(row: dict, origin: str) -> str:
    """The single video path under `videos` (string or one-element list) or `video`."""
    field = "videos" if "videos" in row else "video"
    value = row.get(field)
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, str)):
        value = list(value)
        if len(value) != 1:
            raise _fail(origin, field, f"must name exactly one video, got {len(value)}")
        value = value[0]
    if value is None:
        raise _fail(origin, "videos", "is missing")
    if not isinstance(value, str) or not value.strip():
        raise _fail(origin, field, f"must be a non-empty path, got {value!r}")
    return value


def category_name(value: Any, origin: str, field: str = "category") -> str:
    """Canonical category name from any accepted spelling (e.g. 'goal' -> 'Goal & Purpose')."""
    name = _CATEGORY_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise _fail(origin, field, f"is {value!r}; expected one of {list(CATEGORIES)}")
    return name


def parse_train_record(row: Any, origin: str) -> TrainRecord:
    """Validates one training row (a dict) into a TrainRecord."""
    if not isinstance(row, dict):
        raise RecordError(f"{origin}: expected an object with fields problem, answer, videos; "
                          f"got {type(row).__name__}")
    category_field = "problem_type" if row.get("problem_type") else "category"
    category = row.get(category_field)
    return TrainRecord(
        problem=_text(row, "problem", origin),
        answer=_text(row, "answer", origin),
        video=_video(row, origin),
        origin=origin,
        reasoning=_text(row, "reasoning", origin, required=False),
        category=category_name(category, origin, category_field) if category else None,
    )


def split_options(problem: str, origin: str) -> tuple[str, tuple[str, ...]]:
    """Splits an official-format problem into the question and its 'A. ...' option lines."""
    question_lines, options = [], {}
    for line in problem.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) not in options:
            options[match.group(1)] = match.group(2)
        elif not options:
            question_lines.append(line)
    if sorted(options) != list(LETTERS):
        raise _fail(origin, "problem", f"has options {sorted(options)}; four (A-D) are required")
    return "\n".join(question_lines).strip(), tuple(options[letter] for letter in LETTERS)


def _options(row: dict, origin: str) -> tuple[str, ...]:
    value = row["options"]
    if isinstance(value, dict):
        value = [value.get(letter) for letter in LETTERS]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise _fail(origin, "options", "must be a list of four strings")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(origin, "options", "must hold four non-empty strings")
    return tuple(v.strip() for v in value)


def parse_eval_record(row: Any, origin: str) -> EvalRecord:
    """Validates one evaluation row (explicit options, or the official `problem` shape)."""
    if not isinstance(row, dict):
        raise RecordError(f"{origin}: expected an object, got {type(row).__name__}")
    if "options" in row:
        question, options = _text(row, "question", origin), _options(row, origin)
    else:
        question, options = split_options(_text(row, "problem", origin), origin)
    letter = answer_text(_text(row, "answer", origin)).upper().strip("().")
    if letter not in LETTERS:
        raise _fail(origin, "answer", f"is {row['answer']!r}; expected a letter A-D")
    category_field = "category" if "category" in row else "problem_type"
    if row.get(category_field) is None:
        raise _fail(origin, "category", "is missing")
    duration = row.get("duration")
    record_id = row.get("id", row.get("problem_id"))
    return EvalRecord(
        question=question, options=options, answer=letter,
        category=category_name(row[category_field], origin, category_field),
        video=_video(row, origin), origin=origin,
        duration=None if duration is None else str(duration),
        id=None if record_id is None else str(record_id))


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yields (origin, row) from a .jsonl, .json (a list) or .parquet file.

    A JSONL line that is not UTF-8 JSON is yielded as a RecordError in place of the row."""
    name = os.path.basename(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"record file {path!r} does not exist")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(os.path.splitext(path)[1])
    if reader is None:
        raise RecordError(f"{path!r}: unknown record format; use .jsonl, .json or .parquet")
    yield from reader(path, name)


def _not_utf8(where: str, data: bytes, error: UnicodeDecodeError) -> RecordError:
    byte = data[error.start:error.start + 1]
    return RecordError(f"{where}: byte {byte!r} is not UTF-8; record files must be UTF-8 "
                       "(re-save the file as UTF-8)")


def _decode_line(raw: bytes, number: int, origin: str) -> str | RecordError:
    """One JSONL line as text; a UTF-8 byte order mark is allowed on the first line."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return _not_utf8(f"{origin}, column {error.start + 1}", raw, error)


def _read_jsonl(path: str, name: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:  # decoded line by line, so an undecodable byte names its line
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(_UTF16_BOMS):
                raise RecordError(f"{name} is UTF-16; record files must be UTF-8 (re-save "
                                  "the file as UTF-8)")
            origin = f"line {number} of {name}"
            line = _decode_line(raw, number, origin)
            if isinstance(line, RecordError):
                yield origin, line
            elif line.strip():
                yield origin, _parse_json_line(line, origin)


def _json_problem(error: json.JSONDecodeError, position: str) -> str:
    """json's message and `position`; some of its messages end in "at" already ("Invalid
    control character at"), which must not read "at at"."""
    return f"{error.msg.removesuffix(' at')} at {position}"


def _parse_json_line(line: str, origin: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        problem = _json_problem(error, f"column {error.colno}")
        return RecordError(f"{origin}: not valid JSON ({problem}); fix or remove the line")


def _read_json(path: str, name: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise _not_utf8(f"line {line} of {name}", data, error) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        problem = _json_problem(error, f"line {error.lineno}, column {error.colno}")
        raise RecordError(f"{name}: not valid JSON ({problem})") from None
    if not isinstance(rows, list):
        raise RecordError(f"{name}: expected a JSON list of records, got {type(rows).__name__}")
    for number, row in enumerate(rows):
        yield f"item {number} of {name}", row


def _read_parquet(path: str, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"row {number} of {name}", row


def _load(paths: str | Sequence[str], parse, on_bad_record: str) -> list:
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    records, skipped = [], []
    path_list = [paths] if isinstance(paths, str) else list(paths)
    empty = []
    for path in path_list:
        rows = 0
        for rows, (origin, row) in enumerate(read_rows(path), start=1):
            try:
                if isinstance(row, RecordError):
                    raise row
                records.append(dataclasses.replace(parse(row, origin), file=path))
            except RecordError as error:
                if on_bad_record == "error":
                    raise
                skipped.append(str(error))
        if not rows:
            empty.append(path)
    if empty and not records and not skipped:
        raise RecordError(f"record file {' and '.join(map(repr, empty))} holds no records; "
                          "write at least one, or leave the file out")
    for path in empty:  # beside files that hold records, e.g. an empty validation split
        log.warning("record file %r holds no records", path)
    if skipped and not records:
        raise RecordError(f"no valid records in {', '.join(map(repr, path_list))}: all "
                          f"{len(skipped)} were bad (on_bad_record='skip'); the first: "
                          f"{skipped[0]}")
    if skipped:
        shown = "\n  ".join(skipped[:_LISTED])
        more = f"\n  ... and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
        log.warning("skipped %d bad records (on_bad_record='skip'):\n  %s%s", len(skipped), shown,
                    more)
    return records


def load_train_records(paths: str | Sequence[str], on_bad_record: str = "error") -> list[TrainRecord]:
    """Reads and validates training records from .jsonl/.json/.parquet file(s)."""
    return _load(paths, parse_train_record, on_bad_record)


def load_eval_records(paths: str | Sequence[str], on_bad_record: str = "error") -> list[EvalRecord]:
    """Reads and validates evaluation records from .jsonl/.json/.parquet file(s)."""
    return _load(paths, parse_eval_record, on_bad_record)

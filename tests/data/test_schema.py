"""Record formats: JSON, JSONL and Parquet read alike; every problem named with file, line, field."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr_jax.data.schema import (CATEGORIES, RecordError, answer_text, load_eval_records,
                                 load_train_records, parse_eval_record, parse_train_record)
from tests.data.conftest import train_row, write_jsonl

ROWS = [train_row("a.mp4", "B"), train_row("dir/b.mp4", "C"), train_row("c.webm", "A")]


def test_jsonl_json_and_parquet_give_the_same_records(tmp_path):
    jsonl = write_jsonl(str(tmp_path / "train.jsonl"), ROWS)
    (tmp_path / "train.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), str(tmp_path / "train.parquet"))
    by_format = [load_train_records(str(path)) for path in
                 (jsonl, tmp_path / "train.json", tmp_path / "train.parquet")]
    fields = [[(r.problem, r.answer, r.video) for r in records] for records in by_format]
    assert fields[0] == fields[1] == fields[2]
    assert [r.origin for r in by_format[0]] == [f"line {i} of train.jsonl" for i in (1, 2, 3)]
    assert by_format[1][2].origin == "item 2 of train.json"
    assert by_format[2][0].origin == "row 0 of train.parquet"


def test_ground_truth_is_the_answer_inside_the_tags():
    record = parse_train_record(train_row("a.mp4", "D"), "line 1 of x")
    assert record.ground_truth == "D"
    assert answer_text("  B ") == "B" and answer_text("<answer> 1 / 2 </answer>") == "1/2"


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(str(tmp_path / "train.jsonl"), [ROWS[0], '{"problem": "x", "answ', ROWS[1]])
    with pytest.raises(RecordError, match=r"line 2 of train.jsonl: not valid JSON"):
        load_train_records(path)


def test_missing_field_is_reported_with_file_line_and_field(tmp_path):
    row = dict(ROWS[1])
    del row["answer"]
    path = write_jsonl(str(tmp_path / "train.jsonl"), [ROWS[0], row])
    with pytest.raises(RecordError) as error:
        load_train_records(path)
    assert str(error.value) == "line 2 of train.jsonl: field 'answer' is missing"


@pytest.mark.parametrize("change, message", [
    ({"problem": ""}, "field 'problem' is empty"),
    ({"answer": 3}, "field 'answer' must be a string, got int"),
    ({"videos": ["a.mp4", "b.mp4"]}, "field 'videos' must name exactly one video, got 2"),
    ({"videos": None}, "field 'videos' is missing"),
    ({"problem_type": "cooking"}, "field 'problem_type' is 'cooking'"),
])
def test_each_bad_field_is_named(change, message):
    with pytest.raises(RecordError, match="^row 4 of t.parquet: " + message.replace("(", r"\(")):
        parse_train_record({**ROWS[0], **change}, "row 4 of t.parquet")


def test_a_one_element_video_list_is_accepted():
    assert parse_train_record({**ROWS[0], "videos": ["x.mp4"]}, "o").video == "x.mp4"


def test_skip_policy_drops_bad_records_and_logs_them(tmp_path, caplog):
    bad = dict(ROWS[1])
    del bad["problem"]
    path = write_jsonl(str(tmp_path / "train.jsonl"), [ROWS[0], "not json", bad, ROWS[2]])
    with caplog.at_level(logging.WARNING):
        records = load_train_records(path, on_bad_record="skip")
    assert [r.video for r in records] == ["a.mp4", "c.webm"]
    assert "skipped 2 bad records" in caplog.text and "line 3 of train.jsonl" in caplog.text


def test_eval_record_with_explicit_options():
    row = {"question": "Which came first?", "options": ["w", "x", "y", "z"], "answer": "c",
           "category": "goal", "duration": "long", "videos": "v.mp4", "id": 7}
    record = parse_eval_record(row, "line 1 of eval.jsonl")
    assert (record.answer, record.category, record.duration, record.id) == ("C", "Goal & Purpose",
                                                                            "long", "7")
    assert record.options == ("w", "x", "y", "z")


def test_eval_record_in_the_official_shape():
    row = {"problem_id": 3, "problem": "What happens next?\nA. one\nB. two\nC. three\nD. four",
           "problem_type": "plot", "answer": "<answer>B</answer>", "videos": "longvila_videos/v.webm"}
    record = parse_eval_record(row, "item 3 of test.json")
    assert record.question == "What happens next?"
    assert record.options == ("one", "two", "three", "four")
    assert (record.answer, record.category, record.duration) == ("B", "Plot & Narrative", None)


@pytest.mark.parametrize("change, message", [
    ({"options": ["a", "b", "c"]}, "field 'options' must be a list of four strings"),
    ({"answer": "E"}, "field 'answer' is 'E'; expected a letter A-D"),
    ({"category": "Cooking"}, "field 'category' is 'Cooking'; expected one of"),
    ({"category": None}, "field 'category' is missing"),
])
def test_bad_eval_fields_are_named(change, message):
    row = {"question": "q", "options": ["a", "b", "c", "d"], "answer": "A", "category": "Spatial",
           "videos": "v.mp4", **change}
    with pytest.raises(RecordError, match="^line 9 of e.jsonl: " + message):
        parse_eval_record(row, "line 9 of e.jsonl")


def test_official_problem_without_four_options_is_named():
    row = {"problem": "Who is it?\n\n", "problem_type": "goal", "answer": "<answer>C</answer>",
           "videos": "v.mp4"}
    with pytest.raises(RecordError, match="field 'problem' has options \\[\\]; four"):
        parse_eval_record(row, "o")


def test_load_eval_records_reads_every_category(tmp_path):
    rows = [{"question": f"q{i}", "options": ["a", "b", "c", "d"], "answer": "A",
             "category": category, "videos": "v.mp4"} for i, category in enumerate(CATEGORIES)]
    records = load_eval_records(write_jsonl(str(tmp_path / "e.jsonl"), rows))
    assert [r.category for r in records] == list(CATEGORIES)


def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    latin1_row = json.dumps(ROWS[1], ensure_ascii=False).replace("green", "gr\u00fcn")
    path.write_bytes((json.dumps(ROWS[0]) + "\n" + latin1_row + "\n").encode("latin-1"))
    with pytest.raises(RecordError, match=r"^line 2 of train.jsonl, column \d+: byte b'\\xfc' "
                                          r"is not UTF-8; record files must be UTF-8"):
        load_train_records(str(path))


def test_a_utf16_record_file_is_named_as_utf16(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-16")
    with pytest.raises(RecordError, match="^train.jsonl is UTF-16; record files must be UTF-8"):
        load_train_records(str(path), on_bad_record="skip")


def test_a_json_list_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[\n{"problem": "caf\xe9"}\n]')
    with pytest.raises(RecordError, match=r"^line 2 of train.json: byte b'\\xe9' is not UTF-8"):
        load_train_records(str(path))


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8-sig")
    assert [r.video for r in load_train_records(str(path))] == ["a.mp4", "dir/b.mp4", "c.webm"]


@pytest.mark.parametrize("name, content", [("train.jsonl", ""), ("train.jsonl", "\n  \n"),
                                           ("train.json", "[]")])
def test_a_record_file_without_records_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(RecordError, match=f"record file '.*{name}' holds no records"):
        load_train_records(str(tmp_path / name))


def test_an_empty_parquet_file_is_an_error(tmp_path):
    path = str(tmp_path / "eval.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS).slice(0, 0), path)
    with pytest.raises(RecordError, match="eval.parquet' holds no records"):
        load_eval_records(path)


def test_skip_policy_with_every_record_bad_is_an_error(tmp_path):
    path = write_jsonl(str(tmp_path / "train.jsonl"), ["not json", {"problem": "x"}])
    with pytest.raises(RecordError, match=r"no valid records in '.*train.jsonl': all 2 were bad "
                                          r"\(on_bad_record='skip'\); the first: line 1"):
        load_train_records(path, on_bad_record="skip")


def test_an_empty_file_beside_files_with_records_is_only_a_warning(tmp_path, caplog):
    train = write_jsonl(str(tmp_path / "train.jsonl"), ROWS)
    (tmp_path / "val.jsonl").write_text("")
    with caplog.at_level("WARNING"):
        records = load_train_records([train, str(tmp_path / "val.jsonl")])
    assert len(records) == len(ROWS) and "val.jsonl' holds no records" in caplog.text


def test_json_messages_that_end_in_at_do_not_read_at_at(tmp_path):
    # json says "Invalid control character at" / "Unterminated string starting at"
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"problem": "a\tb"}\n')  # a raw tab inside a string
    with pytest.raises(RecordError) as error:
        load_train_records(str(jsonl))
    assert "(Invalid control character at column 15); fix or remove the line" in str(error.value)
    (tmp_path / "train.json").write_text('[{"problem": "x')
    with pytest.raises(RecordError) as error:
        load_train_records(str(tmp_path / "train.json"))
    assert str(error.value) == ("train.json: not valid JSON (Unterminated string starting at "
                                "line 1, column 14)")
    assert "at at" not in str(error.value)


def test_skipped_bad_records_past_the_first_20_are_counted(tmp_path, caplog):
    path = write_jsonl(str(tmp_path / "train.jsonl"), [ROWS[0]] + ["not json"] * 25)
    with caplog.at_level(logging.WARNING):
        assert len(load_train_records(path, on_bad_record="skip")) == 1
    assert "skipped 25 bad records" in caplog.text and "line 21 of train.jsonl" in caplog.text
    assert "line 22 of train.jsonl" not in caplog.text
    assert caplog.text.rstrip().endswith("... and 5 more")


def test_records_know_the_file_they_were_read_from(tmp_path):
    path = write_jsonl(str(tmp_path / "train.jsonl"), ROWS)
    assert {r.file for r in load_train_records(path)} == {path}

"""The reply parser and the question filter on recorded replies of the right and wrong shapes."""

import copy
import json
import pathlib

import pytest

from lvr_jax.data.schema import CATEGORIES
from lvr_jax.datagen.parse import (Question, Rejection, ReplyError, category_quotas, filter_items,
                                   parse_reply, validate_item)

REPLIES = pathlib.Path(__file__).parent / "replies"


def reply(name: str) -> str:
    return (REPLIES / name).read_text()


def good_item(**changes):
    item = copy.deepcopy(json.loads(reply("valid.json"))["questions"][0])
    item.update(changes)
    return item


def test_valid_reply_keeps_all_four_categories():
    kept, rejected = filter_items(parse_reply(reply("valid.json")))
    assert rejected == []
    assert [q.category for q in kept] == list(CATEGORIES)
    assert [q.answer for q in kept] == ["A", "A", "B", "C"]
    assert kept[0].options[0] == "The blue square"
    assert "0:10" in kept[0].reasoning


def test_code_fenced_reply_with_chatter_is_read_and_labels_are_stripped():
    kept, rejected = filter_items(parse_reply(reply("fenced.txt")))
    assert rejected == []
    (question,) = kept
    assert question.category == "Temporal"  # spelled "temporal" in the reply
    assert question.options == ("The door opens", "The dog barks", "The light turns off",
                                "The car leaves")
    assert question.answer == "A"  # written "(A)"


def test_think_block_before_the_json_is_skipped():
    (question,) = filter_items(parse_reply(reply("think_then_json.txt")))[0]
    assert question.answer == "B" and question.question.startswith("What does the cook")


@pytest.mark.parametrize("finish_reason", [None, "length"])
def test_truncated_reply_is_reported_as_truncated(finish_reason):
    with pytest.raises(ReplyError) as caught:
        parse_reply(reply("truncated.txt"), finish_reason)
    assert caught.value.reason == "truncated_reply"


def test_raw_newlines_and_control_characters_inside_strings_are_accepted():
    item = dict(json.loads(reply("valid.json"))["questions"][0], reasoning="First.\nThen.\x07")
    text = json.dumps({"questions": [item]}).replace("\\n", "\n").replace("\\u0007", "\x07")
    assert "\n" in text and "\x07" in text
    (question,) = filter_items(parse_reply(text))[0]
    assert question.reasoning == "First.\nThen.\x07"


def test_unclosed_think_block_is_truncated():
    with pytest.raises(ReplyError, match="truncated_reply"):
        parse_reply("<think>Let me look at the clips one by one. First")


@pytest.mark.parametrize("text, reason", [
    ("", "empty_reply"),
    ("   \n", "empty_reply"),
    ("I cannot write questions about this video.", "bad_json"),
    ('{"questions": [{"category": "Temporal",}]}', "bad_json"),
    ('{"items": []}', "wrong_shape"),
    ('[{"category": "Temporal"}]', "wrong_shape"),  # a bare list is not the object asked for
    ('{"questions": "none"}', "wrong_shape"),
    (' blx Opanswery Aho Tevidhorut star eventoning', "bad_json"),  # a random model's junk
])
def test_malformed_replies_name_their_reason(text, reason):
    with pytest.raises(ReplyError) as caught:
        parse_reply(text)
    assert caught.value.reason == reason


@pytest.mark.parametrize("changes, reason", [
    ({"options": ["one", "two", "three"]}, "not_four_options"),
    ({"options": ["one", "two", "three", "four", "five"]}, "not_four_options"),
    ({"options": ["one", "two", "", "four"]}, "not_four_options"),
    ({"options": "one, two, three, four"}, "not_four_options"),
    ({"options": ["The cat", "the cat.", "A dog", "A bird"]}, "duplicate_options"),
    ({"answer": "E"}, "bad_answer_letter"),
    ({"answer": "The blue square"}, "bad_answer_letter"),
    ({"answer": 1}, "bad_answer_letter"),
    ({"reasoning": "  "}, "empty_reasoning"),
    ({"reasoning": 3}, "empty_reasoning"),
    ({"question": ""}, "empty_question"),
    ({"category": "Causal"}, "unknown_category"),
    ({"answer": None}, "missing_field"),
    ({"reasoning": "At 0:10 it moves. <answer>A</answer>"}, "reserved_tag"),
    ({"options": ["<think>one", "two", "three", "four"]}, "reserved_tag"),
])
def test_bad_items_are_rejected_with_their_reason(changes, reason):
    result = validate_item(good_item(**changes))
    assert isinstance(result, Rejection), result
    assert result.reason == reason
    assert result.item["question"] == good_item(**changes)["question"]


def test_item_without_fields_and_non_object_items_are_rejected():
    assert validate_item({"question": "Why?"}).reason == "missing_field"
    assert "category" in validate_item({"question": "Why?"}).detail
    assert validate_item("a question").reason == "not_an_object"


@pytest.mark.parametrize("answer", ["b", "B.", "(B)", "B) The dog barks", " B "])
def test_answer_letter_spellings(answer):
    assert validate_item(good_item(answer=answer)).answer == "B"


def test_duplicate_questions_are_dropped_after_the_first():
    first = good_item()
    again = good_item(question="  which object entered the scene after the red circle "
                               "reached the TOP-LEFT corner ")
    kept, rejected = filter_items([first, again, good_item(question="Another one?")])
    assert [q.question for q in kept] == [first["question"], "Another one?"]
    assert [r.reason for r in rejected] == ["duplicate_question"]


def test_questions_past_a_category_quota_are_dropped():
    items = [good_item(question=f"Question {n}?") for n in range(3)]
    kept, rejected = filter_items(items, {"Temporal": 2})
    assert len(kept) == 2 and [r.reason for r in rejected] == ["over_target"]


def test_category_quotas_share_the_total_by_weight():
    assert category_quotas(4, {"temporal": 1, "goal": 1, "plot": 1, "spatial": 1}) == dict(
        zip(CATEGORIES, [1, 1, 1, 1]))
    assert category_quotas(10, {"temporal": 294, "goal": 288, "plot": 283, "spatial": 135}) == {
        "Temporal": 3, "Goal & Purpose": 3, "Plot & Narrative": 3, "Spatial": 1}
    assert category_quotas(3, {"temporal": 1, "spatial": 0}) == {
        "Temporal": 3, "Goal & Purpose": 0, "Plot & Narrative": 0, "Spatial": 0}
    with pytest.raises(ValueError, match="category_targets"):
        category_quotas(3, {"temporal": 0})


def test_kept_questions_are_plain_values():
    (question,) = filter_items([good_item()])[0]
    assert isinstance(question, Question) and isinstance(question.options, tuple)

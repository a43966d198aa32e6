"""The synthetic set: valid records, four categories, disjoint splits, answers true to the script."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np

from lvr_jax.data.schema import CATEGORIES, LETTERS, load_eval_records, load_train_records
from lvr_jax.data.synthetic import generate, split_of_videos
from lvr_jax.data.synthetic_render import COLOURS, render
from lvr_jax.data.synthetic_script import (ANNOTATOR_SLIPS, OPTION_COLOURS, annotated,
                                           make_questions, make_script)
from lvr_jax.data.video import read_frames

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scripts(out: str) -> dict[str, dict]:
    folder = os.path.join(out, "scripts")
    return {name[:-5]: json.load(open(os.path.join(folder, name))) for name in os.listdir(folder)}


def test_records_are_valid_in_both_formats(synthetic_dir):
    train = load_train_records([os.path.join(synthetic_dir, f"{s}.jsonl") for s in ("train", "val")])
    test_eval = load_eval_records(os.path.join(synthetic_dir, "test_eval.jsonl"))
    # 12 videos: 10 train, 1 val, 1 test; one question per category, an object category
    # skipped when none of its forms has an option colour
    assert 3 * 11 <= len(train) <= 4 * 11 and 3 <= len(test_eval) <= 4
    assert {r.category for r in train} == set(CATEGORIES)
    for record in train:
        assert record.answer.startswith("<think>") and record.ground_truth in LETTERS
        assert f"option {record.ground_truth}" in record.answer
        assert os.path.exists(os.path.join(synthetic_dir, record.video))


def test_splits_hold_disjoint_videos():
    splits = split_of_videos(200, seed=0)
    assert sorted(sum(splits.values(), [])) == list(range(200))
    assert (len(splits["val"]), len(splits["test"])) == (20, 20)


def test_answers_are_true_to_the_event_script(synthetic_dir):
    scripts = _scripts(synthetic_dir)
    for split in ("train", "val", "test"):
        for record in load_train_records(os.path.join(synthetic_dir, f"{split}.jsonl")):
            script = scripts[os.path.basename(record.video)[:-4]]
            roles = {o["role"]: o for o in script["objects"]}
            options = dict(line.split(". ", 1) for line in record.problem.splitlines()[1:])
            chosen = options[record.ground_truth].lower()
            if record.category == "Temporal":
                ordered = sorted(script["objects"], key=lambda o: o["appear"])
                which = ("first", "second", "third", "last").index(record.problem.split()[3])
                expected = ordered[which]["colour"]
            elif record.category == "Spatial":
                expected = roles["mover"]["corner"]
            else:
                role = {"moved to another": "mover", "disappeared": "target",
                        "left the video": "leaver", "stayed": "stayer"}
                [expected] = [roles[r]["colour"] for k, r in role.items() if k in record.problem]
            assert expected in chosen, (record.origin, chosen, expected)
            assert record.answer.endswith(f"{chosen}, option {record.ground_truth}.</think>"
                                          f"<answer>{record.ground_truth}</answer>")


def test_questions_need_frames_far_apart():
    for index in range(20):
        script = make_script(np.random.default_rng([0, index]), 64, 8)
        beats, appear = script["beats"], [o["appear"] for o in script["objects"]]
        assert len(set(appear)) == 4 and max(appear) < beats["move_start"]  # the order: first third
        assert beats["touch"] < beats["leave_start"] < beats["arrive"] < beats["gone"] < 64
        assert beats["gone"] - min(appear) >= 32  # spatial and plot span over half the video


def test_answer_letters_are_balanced():
    letters = collections.Counter(
        q["answer"] for i in range(200)
        for q in make_questions(make_script(np.random.default_rng([1, i]), 64, 8),
                                np.random.default_rng([2, i])))
    assert set(letters) == set(LETTERS) and min(letters.values()) > 150


def test_text_alone_gives_chance():
    # Options are fixed, so the question text is all a blind model sees: for every question
    # text, the answer letters must be spread evenly.
    by_question = collections.defaultdict(collections.Counter)
    for i in range(400):
        for q in make_questions(make_script(np.random.default_rng([3, i]), 64, 8),
                                np.random.default_rng([4, i])):
            by_question[q["question"]][q["answer"]] += 1
    for question, letters in by_question.items():
        total = sum(letters.values())
        assert total < 60 or max(letters.values()) / total < 0.4, (question, letters)


def test_generation_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        generate(out, num_videos=3, frames=16, size=32, seed=9, progress=False)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "test_eval.jsonl"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()
    frames = [read_frames(os.path.join(out, "videos", "synth_00001.mp4"), 16, 32).frames
              for out in (a, b)]
    np.testing.assert_array_equal(*frames)


def test_videos_decode_to_exactly_the_rendered_frames(tmp_path):
    """Lossless H.264: the pixels a run trains on do not depend on the encoder's timing
    (x264's lossy modes gave ~1% of videos different pixels from one generation to the next)."""
    import av
    generate(str(tmp_path), num_videos=2, frames=16, size=48, seed=3, progress=False)
    script = _scripts(str(tmp_path))["synth_00001"]
    rendered = render(script["objects"], 16, 48)
    expected = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
                .to_ndarray() for f in rendered]  # what the encoder is given
    with av.open(str(tmp_path / "videos" / "synth_00001.mp4")) as container:
        decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    np.testing.assert_array_equal(np.stack(decoded), np.stack(expected))


def test_videos_show_the_scripted_objects(synthetic_dir):
    script = _scripts(synthetic_dir)["synth_00000"]
    frames = read_frames(os.path.join(synthetic_dir, "videos", "synth_00000.mp4"), 32, 64).frames
    last = max(script["objects"], key=lambda o: o["appear"])  # appears after frame 0
    x, y = (int(v * 64) for v in last["path"][0][1])
    assert frames[last["appear"] - 1, y, x].max() < 60  # background before it appears
    colour = np.array(COLOURS[last["colour"]])
    assert np.abs(frames[last["appear"], y, x].astype(int) - colour).max() < 40


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lvr_jax.data.synthetic", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_command_line_help_and_run(tmp_path):
    help_text = _cli("--help")
    assert help_text.returncode == 0 and "--num_videos" in help_text.stdout
    done = _cli("--out", str(tmp_path), "--num_videos", "3", "--frames", "16", "--size", "32")
    assert done.returncode == 0, done.stderr
    assert len(os.listdir(tmp_path / "videos")) == 3


def test_sft_and_rl_parts_split_the_training_videos(synthetic_dir):
    def rows(name):
        return [json.loads(line) for line in open(os.path.join(synthetic_dir, f"{name}.jsonl"))]

    train, sft, rl = rows("train"), rows("sft"), rows("rl")
    assert sorted(map(json.dumps, sft + rl)) == sorted(map(json.dumps, train))
    sft_videos, rl_videos = {r["videos"] for r in sft}, {r["videos"] for r in rl}
    assert not sft_videos & rl_videos and len(sft_videos) == 4 and len(rl_videos) == 6


def test_the_annotator_slips_only_on_its_two_forms():
    """At slip rate 1 the SFT annotator names the object it confuses (with its letter, the
    chain of thought agreeing), where that object's colour is an option; every other
    question, and every question at rate 0, is the ground truth."""
    rng, slipped = np.random.default_rng(4), collections.Counter()
    for _ in range(300):
        script = make_script(rng, 16, 4)
        roles = {o["role"]: o for o in script["objects"]}
        for question in make_questions(script, rng):
            assert annotated(question, script, rng, 0.0) is question
            written = annotated(question, script, rng, 1.0)
            role = ANNOTATOR_SLIPS.get(question["question"])
            if role is None or roles[role]["colour"] not in OPTION_COLOURS:
                assert written == question
                continue
            colour = roles[role]["colour"]
            assert written["answer"] == LETTERS[OPTION_COLOURS.index(colour)] != question["answer"]
            assert written["reasoning"].endswith(f"the {colour} object, option {written['answer']}.")
            slipped[role] += 1
    assert set(slipped) == {"mover", "target"} and min(slipped.values()) > 30


def test_slips_reach_sft_jsonl_only(tmp_path):
    generate(str(tmp_path), num_videos=40, frames=16, size=32, seed=3, progress=False,
             annotator_slip=1.0)
    rows = {name: [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
            for name in ("train", "sft", "rl")}
    truth = {r["problem_id"]: r for r in rows["train"]}
    assert all(truth[r["problem_id"]] == r for r in rows["rl"])
    changed = [r for r in rows["sft"] if truth[r["problem_id"]] != r]
    assert changed and all(r["problem"].split("\n")[0] in ANNOTATOR_SLIPS for r in changed)
    for r in changed:  # the slipped record's letter is the one its own chain of thought names
        letter = r["answer"][-len("X</answer>"):-len("</answer>")]
        assert f"option {letter}.</think>" in r["answer"]
        assert letter != truth[r["problem_id"]]["answer"][-len("X</answer>"):-len("</answer>")]

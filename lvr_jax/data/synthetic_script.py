"""Event scripts for the synthetic long-video reasoning set, and questions written from them.

Every video tells the same kind of story with random actors, places and times: four objects
of distinct colours appear one by one, each in its own corner (first third of the video);
the *mover* travels to the *target*'s corner and the target disappears when touched (middle);
the *leaver* then moves into the corner the mover left and leaves the video (last third);
the *stayer* never moves. Each question needs frames far apart; its options are the four
colours or the four corners, always in the same order, and the answer is uniform over them
whatever the question says, so text alone gives 25%.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lvr_jax.data.schema import LETTERS
from lvr_jax.data.synthetic_render import COLOURS, SHAPES

CORNERS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25),
           "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
ROLES = ("mover", "target", "leaver", "stayer")


def _frame(num_frames: int, fraction: float) -> int:
    return int(round(fraction * (num_frames - 1)))


def _timeline(rng: np.random.Generator, num_frames: int) -> dict[str, Any]:
    """Frame numbers of the story's beats, jittered per video."""
    appear = [_frame(num_frames, 0.02 + 0.09 * k + rng.uniform(0, 0.02)) for k in range(4)]
    move_start = _frame(num_frames, rng.uniform(0.40, 0.45))
    touch = move_start + max(_frame(num_frames, 0.12), 2)
    leave_start = _frame(num_frames, rng.uniform(0.60, 0.64))
    arrive = leave_start + max(_frame(num_frames, 0.12), 2)
    gone = min(arrive + max(_frame(num_frames, rng.uniform(0.06, 0.10)), 1), num_frames - 2)
    return {"appear": appear, "move_start": move_start, "touch": touch,
            "leave_start": leave_start, "arrive": arrive, "gone": gone}


def make_script(rng: np.random.Generator, num_frames: int, fps: int) -> dict[str, Any]:
    """A random story (objects, corners, times) as a JSON-able dict: the video's ground truth."""
    if num_frames < 16:
        raise ValueError(f"synthetic videos need at least 16 frames, got {num_frames}")
    beats = _timeline(rng, num_frames)
    colours = rng.permutation(list(COLOURS))
    corners = rng.permutation(list(CORNERS))
    appear_order = rng.permutation(4)
    objects = []
    for k, role in enumerate(ROLES):
        shape = str(rng.choice(SHAPES))
        objects.append({"role": role, "colour": str(colours[k]), "shape": shape,
                        "name": f"{colours[k]} {shape}", "corner": str(corners[k]),
                        "appear": beats["appear"][appear_order[k]], "vanish": num_frames})
    by_role = {o["role"]: o for o in objects}
    _add_paths(by_role, beats)
    return {"num_frames": num_frames, "fps": fps, "beats": beats, "objects": objects}


def roles_of(script: dict) -> dict[str, dict]:
    """The script's objects by role (mover, target, leaver, stayer)."""
    return {o["role"]: o for o in script["objects"]}


def _add_paths(by_role: dict[str, dict], beats: dict[str, Any]) -> None:
    mover, target, leaver = by_role["mover"], by_role["target"], by_role["leaver"]
    for obj in by_role.values():
        obj["path"] = [[obj["appear"], list(CORNERS[obj["corner"]])]]
    mover["path"] += [[beats["move_start"], list(CORNERS[mover["corner"]])],
                      [beats["touch"], list(CORNERS[target["corner"]])]]
    target["vanish"] = beats["touch"]
    leaver["path"] += [[beats["leave_start"], list(CORNERS[leaver["corner"]])],
                       [beats["arrive"], list(CORNERS[mover["corner"]])]]
    leaver["vanish"] = beats["gone"]


# Every question offers the same four options in the same order: four of the six colours,
# or the four corners. The letter of an answer is then fixed by what the model saw, as in a
# benchmark whose options are categories; with options shuffled per question a from-scratch
# demo LLM must also find, across its whole chain of thought, which letter the prompt gave
# the object it named, and at the demo's budget it does not learn that (README, "Why the
# demo's options are fixed"). Videos draw their four objects from all six colours (a video
# whose colours were always the four options would let the reasoning guess the last colours
# by elimination, and the model then learnt to see colours much later), so an object
# question is asked in a form whose answer is one of the four option colours.
OPTION_COLOURS = ("red", "green", "blue", "yellow")
OBJECT_OPTIONS = tuple(f"The {colour} object" for colour in OPTION_COLOURS)
CORNER_OPTIONS = tuple(f"The {corner} corner" for corner in CORNERS)


def _choice(options: tuple[str, ...], correct: str) -> tuple[list[str], str]:
    """The fixed options and the letter of `correct` among them."""
    return list(options), LETTERS[options.index(correct)]


def _object(obj: dict) -> str:
    return f"the {obj['colour']} object"


def video_summary(script: dict) -> str:
    """The chain of thought's first part: what happens in the video, in order."""
    roles = roles_of(script)
    mover, target, leaver = roles["mover"], roles["target"], roles["leaver"]
    ordered = sorted(script["objects"], key=lambda o: o["appear"])
    appear = ", then ".join(f"{_object(o)} in the {o['corner']}" for o in ordered[1:])
    return (f"First {_object(ordered[0])} appears in the {ordered[0]['corner']}, then {appear}. "
            f"Then {_object(mover)} moves to {_object(target)}, which disappears. Then "
            f"{_object(leaver)} moves to the {mover['corner']} and leaves the video.")


def _question(script: dict, category: str, question: str, options: tuple[str, ...],
              correct: str) -> dict[str, Any]:
    options, letter = _choice(options, correct)
    reasoning = (f"{video_summary(script)} So the answer is {_uncap(correct)}, "
                 f"option {letter}.")
    return {"category": category, "question": question, "options": options,
            "answer": letter, "reasoning": reasoning}


def _uncap(option: str) -> str:
    return option[0].lower() + option[1:]


def _object_question(script: dict, rng: np.random.Generator, category: str,
                     forms: list[tuple[str, dict]]) -> dict[str, Any] | None:
    """One of `forms` (question, answer object) whose answer is an option colour; None if
    no form has one. By the symmetry of the colours, each form's letter is uniform."""
    askable = [(q, obj) for q, obj in forms if obj["colour"] in OPTION_COLOURS]
    if not askable:
        return None
    question, obj = askable[rng.integers(len(askable))]
    return _question(script, category, question, OBJECT_OPTIONS, f"The {obj['colour']} object")


def temporal_question(script: dict, rng: np.random.Generator) -> dict[str, Any] | None:
    """Which object appeared first (second, ..., last)? The whole first third of the video."""
    ordered = sorted(script["objects"], key=lambda o: o["appear"])
    forms = [(f"Which object appeared {which} in the video?", obj)
             for which, obj in zip(("first", "second", "third", "last"), ordered)]
    return _object_question(script, rng, "Temporal", forms)


def goal_question(script: dict, rng: np.random.Generator) -> dict[str, Any] | None:
    """Which object went for another, or which one disappeared? The middle of the video."""
    roles = roles_of(script)
    forms = [("Which object moved to another object and touched it?", roles["mover"]),
             ("Which object disappeared when another object touched it?", roles["target"])]
    return _object_question(script, rng, "Goal & Purpose", forms)


def plot_question(script: dict, rng: np.random.Generator) -> dict[str, Any] | None:
    """What happened after the touch: which object left, which one stayed?"""
    roles = roles_of(script)
    forms = [("After one object touched another, which object moved next and left the video?",
              roles["leaver"]),
             ("Which object stayed in its corner for the whole video?", roles["stayer"])]
    return _object_question(script, rng, "Plot & Narrative", forms)


def spatial_question(script: dict, rng: np.random.Generator) -> dict[str, Any]:
    """Where was the leaver before it left? It went to the corner the mover had left earlier."""
    roles = roles_of(script)
    question = f"Where was the {roles['leaver']['colour']} object just before it left the video?"
    return _question(script, "Spatial", question, CORNER_OPTIONS,
                     f"The {roles['mover']['corner']} corner")


QUESTION_MAKERS = (temporal_question, goal_question, plot_question, spatial_question)

# The SFT split's chains of thought are written by a simulated annotator that is wrong in a
# systematic way on two question forms, as a model writing chains of thought is: it names
# the object that did the touching as the one that disappeared, and the touched object (it
# never moved either: it vanished) as the one that stayed. SFT imitates those slips; GRPO's
# reward reads the ground-truth letter, so the RL stage can undo them (README, "What GRPO
# corrects in the demo").
ANNOTATOR_SLIPS = {
    "Which object disappeared when another object touched it?": "mover",
    "Which object stayed in its corner for the whole video?": "target",
}


def annotated(question: dict[str, Any], script: dict, rng: np.random.Generator,
              slip_rate: float) -> dict[str, Any]:
    """`question` as the SFT annotator writes it: on a form of ANNOTATOR_SLIPS, with
    probability `slip_rate`, its conclusion and letter name the object it confuses (when
    that object's colour is an option); otherwise unchanged."""
    role = ANNOTATOR_SLIPS.get(question["question"])
    if role is None or not rng.random() < slip_rate:
        return question
    wrong = roles_of(script)[role]
    if wrong["colour"] not in OPTION_COLOURS:
        return question
    return _question(script, question["category"], question["question"], OBJECT_OPTIONS,
                     f"The {wrong['colour']} object")


def make_questions(script: dict, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One question per category (an object category is skipped, 1 video in 15, when none
    of its forms has an option colour), each with options, letter and chain of thought."""
    questions = [make(script, rng) for make in QUESTION_MAKERS]
    return [q for q in questions if q is not None]


def _multiple_choice(rng: np.random.Generator, correct: str, others: list[str]):
    """Shuffled four options holding `correct`; returns (options, answer letter)."""
    options = [correct] + others[:3]
    shuffled = [options[i] for i in rng.permutation(4)]
    return shuffled, LETTERS[shuffled.index(correct)]


def _cap(name: str) -> str:
    return f"The {name}"


def _option_texts(rng: np.random.Generator) -> list[str]:
    """Four distinct options of one of the kinds the questions use."""
    kind = rng.integers(3)
    if kind == 2:
        return [f"The {c} corner" for c in rng.permutation(list(CORNERS))]
    names = set()
    while len(names) < 4:
        names.add(f"{rng.choice(list(COLOURS))} {rng.choice(SHAPES)}")
    return [_cap(n) + (" touched it" if kind == 1 else "") for n in names]


def option_drill(rng: np.random.Generator) -> dict[str, Any]:
    """A text-only question: which letter does the named option carry?

    The demo model learns to read multiple-choice options from these before the video
    questions (what a pretrained LLM already knows): finding the letter of an option it
    has named is a two-hop lookup that a from-scratch model does not pick up from one
    answer letter per video question.
    """
    texts = _option_texts(rng)
    correct = texts[0]
    options, letter = _multiple_choice(rng, correct, texts[1:])
    return {"question": f"Which option says {_uncap(correct)}?", "options": options,
            "answer": letter, "reasoning": f"So the answer is {_uncap(correct)}, option {letter}."}


def story_drill(rng: np.random.Generator) -> dict[str, Any]:
    """A video question of a random story with its chain of thought, without the video.

    From text alone the summary is a guess, but the conclusion follows from the summary and
    the letter from the conclusion: the two steps a model taught only with videos reads from
    the video instead (README, "What held GRPO back on the demo").
    """
    questions = make_questions(make_script(rng, 16, 4), rng)
    return questions[rng.integers(len(questions))]

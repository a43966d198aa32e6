"""Event scripts for the synthetic long-video reasoning set, and questions written from them.

Every video tells the same kind of story with random actors, places and times: four objects
of distinct colours appear one by one, each in its own corner (first third of the video);
the *mover* travels to the *target*'s corner and the target disappears when touched (middle);
the *leaver* then moves into the corner the mover left and leaves the video (last third);
the *stayer* never moves. Each question needs frames far apart, and its distractors are other
objects of the same video or objects that never appear, so text alone gives 25%.
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
    unused = [str(c) for c in colours[4:]]
    return {"num_frames": num_frames, "fps": fps, "beats": beats, "objects": objects,
            "unused_colours": unused}


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


def _seconds(script: dict, frame: int) -> str:
    return f"{frame / script['fps']:.1f} s"


def _multiple_choice(rng: np.random.Generator, correct: str, others: list[str]):
    """Shuffled four options holding `correct`; returns (options, answer letter)."""
    options = [correct] + others[:3]
    order = rng.permutation(4)
    shuffled = [options[i] for i in order]
    return shuffled, LETTERS[shuffled.index(correct)]


def _fake_names(rng: np.random.Generator, script: dict, count: int) -> list[str]:
    """Objects that never appear in this video (colours it does not use)."""
    return [f"{colour} {rng.choice(SHAPES)}" for colour in script["unused_colours"][:count]]


def _cap(name: str) -> str:
    return f"The {name}"


def _uncap(option: str) -> str:
    return option[0].lower() + option[1:]


def temporal_question(script: dict, rng: np.random.Generator) -> dict[str, Any]:
    """Which object appeared first (or last)? Needs the whole first third of the video."""
    ordered = sorted(script["objects"], key=lambda o: o["appear"])
    which = str(rng.choice(["first", "last"]))
    answer = ordered[0] if which == "first" else ordered[-1]
    others = [_cap(o["name"]) for o in ordered if o is not answer]
    options, letter = _multiple_choice(rng, _cap(answer["name"]), list(rng.permutation(others)))
    steps = [f"the {o['name']} appears in the {o['corner']} at {_seconds(script, o['appear'])}"
             for o in ordered]
    reasoning = (f"Going through the video in order: {'; then '.join(steps)}. "
                 f"So the object that appeared {which} is the {answer['name']}, option {letter}.")
    return {"category": "Temporal", "question": f"Which object appeared {which} in the video?",
            "options": options, "answer": letter, "reasoning": reasoning}


def spatial_question(script: dict, rng: np.random.Generator) -> dict[str, Any]:
    """Where was the leaver before it left? It went to the corner the mover had left earlier."""
    roles = {o["role"]: o for o in script["objects"]}
    leaver, mover, beats = roles["leaver"], roles["mover"], script["beats"]
    corners = [f"The {c} corner" for c in CORNERS]
    correct = f"The {mover['corner']} corner"
    others = [c for c in rng.permutation(corners) if c != correct]
    options, letter = _multiple_choice(rng, correct, others)
    reasoning = (f"The {leaver['name']} appears in the {leaver['corner']} at "
                 f"{_seconds(script, leaver['appear'])}. The {mover['name']} leaves the "
                 f"{mover['corner']} at {_seconds(script, beats['move_start'])}. At "
                 f"{_seconds(script, beats['leave_start'])} the {leaver['name']} starts to move "
                 f"and reaches the empty {mover['corner']} at {_seconds(script, beats['arrive'])}; "
                 f"it leaves the video from there at {_seconds(script, beats['gone'])}. "
                 f"So it was in the {mover['corner']} corner, option {letter}.")
    question = f"Where was the {leaver['name']} just before it left the video?"
    return {"category": "Spatial", "question": question, "options": options, "answer": letter,
            "reasoning": reasoning}


def goal_question(script: dict, rng: np.random.Generator) -> dict[str, Any]:
    """What was the mover going for (or: why did the target disappear)? Start and end of a move."""
    roles = {o["role"]: o for o in script["objects"]}
    mover, target, beats = roles["mover"], roles["target"], script["beats"]
    others = [_cap(roles[r]["name"]) for r in ("leaver", "stayer")] + \
        [_cap(n) for n in _fake_names(rng, script, 1)]
    if rng.random() < 0.5:
        question = f"What was the {mover['name']} trying to reach when it started to move?"
        correct = _cap(target["name"])
    else:
        question = f"Why did the {target['name']} disappear?"
        correct = f"{_cap(mover['name'])} touched it"
        others = [f"{o} touched it" for o in others]
    options, letter = _multiple_choice(rng, correct, list(rng.permutation(others)))
    reasoning = (f"The {target['name']} sits in the {target['corner']} from "
                 f"{_seconds(script, target['appear'])}. At {_seconds(script, beats['move_start'])}"
                 f" the {mover['name']} leaves the {mover['corner']} and heads to the "
                 f"{target['corner']}; at {_seconds(script, beats['touch'])} it touches the "
                 f"{target['name']}, which disappears. So the answer is {_uncap(correct)}, "
                 f"option {letter}.")
    return {"category": "Goal & Purpose", "question": question, "options": options,
            "answer": letter, "reasoning": reasoning}


def plot_question(script: dict, rng: np.random.Generator) -> dict[str, Any]:
    """What happened next in the story: which object moved and left after the touch?"""
    roles = {o["role"]: o for o in script["objects"]}
    mover, target, leaver, stayer = (roles[r] for r in ROLES)
    beats = script["beats"]
    others = [_cap(stayer["name"])] + [_cap(n) for n in _fake_names(rng, script, 2)]
    options, letter = _multiple_choice(rng, _cap(leaver["name"]), list(rng.permutation(others)))
    reasoning = (f"At {_seconds(script, beats['touch'])} the {mover['name']} touches the "
                 f"{target['name']}, which disappears. Next, at "
                 f"{_seconds(script, beats['leave_start'])} the {leaver['name']} moves from the "
                 f"{leaver['corner']} to the {mover['corner']} and leaves the video at "
                 f"{_seconds(script, beats['gone'])}, while the {stayer['name']} stays in the "
                 f"{stayer['corner']}. So the answer is the {leaver['name']}, option {letter}.")
    question = (f"After the {mover['name']} touched the {target['name']}, which object moved "
                f"next and then left the video?")
    return {"category": "Plot & Narrative", "question": question, "options": options,
            "answer": letter, "reasoning": reasoning}


QUESTION_MAKERS = (temporal_question, goal_question, plot_question, spatial_question)


def make_questions(script: dict, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One question per category, each with options, answer letter and a chain of thought."""
    return [make(script, rng) for make in QUESTION_MAKERS]


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

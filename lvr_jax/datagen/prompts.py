"""The two prompts of the pipeline: clip captioning and question writing (REFERENCE.md §1)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from lvr_jax.data.schema import CATEGORIES, LETTERS

CAPTION_INSTRUCTION = (
    "These frames come in order from one {seconds:g}-second clip of a longer video. "
    "Describe the clip in two to four sentences: the people and objects, what they do, "
    "where they are, and what changes during the clip. Describe only what is visible.")

REASONING_SYSTEM = (
    "You write multiple-choice questions that test reasoning over a whole long video, "
    "with a step-by-step explanation of each answer. You reply with JSON only.")

CATEGORY_GUIDE = {
    "Temporal": "the order, timing or duration of events",
    "Goal & Purpose": "why a person or object acts as it does, and what they aim for",
    "Plot & Narrative": "how the story develops: causes and consequences across the video",
    "Spatial": "where people and things are and how they move relative to each other",
}

REASONING_INSTRUCTION = """\
Below are descriptions of consecutive clips of one video ({duration} long), in order, \
each with its start and end time.

{timeline}

Write {total} multiple-choice questions about this video: {mix}.
Categories:
{guide}
Rules:
- Each question needs evidence from more than one moment of the video.
- Give exactly four distinct options; exactly one is correct.
- The reasoning thinks step by step, cites the events and their times in the video, and \
arrives at the answer.
- Speak of "the video", never of descriptions, captions or clips.

Reply with only this JSON object, no other text:
{{"questions": [{{"category": "Temporal", "question": "...", \
"options": ["...", "...", "...", "..."], "reasoning": "...", "answer": "A"}}]}}
"category" is one of {categories}; "answer" is the letter (A, B, C or D) of the correct option."""


def timestamp(seconds: float) -> str:
    """Seconds as M:SS (or H:MM:SS past an hour)."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def timeline(captions: Sequence[Mapping[str, Any]]) -> str:
    """One line per clip: '[0:00-0:10] caption'."""
    return "\n".join(f"[{timestamp(c['start'])}-{timestamp(c['end'])}] "
                     f"{' '.join(str(c['caption']).split())}" for c in captions)


def _mix(quotas: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in quotas.items() if n > 0)


def reasoning_messages(captions: Sequence[Mapping[str, Any]], duration: float,
                       quotas: Mapping[str, int]) -> list[dict[str, str]]:
    """Chat messages asking for `quotas` questions about the captioned timeline."""
    guide = "\n".join(f"- {name}: {CATEGORY_GUIDE[name]}" for name in CATEGORIES
                      if quotas.get(name, 0) > 0)
    text = REASONING_INSTRUCTION.format(
        duration=timestamp(duration), timeline=timeline(captions),
        total=sum(quotas.values()), mix=_mix(quotas), guide=guide,
        categories=", ".join(f'"{c}"' for c in CATEGORIES))
    return [{"role": "system", "content": REASONING_SYSTEM}, {"role": "user", "content": text}]


def reply_schema(max_questions: int, max_chars: int = 0) -> dict[str, Any]:
    """JSON schema of the reply, for endpoints that enforce `response_format`.

    `max_chars` > 0 caps every string, a guard against generations that never close a quote."""
    text = {"type": "string", **({"maxLength": max_chars} if max_chars > 0 else {})}
    item = {"type": "object", "additionalProperties": False,
            "required": ["category", "question", "options", "reasoning", "answer"],
            "properties": {
                "category": {"type": "string", "enum": list(CATEGORIES)},
                "question": text,
                "options": {"type": "array", "items": text, "minItems": 4, "maxItems": 4},
                "reasoning": text,
                "answer": {"type": "string", "enum": list(LETTERS)}}}
    questions = {"type": "array", "items": item, "minItems": 1, "maxItems": max(1, max_questions)}
    return {"type": "object", "additionalProperties": False, "required": ["questions"],
            "properties": {"questions": questions}}


def response_format(max_questions: int, max_chars: int = 0) -> dict[str, Any]:
    """The OpenAI `response_format` that asks for `reply_schema`."""
    return {"type": "json_schema", "json_schema": {
        "name": "video_questions", "schema": reply_schema(max_questions, max_chars)}}


def caption_messages(frames_parts: Sequence[dict[str, Any]], seconds: float) -> list[dict]:
    """A user turn with the clip's frames as image parts and the caption instruction."""
    text = {"type": "text", "text": CAPTION_INSTRUCTION.format(seconds=seconds)}
    return [{"role": "user", "content": [*frames_parts, text]}]

"""How a video's projector tokens become the embeddings spliced into the prompt.

VILA's two video encoders (`llava/model/encoders/video/basic.py` and `tsp.py`):
- basic: each frame's tokens, then the embedding of "\\n" (`end_tokens`); `start_tokens`
  before each frame when set.
- tsp (NVILA's temporal/spatial pooling): for each pool size [t, h, w], a frame's tokens
  viewed as a square grid [side, side, D] are averaged over consecutive groups of t frames
  and h x w cells; each pooled frame is wrapped like a basic frame, and `sep_tokens` (when
  set) follow each pool size's block; the blocks are concatenated.
Sizes that do not divide are refused (VILA's reshape fails on them; nothing is padded).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp

KINDS = ("basic", "tsp")
# `_target_` values VILA's hydra config names for each kind (package re-exports included).
VILA_TARGETS = {
    "basic": ("llava.model.encoders.BasicVideoEncoder",
              "llava.model.encoders.video.BasicVideoEncoder",
              "llava.model.encoders.video.basic.BasicVideoEncoder"),
    "tsp": ("llava.model.encoders.TSPVideoEncoder", "llava.model.encoders.video.TSPVideoEncoder",
            "llava.model.encoders.video.tsp.TSPVideoEncoder"),
}
_FIELDS = {"basic": ("start_tokens", "end_tokens"),
           "tsp": ("pool_sizes", "start_tokens", "end_tokens", "sep_tokens")}
TOKEN_FIELDS = ("start_tokens", "end_tokens", "sep_tokens")
NEWLINE = "\n"


class VideoEncoderError(ValueError):
    """A video encoder setting this project cannot honour; names the field and the value."""


@dataclasses.dataclass(frozen=True)
class VideoEncoderConfig:
    """Which encoder arranges a video's tokens, with VILA's constructor arguments.

    The token fields hold VILA's strings (what a checkpoint stores); `*_ids` hold their
    token ids, resolved by a tokenizer, except for "\\n", which is the model's
    `newline_token_id` (so a basic encoder read from any checkpoint equals the default).
    """

    kind: str = "basic"
    pool_sizes: tuple = ()  # ((t, h, w), ...); tsp only
    start_tokens: Optional[str] = None
    end_tokens: Optional[str] = NEWLINE
    sep_tokens: Optional[str] = None
    start_ids: Optional[tuple] = None
    end_ids: Optional[tuple] = None
    sep_ids: Optional[tuple] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise VideoEncoderError(f"video encoder kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "pool_sizes", _pool_sizes(self.pool_sizes, self.kind))
        if self.kind == "basic" and self.sep_tokens is not None:
            raise VideoEncoderError(f"field 'sep_tokens' is {self.sep_tokens!r}; only the tsp "
                                    "encoder has separators")
        for field in TOKEN_FIELDS:
            _check_tokens(field, getattr(self, field), getattr(self, _ids_field(field)))
            ids = getattr(self, _ids_field(field))
            if ids is not None:
                object.__setattr__(self, _ids_field(field), tuple(int(i) for i in ids))

    @property
    def pools(self) -> tuple:
        """The pool sizes the arrangement runs: the basic encoder is one pool of (1, 1, 1)."""
        return self.pool_sizes if self.kind == "tsp" else ((1, 1, 1),)

    def token_ids(self, newline_token_id: int) -> tuple:
        """(start, end, sep) token ids, each a tuple (empty when the field is unset)."""
        def ids(field):
            text, resolved = getattr(self, field), getattr(self, _ids_field(field))
            if text is None:
                return ()
            return resolved if resolved is not None else (newline_token_id,)
        return tuple(ids(field) for field in TOKEN_FIELDS)

    def cache_tag(self) -> str:
        """What, besides weights, decides the embeddings: "" for the default basic encoder."""
        if self == VideoEncoderConfig():
            return ""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _ids_field(field: str) -> str:
    return field.replace("_tokens", "_ids")


def _pool_sizes(value, kind: str) -> tuple:
    """Pool sizes as a tuple of (t, h, w) positive-integer triples; non-empty for tsp."""
    def bad(why):
        return VideoEncoderError(f"field 'pool_sizes' is {value!r}; {why}")
    if kind == "basic":
        if value:
            raise bad("only the tsp encoder pools")
        return ()
    if not isinstance(value, (list, tuple)) or not value:
        raise bad("the tsp encoder needs a list of [t, h, w] triples")
    out = []
    for size in value:
        if (not isinstance(size, (list, tuple)) or len(size) != 3
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in size)):
            raise bad(f"{size!r} is not a [t, h, w] triple of positive integers")
        out.append(tuple(size))
    return tuple(out)


def _check_tokens(field: str, text, ids) -> None:
    if text is not None and not isinstance(text, str):
        raise VideoEncoderError(f"field {field!r} is {text!r}; it must be a string or null")
    if text is None and ids:
        raise VideoEncoderError(f"field {_ids_field(field)!r} is {ids!r} but {field!r} is null")
    if text is not None and ids is None and text != NEWLINE:
        raise VideoEncoderError(f"field {field!r} is {text!r}; a tokenizer must resolve it to "
                                "token ids (pass `tokenize` when parsing)")
    if text is not None and ids is not None and len(ids) == 0:
        raise VideoEncoderError(f"field {field!r} is {text!r}, which the tokenizer encodes as "
                                "no tokens")


# ---- VILA config values -----------------------------------------------------------------

def parse_video_encoder(value: Any, tokenize: Optional[Callable[[str], Sequence[int]]] = None,
                        source: str = "video_encoder") -> VideoEncoderConfig:
    """VideoEncoderConfig from VILA's `video_encoder` value: a dict or a JSON-encoded string.

    None means VILA's default (basic). `tokenize(text) -> ids` resolves token strings
    other than "\\n". Unknown targets and fields raise VideoEncoderError naming them.
    """
    if value is None:
        return VideoEncoderConfig()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise VideoEncoderError(f"{source} is {value!r}, which is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise VideoEncoderError(f"{source} is {value!r}; expected an object with '_target_'")
    target = value.get("_target_")
    kind = next((k for k, targets in VILA_TARGETS.items() if target in targets), None)
    if kind is None:
        raise VideoEncoderError(f"field '_target_' of {source} is {target!r}; supported: "
                                + ", ".join(t[0] for t in VILA_TARGETS.values()))
    unknown = [k for k in value if k != "_target_" and k not in _FIELDS[kind]]
    if unknown:
        raise VideoEncoderError(f"field {unknown[0]!r} of {source} is {value[unknown[0]]!r}; "
                                f"{kind} encoder fields are {', '.join(_FIELDS[kind])}")
    fields = {k: value[k] for k in _FIELDS[kind] if k in value}
    try:
        return VideoEncoderConfig(kind=kind, **fields, **_resolve(fields, tokenize))
    except VideoEncoderError as error:
        raise VideoEncoderError(f"{source}: {error}") from None


def _resolve(fields: dict, tokenize) -> dict:
    """Token ids of the token strings among `fields` other than "\\n" (`newline_token_id`)."""
    if tokenize is None:
        return {}
    return {_ids_field(f): tuple(tokenize(t)) for f, t in fields.items()
            if f in TOKEN_FIELDS and isinstance(t, str) and t != NEWLINE}


def to_vila(config: VideoEncoderConfig) -> str:
    """The JSON string VILA stores as `video_encoder` (its config defaults are strings)."""
    value = {"_target_": VILA_TARGETS[config.kind][0]}
    if config.kind == "tsp":
        value["pool_sizes"] = [list(p) for p in config.pool_sizes]
    defaults = VideoEncoderConfig()
    for field in _FIELDS[config.kind]:
        if field in TOKEN_FIELDS and getattr(config, field) != getattr(defaults, field):
            value[field] = getattr(config, field)
    return json.dumps(value)


# ---- token counts and the arrangement ---------------------------------------------------

def check_grid(config: VideoEncoderConfig, side: int) -> None:
    """Raises unless every spatial pool size divides the `side` x `side` token grid."""
    for t, h, w in config.pools:
        if side % h or side % w:
            raise VideoEncoderError(f"pool size {[t, h, w]} does not divide the {side}x{side} "
                                    "grid of projector tokens per frame")


def num_video_tokens(config: VideoEncoderConfig, num_frames: int, side: int,
                     newline_token_id: int = 0) -> int:
    """Embeddings one video of `num_frames` frames becomes (grid `side` x `side` per frame)."""
    check_grid(config, side)
    check_frames(config.pools, num_frames)
    start, end, sep = (len(ids) for ids in config.token_ids(newline_token_id))
    return sum((num_frames // t) * ((side // h) * (side // w) + start + end) + sep
               for t, h, w in config.pools)


def check_frames(pools, num_frames: int) -> None:
    """Raises unless every temporal pool size of `pools` divides the frame count."""
    for t, h, w in pools:
        if num_frames % t:
            raise VideoEncoderError(f"pool size {[t, h, w]} needs a multiple of {t} frames; the "
                                    f"video has {num_frames} (set the frame count to one)")


def pool_tokens(tokens_ftd, pool_size) -> jnp.ndarray:
    """Tokens [F, side*side, D] -> [F/t, (side/h)*(side/w), D]: means over t x h x w blocks."""
    t, h, w = pool_size
    f, n, d = tokens_ftd.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise VideoEncoderError(f"{n} tokens per frame do not form a square grid")
    blocks = tokens_ftd.reshape(f // t, t, side // h, h, side // w, w, d)
    pooled = blocks.astype(jnp.float32).mean(axis=(1, 3, 5)).astype(tokens_ftd.dtype)
    return pooled.reshape(f // t, -1, d)


def arrange_video(tokens_ftd, pools, start_nd=None, end_nd=None, sep_nd=None):
    """Tokens [F, side*side, D] -> embeddings [N, D] in VILA's order.

    Per pool size: the pooled frames, each as [start, tokens, end], then `sep`; the pool
    sizes' blocks concatenated. Token embeddings are [n, D] arrays or None.
    """
    check_frames(pools, tokens_ftd.shape[0])
    blocks = []
    for pool_size in pools:
        frames_ftd = (tokens_ftd if tuple(pool_size) == (1, 1, 1)
                      else pool_tokens(tokens_ftd, pool_size))
        blocks.append(_wrap_frames(frames_ftd, start_nd, end_nd).reshape(-1, frames_ftd.shape[-1]))
        if sep_nd is not None:
            blocks.append(sep_nd.astype(frames_ftd.dtype))
    return jnp.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def _wrap_frames(frames_ftd, start_nd, end_nd):
    """[F, T, D] -> [F, start + T + end, D] with the same start/end embeddings per frame."""
    f, _, d = frames_ftd.shape
    parts = [frames_ftd]
    if start_nd is not None:
        parts.insert(0, jnp.broadcast_to(start_nd.astype(frames_ftd.dtype), (f, *start_nd.shape)))
    if end_nd is not None:
        parts.append(jnp.broadcast_to(end_nd.astype(frames_ftd.dtype), (f, *end_nd.shape)))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else frames_ftd

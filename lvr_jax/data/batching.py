"""Batching with padding to length buckets: few distinct shapes, so few compilations.

A batch's token arrays are padded to the smallest bucket that holds its longest sequence.
Training sequences are right-padded; prompts for generation are left-padded, so that every
prompt of a batch ends at the same position.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length`, which is always the last bucket."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return tuple(buckets) + (max_length,)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; ValueError when none is long enough."""
    for bucket in sorted(buckets):
        if bucket >= length:
            return bucket
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")


def pad_sequences(seqs: Sequence[np.ndarray], length: int, value: int, side: str) -> np.ndarray:
    """Stacks 1-D int sequences into [B, length], padding with `value` on `side`."""
    out = np.full((len(seqs), length), value, dtype=np.int32)
    for row, seq in enumerate(seqs):
        if side == "right":
            out[row, :len(seq)] = seq
        else:
            out[row, length - len(seq):] = seq
    return out


def _mask(seqs: Sequence[np.ndarray], length: int, side: str) -> np.ndarray:
    return pad_sequences([np.ones(len(s), np.int32) for s in seqs], length, 0, side)


class PadBatch:
    """grain batch_fn: pads token fields to a bucket, stacks arrays, lists everything else.

    `token_fields` maps a field to its pad value; `mask_field` names the 0/1 array marking
    real tokens of the first token field.
    """

    def __init__(self, token_fields: dict[str, int], mask_field: str, buckets: Sequence[int],
                 side: str):
        if side not in ("left", "right"):
            raise ValueError(f"pad side must be 'left' or 'right', got {side!r}")
        self.token_fields, self.mask_field = dict(token_fields), mask_field
        self.buckets, self.side = tuple(buckets), side

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        first = next(iter(self.token_fields))
        length = bucket_length(max(len(e[first]) for e in examples), self.buckets)
        batch = {name: pad_sequences([e[name] for e in examples], length, pad, self.side)
                 for name, pad in self.token_fields.items()}
        batch[self.mask_field] = _mask([e[first] for e in examples], length, self.side)
        for name in examples[0]:
            if name in batch:
                continue
            values = [e[name] for e in examples]
            is_array = isinstance(values[0], (np.ndarray, np.generic, int))
            batch[name] = np.stack(values) if is_array else values
        return batch

"""Server-side state: uploaded prompt embeddings (byte budget) and a staged weight push."""

from __future__ import annotations

import collections
import dataclasses
import uuid

import torch


class EmbeddingStore:
    """Embeddings by content key, least recently used evicted first beyond `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget_bytes:
            raise ValueError(f"embeddings of {size} bytes exceed the server's whole budget of "
                             f"{self.budget_bytes} bytes (--embed-budget-mb)")
        if key in self._items:
            self._items.move_to_end(key)
            return
        while self.bytes + size > self.budget_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._items[key], self.bytes = value, self.bytes + size

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "budget_bytes": self.budget_bytes}


def count_non_finite(tensor: torch.Tensor, slice_elements: int = 1 << 24) -> int:
    """NaN and +-inf entries of a float tensor, counted in float32 slices (bounded memory,
    and dtypes such as float8 that have no isfinite kernel)."""
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(part.float())).sum())
               for part in flat.split(slice_elements))


class PushError(ValueError):
    """A weight push that does not match the served model; the push is dropped."""


@dataclasses.dataclass
class StagedPush:
    """Tensors of one push, checked against the served model's names and shapes as they come."""

    expected: dict[str, tuple]
    push_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        problems = []
        for name, value in tensors.items():
            if name not in self.expected:
                problems.append(f"unexpected tensor {name!r}")
            elif tuple(value.shape) != self.expected[name]:
                problems.append(f"tensor {name!r} has shape {tuple(value.shape)}, the served "
                                f"model needs {self.expected[name]}")
            elif name in self.tensors:
                problems.append(f"tensor {name!r} was sent twice")
            elif not value.is_floating_point():
                problems.append(f"tensor {name!r} has dtype {value.dtype}; weights are floats")
            elif bad := count_non_finite(value):
                problems.append(f"tensor {name!r} has {bad} non-finite values (NaN or inf); "
                                "the trainer's weights diverged or the export is broken")
        if problems:
            raise PushError("; ".join(problems))
        self.tensors.update(tensors)

    def complete(self) -> dict[str, torch.Tensor]:
        """All tensors, or PushError naming the missing ones."""
        missing = sorted(set(self.expected) - set(self.tensors))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise PushError(f"{len(missing)} tensors missing from the push: {shown}"
                            + (" ..." if len(missing) > 5 else ""))
        return self.tensors

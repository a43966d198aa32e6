"""Server-side state: uploaded prompt embeddings (byte budget) and a staged weight push."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import time
import uuid

import torch

from rollout_bridge import wire

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                "F64": torch.float64}


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


def non_finite(tensor: torch.Tensor) -> int:
    """count_non_finite, after one cheap pass: a finite sum means every entry is finite (a
    NaN or inf makes the sum NaN or inf), so only a suspect tensor is counted. The sum keeps
    the tensor's dtype (an f32 accumulator for bf16 is 10x slower); where it overflows,
    as it can in float16, the exact count decides."""
    if tensor.ndim == 2 and not tensor.is_contiguous():
        tensor = tensor.T  # a kernel sent transposed: sum its memory in order (3x faster)
    if bool(tensor.sum().isfinite()):
        return 0
    return count_non_finite(tensor)


def parse_weight_chunk(body: bytearray) -> dict[str, torch.Tensor]:
    """A safetensors body as tensors that view `body` (no copy); tensors the chunk's metadata
    names as transposed come back as `.T` views, in Hugging Face layout. ValueError if the
    body is not safetensors (offsets must tile the data exactly, as safetensors requires)."""
    header = wire.safetensors_header(body)
    start = 8 + int.from_bytes(body[:8], "little")
    meta = json.loads(bytes(body[8:start])).get("__metadata__") or {}
    transposed = set(json.loads(meta.get(wire.TRANSPOSED_KEY, "[]")))
    tensors, end = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, stop = info["data_offsets"]
        dtype, shape = TORCH_DTYPES.get(info["dtype"]), tuple(info["shape"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {info['dtype']}; weights are floats "
                             f"({', '.join(TORCH_DTYPES)})")
        count = 1
        for n in shape:
            count *= n
        if begin != end or stop - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} has data_offsets {info['data_offsets']} that do "
                             f"not tile the data (shape {list(shape)}, {info['dtype']})")
        end = stop
        tensor = (torch.frombuffer(body, dtype=dtype, count=count, offset=start + begin)
                  if count else torch.empty(0, dtype=dtype)).reshape(shape)
        tensors[name] = tensor.T if name in transposed and tensor.ndim == 2 else tensor
    if start + end != len(body):
        raise ValueError(f"safetensors data is {len(body) - start} bytes; the header covers {end}")
    return tensors


class PushError(ValueError):
    """A weight push that does not match the served model; the push is dropped."""


@dataclasses.dataclass
class StagedPush:
    """Tensors of one push, checked against the served model's names and shapes as they come.

    Chunks may arrive in any order and in parallel: `claim` (names, shapes, duplicates)
    runs first and reserves the names, `check` (finiteness, the costly part) may then run
    in a worker thread, and `stage` keeps the tensors. `busy` marks its requests in
    progress, so the server can tell an abandoned push (`idle_s`) from a slow one."""

    expected: dict[str, tuple]
    push_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    claimed: set = dataclasses.field(default_factory=set)
    in_flight: int = 0
    last_active: float = dataclasses.field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def busy(self):
        """Around each request of this push: while one runs the push is not idle."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.last_active = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the push's last request ended (0 while one is in progress)."""
        return 0.0 if self.in_flight else time.monotonic() - self.last_active

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """claim, check and stage in one go."""
        self.claim(tensors)
        self.check(tensors)
        self.stage(tensors)

    def claim(self, tensors: dict[str, torch.Tensor]) -> None:
        problems = []
        for name, value in tensors.items():
            if name not in self.expected:
                problems.append(f"unexpected tensor {name!r}")
            elif tuple(value.shape) != self.expected[name]:
                problems.append(f"tensor {name!r} has shape {tuple(value.shape)}, the served "
                                f"model needs {self.expected[name]}")
            elif name in self.claimed:
                problems.append(f"tensor {name!r} was sent twice")
            elif not value.is_floating_point():
                problems.append(f"tensor {name!r} has dtype {value.dtype}; weights are floats")
        if problems:
            raise PushError("; ".join(problems))
        self.claimed.update(tensors)

    @staticmethod
    def check(tensors: dict[str, torch.Tensor]) -> None:
        problems = [f"tensor {name!r} has {bad} non-finite values (NaN or inf); the trainer's "
                    "weights diverged or the export is broken"
                    for name, value in tensors.items() if (bad := non_finite(value))]
        if problems:
            raise PushError("; ".join(problems))

    def stage(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update(tensors)

    def complete(self) -> dict[str, torch.Tensor]:
        """All tensors, or PushError naming the missing ones."""
        missing = sorted(set(self.expected) - set(self.tensors))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise PushError(f"{len(missing)} tensors missing from the push: {shown}"
                            + (" ..." if len(missing) > 5 else ""))
        return self.tensors

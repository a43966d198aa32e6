"""Same-host weight chunks through shared memory instead of the socket.

A server lends a client a slot (a file in /dev/shm it created, mode 0600, mapped by both);
the client copies one chunk into it and names the slot in a small request; the server views
the chunk where it lies, stages a copy and lends the slot again. Slots are kept and reused
across pushes, so their pages are allocated once. A client on another host (or user) cannot
open the file and sends the chunk over HTTP instead. Both sides need only the standard
library: the server runs in vLLM's environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import mmap
import os
import threading
from typing import Optional

PREFIX = "rollout_bridge-"
SLACK = 1 << 20  # slot bytes beyond a chunk's tensor data: room for its safetensors header


class SlotUnavailable(Exception):
    """No slot for now: the directory refused the file (full?) or none came free in time."""


class SlotTooLarge(SlotUnavailable):
    """A chunk bigger than the whole budget: it goes over HTTP."""


@dataclasses.dataclass(eq=False)
class Slot:
    index: int
    path: str
    capacity: int
    memory: mmap.mmap
    owner: Optional[str] = None  # the push holding it

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self.memory)[:nbytes]


class SlotPool:
    """The server's slots: at most `budget_bytes` of them, lent to one chunk at a time."""

    def __init__(self, directory: str, budget_bytes: int, tag: str):
        self.directory, self.budget_bytes, self.tag = directory, budget_bytes, tag
        self.slots: dict[int, Slot] = {}
        self.bytes, self._next = 0, 0
        self._released = asyncio.Event()
        remove_stale(directory)

    async def acquire(self, nbytes: int, owner: str, timeout_s: float = 60.0) -> Slot:
        """A free slot of at least `nbytes`, made (or grown) within the budget, or waited for."""
        if nbytes > self.budget_bytes:
            raise SlotTooLarge(f"a chunk of {nbytes} bytes exceeds the shared-memory budget "
                               f"of {self.budget_bytes} (--shm-mb)")
        while (slot := self._take(nbytes, owner)) is None:
            self._released.clear()  # one event loop: no release can slip in between
            try:
                await asyncio.wait_for(self._released.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise SlotUnavailable(f"no slot came free in {timeout_s:.0f} s") from None
        return slot

    def _take(self, nbytes: int, owner: str) -> Optional[Slot]:
        free = sorted((s for s in self.slots.values() if s.owner is None),
                      key=lambda s: s.capacity)
        slot = next((s for s in free if s.capacity >= nbytes), None)
        for small in free:  # too small for this chunk and the budget is short: retired
            if slot is not None or self.bytes + nbytes <= self.budget_bytes:
                break
            self._retire(small)
        if slot is None:
            if self.bytes + nbytes > self.budget_bytes:
                return None  # the budget is lent out: wait for a release
            slot = self._create(nbytes)
        slot.owner = owner
        return slot

    def _create(self, nbytes: int) -> Slot:
        index, self._next = self._next, self._next + 1
        path = os.path.join(self.directory, f"{PREFIX}{os.getpid()}-{self.tag}-{index}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise SlotUnavailable(f"cannot create {path}: {e}") from None
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC here, not SIGBUS on a later write
            memory = mmap.mmap(fd, nbytes)
        except OSError as e:
            os.unlink(path)
            raise SlotUnavailable(f"cannot allocate {nbytes} bytes in {self.directory}: {e} "
                                  "(a small /dev/shm, e.g. a container's 64 MB default?)") from None
        finally:
            os.close(fd)
        slot = self.slots[index] = Slot(index, path, nbytes, memory)
        self.bytes += nbytes
        return slot

    def _retire(self, slot: Slot) -> None:
        """Unlinked now; its memory goes when the last view of it does."""
        del self.slots[slot.index]
        self.bytes -= slot.capacity
        _unlink(slot.path)

    def lent(self, index: int, owner: str) -> Optional[Slot]:
        slot = self.slots.get(index)
        return slot if slot is not None and slot.owner == owner else None

    def release(self, slot: Slot, owner: str) -> None:
        """Lends `slot` again, unless `owner` lost it already: a push dropped while its
        chunk was being read has its slots freed, and maybe lent to the next push."""
        if slot.owner == owner:
            slot.owner = None
            self._released.set()

    def release_owner(self, owner: str) -> None:
        """Every slot a push still holds (it was committed, dropped or replaced)."""
        for slot in self.slots.values():
            if slot.owner == owner:
                slot.owner = None
        self._released.set()

    def close(self) -> None:
        for slot in list(self.slots.values()):
            self._retire(slot)

    def stats(self) -> dict:
        lent = sum(slot.owner is not None for slot in self.slots.values())
        return {"slots": len(self.slots), "lent": lent, "bytes": self.bytes,
                "budget_bytes": self.budget_bytes}


def remove_stale(directory: str) -> None:
    """Slot files of servers that are gone (killed before they could remove them)."""
    for path in glob.glob(os.path.join(directory, PREFIX + "*")):
        pid = os.path.basename(path)[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def default_directory() -> Optional[str]:
    """/dev/shm where this host has a writable one, else None (chunks go over HTTP)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SlotMaps:
    """The client's mappings of the slots servers lent it, by path (thread-safe)."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def write(self, path: str, capacity: int, buffers: list) -> None:
        """Copies the buffers one after another into the slot; OSError if this host cannot
        open it (the server is elsewhere, or another user's)."""
        memory = self._map(path, capacity)
        offset = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            memory[offset:offset + view.nbytes] = view
            offset += view.nbytes

    def _map(self, path: str, capacity: int) -> mmap.mmap:
        with self._lock:
            memory = self._maps.get(path)
            if memory is None or len(memory) != capacity:
                with open(path, "r+b") as f:
                    memory = mmap.mmap(f.fileno(), capacity)
                self._maps[path] = memory
                while len(self._maps) > self.keep:  # slots of servers that restarted
                    self._maps.pop(next(iter(self._maps))).close()
            return memory

    def close(self) -> None:
        with self._lock:
            for memory in self._maps.values():
                memory.close()
            self._maps.clear()

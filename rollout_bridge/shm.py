"""Same-host weight chunks through shared memory instead of the socket.

A server lends a client a slot (a file in /dev/shm it created, mode 0600, mapped by both);
the client copies one chunk into it and names the slot in a small request; the server views
the chunk where it lies, stages a copy and lends the slot again. Slots are kept and reused
across pushes, so their pages are allocated once; a slot still lent when its push ends
(dropped, replaced or committed) is retired, since that push's client may still write in it.
Each lend has a number the client names back, so only the lend's own chunk is read.
The client writes only into a file that is a slot: of a server on loopback, in a slot
directory nobody else can swap files in, opened without following links, a regular
file of the lent size owned by the server's user. Both sides need only the standard
library: the server runs in vLLM's environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import itertools
import mmap
import os
import re
import stat
import threading
from typing import Optional

PREFIX = "rollout_bridge-"
SLOT_NAME = re.compile(re.escape(PREFIX) + r"[0-9]+-[0-9A-Za-z]+-[0-9]+")  # pid-tag-index
SLACK = 1 << 20  # slot bytes beyond a chunk's tensor data: room for its safetensors header


class SlotUnavailable(Exception):
    """No slot for now: the directory refused the file (full?) or none came free in time."""


class SlotTooLarge(SlotUnavailable):
    """A chunk bigger than the whole budget: it goes over HTTP."""


class SlotRefused(OSError):
    """A lent path the client will not write into (not a slot of a same-host server)."""


@dataclasses.dataclass(eq=False)
class Slot:
    index: int
    path: str
    capacity: int
    memory: mmap.mmap
    owner: Optional[str] = None  # the push holding it
    lend: int = 0  # the number of its current lend, named back by the client

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self.memory)[:nbytes]


class SlotPool:
    """The server's slots: at most `budget_bytes` of them, lent to one chunk at a time."""

    def __init__(self, directory: str, budget_bytes: int, tag: str):
        self.directory = os.path.realpath(directory)  # lent paths hold no symlink
        self.budget_bytes, self.tag = budget_bytes, tag
        self.slots: dict[int, Slot] = {}
        self.bytes, self._next = 0, 0
        self._lends = itertools.count(1)
        self._released = asyncio.Event()
        remove_stale(self.directory)

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
        slot.owner, slot.lend = owner, next(self._lends)
        return slot

    def _create(self, nbytes: int) -> Slot:
        index, self._next = self._next, self._next + 1
        path = os.path.join(self.directory, f"{PREFIX}{os.getpid()}-{self.tag}-{index}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
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

    def lent(self, index: int, owner: str, lend: int) -> Optional[Slot]:
        """The slot if it is lent to `owner` under lend number `lend`, else None."""
        slot = self.slots.get(index)
        return slot if slot is not None and (slot.owner, slot.lend) == (owner, lend) else None

    def release(self, slot: Slot, owner: str) -> None:
        """Lends `slot` again, unless `owner` lost it already (its push was dropped while
        the chunk was being read: the slot was retired then)."""
        if self.slots.get(slot.index) is slot and slot.owner == owner:
            slot.owner = None
            self._released.set()

    def retire_owner(self, owner: str) -> None:
        """Every slot a push still holds when it ends (committed, dropped or replaced): its
        client may still be writing there, so no later push gets these files."""
        for slot in [s for s in self.slots.values() if s.owner == owner]:
            self._retire(slot)
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


def directory_problem(st: os.stat_result, owner: int) -> Optional[str]:
    """Why a directory with stat `st` is no place for slot files of uid `owner`, or None. It
    must belong to root or `owner`, and others may write in it only with the sticky bit (as
    /dev/shm), which keeps them from replacing or removing files they do not own."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, owner):
        return f"is owned by uid {st.st_uid}, neither root nor uid {owner}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"is writable by other users (mode {st.st_mode & 0o7777:04o}, no sticky bit): "
                "they could swap a slot file for a link to any file")
    return None


def unsafe_directory(path: str) -> Optional[str]:
    """directory_problem for this process's own slot directory `path` (None: usable)."""
    try:
        return directory_problem(os.stat(path), os.geteuid())
    except OSError as e:
        return f"cannot be used ({e.strerror})"


def default_directory() -> Optional[str]:
    """/dev/shm where this host has a writable, safe one, else None (chunks go over HTTP)."""
    usable = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
    return "/dev/shm" if usable and unsafe_directory("/dev/shm") is None else None


def file_problem(st: os.stat_result, capacity: int, owner: int) -> Optional[str]:
    """Why an opened file is not a slot lent with `capacity` by a server of uid `owner`."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != owner:
        return f"is owned by uid {st.st_uid}, not the server's uid {owner}"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} links (a slot file has one)"
    if st.st_mode & 0o077:
        return f"has mode {st.st_mode & 0o777:04o} (a slot file is 0600)"
    if st.st_size != capacity:
        return f"has {st.st_size} bytes, not the {capacity} lent"
    return None


def open_slot(path: str, capacity: int, directory: str, owner: int) -> mmap.mmap:
    """`path` mapped read-write after checking, on what was opened, that it is a slot file in
    `directory` of a server running as uid `owner`; SlotRefused naming the problem."""
    folder, name = os.path.split(path)
    if folder != directory or not SLOT_NAME.fullmatch(name):
        raise SlotRefused(f"{path!r} is not a slot file ({PREFIX}<pid>-<tag>-<n>) in the "
                          f"server's slot directory {directory!r}")
    if os.path.realpath(folder) != folder:
        raise SlotRefused(f"the slot directory {folder!r} is reached through a symlink")
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        problem = directory_problem(os.fstat(dir_fd), owner)
        if problem:
            raise SlotRefused(f"the slot directory {folder!r} {problem}")
        # O_NOFOLLOW: a symlink fails (ELOOP); O_NONBLOCK: a FIFO cannot stall the open.
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        problem = file_problem(os.fstat(fd), capacity, owner)
        if problem:
            raise SlotRefused(f"{path!r} {problem}")
        return mmap.mmap(fd, capacity)
    finally:
        os.close(fd)


class SlotMaps:
    """The client's mappings of the slots servers lent it, by path (thread-safe)."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._maps: dict[tuple, mmap.mmap] = {}
        self._lock = threading.Lock()

    def write(self, path: str, capacity: int, buffers: list, directory: str,
              owner: int) -> None:
        """Copies the buffers one after another into the slot; OSError (SlotRefused for a
        file that is no slot) if it cannot be opened here or is not a slot."""
        memory = self._map(path, capacity, directory, owner)
        offset = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            memory[offset:offset + view.nbytes] = view
            offset += view.nbytes

    def _map(self, path: str, capacity: int, directory: str, owner: int) -> mmap.mmap:
        """A mapping checked once when made; slot paths are never reused for another file
        by a server, so the mapping stays the server's slot."""
        key = (path, capacity, directory, owner)
        with self._lock:
            memory = self._maps.pop(key, None)  # back in last: the oldest is the least used
            if memory is None:
                memory = open_slot(path, capacity, directory, owner)
            self._maps[key] = memory
            while len(self._maps) > self.keep:  # retired slots, servers that restarted
                self._maps.pop(next(iter(self._maps))).close()
            return memory

    def close(self) -> None:
        with self._lock:
            for memory in self._maps.values():
                memory.close()
            self._maps.clear()

"""The rollout server's weight pushes: one at a time, chunks over HTTP or through lent
shared-memory slots, staged as they come and committed all at once.

A push belongs to the client that began it. Another `POST /weights` gets 409
push_in_progress while it is active; it takes the push over only with {"replace": true}
(a restarted trainer whose predecessor is gone) or once the push has had no request for
`--push-idle-s` seconds (its trainer died). A version holds exactly its push's bytes: a
dropped push's requests get 404 unknown_push, its lent slots are retired (no later push
gets a file its client may still write), and a slot chunk is read only under the lend
number it was lent with.
"""

from __future__ import annotations

import logging
import os
import re

from aiohttp import web

from rollout_bridge import shm
from rollout_bridge.requests import BadRequest
from rollout_bridge.store import PushError, StagedPush, parse_weight_chunk

log = logging.getLogger("rollout_bridge.server")
SLOT_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() also takes '٣' and fails on 5000


class WeightPushes:
    """The push in progress, the slots lent to it, and the routes that drive it; `server`
    (a RolloutServer) holds the engine, its lock and the serving version."""

    def __init__(self, server, slots: shm.SlotPool | None, idle_s: float = 60.0):
        self.server, self.slots, self.idle_s = server, slots, idle_s
        self.push: StagedPush | None = None

    def routes(self) -> list:
        return [web.post("/weights", self.begin), web.put("/weights/{push_id}", self.chunk),
                web.post("/weights/{push_id}/slots", self.lend_slot),
                web.post("/weights/{push_id}/slots/{slot}", self.slot_chunk),
                web.post("/weights/{push_id}/commit", self.commit)]

    async def begin(self, request):
        """A new push; {"replace": true} drops one in progress, an idle one is dropped anyway."""
        replace = replace_flag(await self.server.json_body(request, optional=True))
        if self.push is not None:
            self._take_over(self.push, replace)
        self.push = StagedPush(dict(self.server.engine.shapes))
        shared = ({"dir": self.slots.directory, "uid": os.geteuid()}
                  if self.slots is not None else None)
        return web.json_response({"push_id": self.push.push_id, "version": self.server.version,
                                  "shm": shared})

    def _take_over(self, push: StagedPush, replace: bool) -> None:
        idle = push.idle_s()
        if not replace and idle < self.idle_s:
            raise BadRequest(409, "push_in_progress", f"another weight push ({push.push_id[:8]}, "
                             f"{len(push.tensors)} tensors staged, last request {idle:.0f} s "
                             "ago) is in progress on this server: wait for it to commit, or "
                             "begin with {\"replace\": true} to drop it (a restarted trainer); "
                             f"a push idle for {self.idle_s:.0f} s (--push-idle-s) is dropped "
                             "by the next begin")
        log.warning("weight push %s dropped: %s", push.push_id,
                    "replaced by a new one" if replace else f"idle for {idle:.0f} s")
        self._drop(push)

    def _staged(self, request) -> StagedPush:
        push_id = request.match_info["push_id"]
        if self.push is None or self.push.push_id != push_id:
            raise BadRequest(404, "unknown_push", f"no weight push {push_id!r} in progress "
                             "(it was committed, rejected, or dropped for a newer one)")
        return self.push

    async def chunk(self, request):
        """One chunk in the request's body."""
        push = self._staged(request)
        with push.busy():
            return await self._stage_chunk(request, push, await read_body(request))

    async def lend_slot(self, request):
        """A shared-memory slot of at least `bytes` for one chunk of this push (waits while
        the budget is lent out). 413 too_large: PUT this chunk; 409 shm_unavailable: PUT
        the push's chunks."""
        push = self._staged(request)
        with push.busy():
            nbytes = byte_count(await self.server.json_body(request))
            if self.slots is None:
                raise BadRequest(409, "shm_unavailable", "this server takes no chunks through "
                                 "shared memory (--shm-mb 0, or no usable --shm-dir); PUT them")
            try:
                slot = await self.slots.acquire(nbytes, push.push_id)
            except shm.SlotTooLarge as e:
                raise BadRequest(413, "too_large", f"{e}; PUT the chunk instead") from None
            except shm.SlotUnavailable as e:
                raise BadRequest(409, "shm_unavailable", f"{e}; PUT the chunk instead") from None
            if self.push is not push:  # dropped or replaced while waiting
                self.slots.release(slot, push.push_id)
                self._staged(request)
            return web.json_response({"slot": slot.index, "lend": slot.lend, "path": slot.path,
                                      "capacity": slot.capacity, "version": self.server.version})

    async def slot_chunk(self, request):
        """The chunk a same-host client wrote into a lent slot; the slot is lent again after."""
        index = slot_index(request.match_info["slot"])
        body = await self.server.json_body(request)
        nbytes, lend = byte_count(body), lend_number(body)
        push = self._staged(request)  # after the read: a bad chunk may have dropped it since
        with push.busy():
            slot = self.slots.lent(index, push.push_id, lend) if self.slots is not None else None
            if slot is None:
                raise BadRequest(404, "unknown_slot", f"slot {index} is not lent to push "
                                 f"{push.push_id!r} under lend {lend}")
            if nbytes > slot.capacity:
                raise BadRequest(400, "bad_request", f"bytes {nbytes} exceeds slot {index}'s "
                                 f"capacity {slot.capacity}")
            try:
                return await self._stage_chunk(request, push, slot.view(nbytes))
            finally:
                self.slots.release(slot, push.push_id)

    async def _stage_chunk(self, request, push: StagedPush, body) -> web.Response:
        """Chunks come in any order and in parallel: parsed as views of the body, names
        claimed on the loop, finiteness checked and the engine's copy made in a worker
        thread, then staged."""
        self._staged(request)  # not dropped by another chunk while this body was read
        try:
            tensors = parse_weight_chunk(body)
        except Exception as e:  # not a safetensors body
            self._drop(push)
            raise BadRequest(400, "bad_body", f"weight chunk is not a safetensors body: {e}")
        try:
            push.claim(tensors)
            staged = await self.server.in_thread(self._checked_copy, tensors)
        except PushError as e:
            self._drop(push)
            raise BadRequest(422, "bad_weights", f"{e}; push dropped, serving version "
                             f"{self.server.version}") from None
        push = self._staged(request)  # still the push in progress after the wait
        push.stage(staged)
        return web.json_response({"received": len(push.tensors), "version": self.server.version})

    def _checked_copy(self, tensors):
        StagedPush.check(tensors)
        return self.server.engine.stage(tensors)

    def _drop(self, push: StagedPush) -> None:
        if self.push is push:
            self.push = None
        if self.slots is not None:
            self.slots.retire_owner(push.push_id)

    async def commit(self, request):
        self._staged(request)
        wanted = (await self.server.json_body(request)).get("version", self.server.version + 1)
        push = self._staged(request)  # not replaced while the body was read
        self._drop(push)
        try:
            tensors = push.complete()
        except PushError as e:
            raise BadRequest(422, "bad_weights", f"{e}; serving version "
                             f"{self.server.version}") from None
        return await self.server.apply(tensors, wanted)


def replace_flag(body: dict) -> bool:
    """The begin request's optional {"replace": bool}; 400 naming anything else."""
    unknown = sorted(set(body) - {"replace"})
    if unknown:
        raise BadRequest(400, "bad_request", f"POST /weights takes only 'replace', got "
                         f"{unknown[0]!r}")
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise BadRequest(400, "bad_request", f"replace must be true or false, got {replace!r}")
    return replace


def byte_count(body: dict) -> int:
    nbytes = body.get("bytes")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1:
        raise BadRequest(400, "bad_request", f"bytes must be a positive integer, got {nbytes!r}")
    return nbytes


def lend_number(body: dict) -> int:
    lend = body.get("lend")
    if not isinstance(lend, int) or isinstance(lend, bool) or lend < 1:
        raise BadRequest(400, "bad_request", f"lend must be the integer 'lend' that POST "
                         f"/weights/{{push_id}}/slots answered with the slot, got {lend!r}")
    return lend


def slot_index(text: str) -> int:
    """The slot number of a route, or 400 naming the bad id."""
    if SLOT_ID.fullmatch(text):
        return int(text)
    shown = repr(text[:24]) + (f"... ({len(text)} characters)" if len(text) > 24 else "")
    raise BadRequest(400, "bad_request", f"slot id {shown} is not a slot number: use the "
                     "'slot' integer that POST /weights/{push_id}/slots answered")


async def read_body(request: web.Request) -> bytearray:
    """The body in one writable buffer sized from Content-Length (one copy out of the
    socket's buffers, none for joining), so tensors can view it."""
    size = request.content_length
    if size is None:
        return bytearray(await request.read())
    if size > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(request.client_max_size, size)
    body, filled = bytearray(size), 0
    async for data in request.content.iter_any():
        body[filled:filled + len(data)] = data
        filled += len(data)
    if filled != size:
        raise BadRequest(400, "bad_body", f"body has {filled} bytes; Content-Length said {size}")
    return body

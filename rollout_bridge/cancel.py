"""Generate work whose client has gone: not started, or stopped between two tokens.

aiohttp keeps running a handler after its client disconnects (the request loses its
transport), so the server looks: before engine work starts (a queued request of a client
that timed out is dropped) and while it runs. The transformers engine is then stopped
before its next forward pass, i.e. between tokens; vLLM's blocking generate offers no such
point, so it finishes the batch it runs.
"""

from __future__ import annotations

import asyncio
import threading

from rollout_bridge.engines import TransformersEngine


class ClientGone(Exception):
    """The client closed its connection: nobody reads the answer."""


def client_gone(request) -> bool:
    """Whether the request's client has disconnected (aiohttp then drops the transport)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class TokenStop:
    """A stop the engine checks before each forward pass of its model (each token), where
    the engine has one this server can hook: the transformers engine's torch model."""

    def __init__(self, engine):
        self.asked = threading.Event()
        self.between_tokens = isinstance(engine, TransformersEngine)
        if self.between_tokens:
            engine.model.register_forward_pre_hook(self._check)

    def _check(self, module, args) -> None:
        if self.asked.is_set():
            raise ClientGone("stopped between tokens: its client closed the connection")


async def run_unless_gone(request, stop: TokenStop, fn, *args, poll_s: float = 0.05):
    """fn(*args) in a worker thread, asking `stop` once the request's client has gone;
    returns only when the thread is done (the caller's engine lock covers it all)."""
    stop.asked.clear()
    work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        while not work.done():
            await asyncio.wait([work], timeout=poll_s)
            if client_gone(request):
                stop.asked.set()
        return work.result()
    finally:
        stop.asked.clear()

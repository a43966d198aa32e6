"""Generate work whose client has gone: not started, or stopped between two tokens.

aiohttp keeps running a handler after its client disconnects (the request loses its
transport), so the server looks: before engine work starts (a queued request of a client
that timed out is dropped) and while it runs, setting the `stop` event the engine's
generate takes. The transformers engine stops between tokens; vLLM's blocking generate
offers no such point, so it finishes the batch it runs.
"""

from __future__ import annotations

import asyncio
import functools
import threading

from rollout_bridge.engines import GenerateStopped


class ClientGone(Exception):
    """The client closed its connection: nobody reads the answer."""


def client_gone(request) -> bool:
    """Whether the request's client has disconnected (aiohttp then drops the transport)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def run_unless_gone(request, generate, *args, poll_s: float = 0.05):
    """generate(*args, stop=event) in a worker thread, setting the event once the request's
    client has gone (ClientGone if the engine stopped); returns only when the thread is done
    (the caller's engine lock covers it all)."""
    stop = threading.Event()
    work = asyncio.get_running_loop().run_in_executor(
        None, functools.partial(generate, *args, stop=stop))
    while not work.done():
        await asyncio.wait([work], timeout=poll_s)
        if client_gone(request):
            stop.set()
    try:
        return work.result()
    except GenerateStopped as e:
        raise ClientGone(f"{e}: its client closed the connection") from None

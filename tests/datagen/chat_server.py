"""A small real OpenAI-compatible chat server on loopback, scriptable for pipeline tests.

It speaks HTTP like vLLM does (`GET /v1/models`, `POST /v1/chat/completions`): image
requests get a caption; reasoning requests get the next scripted reply, or by default a
valid reply built from the prompt's clip timeline. Tests can make it fail with given
HTTP statuses, slow it down, or hold a request until released (to kill a client mid-video);
or break every chat request from the n-th on: an HTTP status, a body that is not JSON,
no answer at all, or an answer trickled a byte at a time.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
import time
from typing import Any, Iterator

_MIX = re.compile(r"Write (\d+) multiple-choice questions about this video: (.*)\.")
_TIMES = re.compile(r"^\[(\d+:\d\d)-(\d+:\d\d)\] (.*)$", re.MULTILINE)


def valid_reply(prompt: str) -> str:
    """A well-formed reply to a reasoning prompt: the asked mix, citing the prompt's clip times."""
    clips = _TIMES.findall(prompt)
    mix = _MIX.search(prompt)
    wanted = [(name, int(n)) for n, name in
              (part.split(" ", 1) for part in mix.group(2).split(", "))] if mix else []
    questions = []
    for category, count in wanted:
        for k in range(count):
            first, last = clips[0], clips[-1]
            questions.append({
                "category": category,
                "question": f"{category} question {k}: what links the start ({first[0]}) and the "
                            f"end ({last[1]}) of the video?",
                "options": [f"event {i} of {category}" for i in range(4)],
                "reasoning": f"At {first[0]}-{first[1]} the video shows {first[2]!r}. At "
                             f"{last[0]}-{last[1]} it shows {last[2]!r}. So option B.",
                "answer": "B"})
    return json.dumps({"questions": questions})


class ChatScript:
    """What the server answers; tests change it between or during runs (thread-safe enough)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.reasoning_replies: list[str] = []  # consumed first; then valid_reply
        self.fail_statuses: list[int] = []  # next requests answered with these statuses
        self.delay_seconds = 0.0
        self.hold_reasoning_request: int | None = None  # hold the n-th (1-based) reasoning call
        self.held = threading.Event()
        self.release = threading.Event()
        self.in_flight = {"caption": 0, "reasoning": 0}
        self.max_in_flight = {"caption": 0, "reasoning": 0}
        self.reasoning_calls = 0
        # every chat request from number `broken_from` (1-based) on gets `broken` (None: none):
        # an int status, "garbage" (200, an HTML body), "hang" (no answer until the server
        # closes) or "trickle" (200 and a byte every 0.1 s, never the whole body)
        self.broken: int | str | None = None
        self.broken_from = 1
        self.chat_calls = 0

    def breaks(self) -> int | str | None:
        """What the next chat request gets, if it is broken (counts the request)."""
        with self.lock:
            self.chat_calls += 1
            return self.broken if self.chat_calls >= self.broken_from else None

    def caption_requests(self) -> list[dict]:
        return [r for r in self.requests if _has_images(r)]

    def reasoning_requests(self) -> list[dict]:
        return [r for r in self.requests if not _has_images(r)]


def _has_images(body: dict) -> bool:
    content = body["messages"][-1]["content"]
    return isinstance(content, list) and any(p.get("type") == "image_url" for p in content)


def _completion(text: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": "fake-llm",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text}}]}


def _answer(script: ChatScript, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one chat request."""
    with script.lock:
        script.requests.append(body)
        if script.fail_statuses:
            return script.fail_statuses.pop(0), {"error": {"message": "scripted failure"}}
        if _has_images(body):
            frames = sum(p.get("type") == "image_url" for p in body["messages"][-1]["content"])
            return 200, _completion(f"A clip seen through {frames} frames; a shape moves.")
        script.reasoning_calls += 1
        hold = script.hold_reasoning_request == script.reasoning_calls
        scripted = script.reasoning_replies.pop(0) if script.reasoning_replies else None
    if hold:
        script.held.set()
        script.release.wait(120)
    text = scripted if scripted is not None else valid_reply(body["messages"][-1]["content"])
    return 200, _completion(text)


def _handler(script: ChatScript):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": "fake-llm"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def _broken(self, how: int | str) -> None:
            """Answers the way `ChatScript.broken` says."""
            if isinstance(how, int):
                return self._send(how, {"error": {"message": "scripted failure"}})
            if how == "hang":
                script.release.wait(120)
                return None
            data = b"<html>\n<body>502 Bad Gateway</body>\n</html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(10_000 if how == "trickle" else len(data)))
            self.end_headers()
            if how == "garbage":
                return self.wfile.write(data)
            with contextlib.suppress(OSError):  # the client gave up: the socket is closed
                while not script.release.wait(0.1):
                    self.wfile.write(b" ")
                    self.wfile.flush()

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if (how := script.breaks()) is not None:
                with script.lock:
                    script.requests.append(body)
                return self._broken(how)
            kind = "caption" if _has_images(body) else "reasoning"
            with script.lock:
                script.in_flight[kind] += 1
                script.max_in_flight[kind] = max(script.max_in_flight[kind],
                                                 script.in_flight[kind])
            try:
                time.sleep(script.delay_seconds)
                answer = _answer(script, body)
            finally:  # before the reply leaves, or the client's next request may count twice
                with script.lock:
                    script.in_flight[kind] -= 1
            self._send(*answer)

        def log_message(self, *args):  # keep test output quiet
            pass

    return Handler


@contextlib.contextmanager
def chat_server() -> Iterator[tuple[str, ChatScript]]:
    """Serves on 127.0.0.1 (a free port) in a thread; yields (base_url ending in /v1, script)."""
    script = ChatScript()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        script.release.set()
        server.shutdown()
        server.server_close()


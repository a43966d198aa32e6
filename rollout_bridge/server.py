"""Rollout server: versioned weight pushes, cached prompt embeddings, sampling over HTTP.

    python -m rollout_bridge.server --model DIR [--engine vllm|transformers|auto]
        [--host 127.0.0.1] [--port 8470] [--token SECRET] [--max-model-len N]
        [--shm-dir /dev/shm] [--shm-mb 2048] [--push-idle-s 60]

JSON for control, safetensors bodies for tensors, no pickle. Routes:
  GET  /health                      status, engine, weight version, instance id
  POST /weights                     {"replace": bool?} start a push -> {"push_id", "shm"}
  PUT  /weights/{push_id}           one safetensors chunk of Hugging Face tensors
  POST /weights/{push_id}/slots     {"bytes"} -> a shared-memory slot lent to a same-host client
  POST /weights/{push_id}/slots/{i} {"bytes", "lend"}: the chunk the client wrote into slot i
  POST /weights/{push_id}/commit    {"version": int?} -> apply all at once, or 4xx and keep the old
  HEAD/PUT /embeddings/{sha256}     prompt embeddings [N, D] keyed by the body's sha256
  POST /generate                    {"prompts": [{"before", "embeddings", "after"}], "n", ...}
Every response carries the serving weight version (header X-Weight-Version, and in JSON);
every error is JSON {"error", "code"}: 4xx for input that cannot be served, 500 for a bug.
Binding beyond loopback needs --token; with a token every route needs `Authorization: Bearer`.
One push at a time: a begin while another push is active gets 409 push_in_progress; a
restarted trainer takes over with {"replace": true}, and a push idle for --push-idle-s is
dropped by the next begin. A --shm-dir that other users can write (without the sticky bit
of /dev/shm) or that another user owns stops the server at start. A generate whose client
disconnects is not started, or stopped between tokens (transformers engine).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import sys
import uuid

from aiohttp import web
from safetensors.torch import load as load_safetensors

from rollout_bridge import shm, wire
from rollout_bridge.cancel import ClientGone, client_gone, run_unless_gone
from rollout_bridge.pushes import WeightPushes
from rollout_bridge.requests import BadRequest, parse_generate
from rollout_bridge.store import EmbeddingStore, count_non_finite
from rollout_bridge.wire import is_loopback

log = logging.getLogger("rollout_bridge.server")
VERSION_HEADER = "X-Weight-Version"


def json_error(e: BadRequest) -> web.Response:
    return web.json_response({"error": e.message, "code": e.code}, status=e.status)


def internal_error(request: web.Request, e: Exception) -> BadRequest:
    """A JSON 500 for an exception no check expected (a bug: the traceback is in the log)."""
    log.exception("%s %s failed", request.method, request.path)
    return BadRequest(500, "internal_error", f"{request.method} {request.path}: "
                      f"{type(e).__name__}: {e} (a server bug; the traceback is in its log)")


class RolloutServer:
    """The state behind the routes: engine, weight version, embeddings, weight pushes."""

    def __init__(self, engine, *, token: str | None = None, embed_budget_bytes: int = 1 << 30,
                 max_concurrent: int = 4, max_new_tokens: int = 8192, max_n: int = 64,
                 slots: shm.SlotPool | None = None, push_idle_s: float = 60.0):
        self.engine, self.token = engine, token
        self.version = 0
        self.instance = uuid.uuid4().hex  # changes on restart: clients then push again
        self.embeddings = EmbeddingStore(embed_budget_bytes)
        # slots: shared memory for same-host pushes (None: HTTP bodies only)
        self.pushes = WeightPushes(self, slots, push_idle_s)
        self.engine_lock = asyncio.Lock()  # a weight apply never overlaps a generate
        self.generate_slots = asyncio.Semaphore(max_concurrent)
        self.max_new_tokens, self.max_n = max_new_tokens, max_n
        self.hidden = engine.embed_table.shape[1]
        self.vocab = engine.embed_table.shape[0]

    # ---- plumbing ----------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Auth first, then the handler; every answer (errors too) names the weight version."""
        try:
            self._authorize(request)
            response = await handler(request)
        except BadRequest as e:
            response = json_error(e)
        except web.HTTPRequestEntityTooLarge as e:
            response = BadRequest(413, "too_large", f"request body too large ({e.text}); raise "
                                  "--max-request-mb or send smaller chunks")
            response = json_error(response)
        except web.HTTPException as e:  # aiohttp's own 404/405 for unknown routes
            if e.status_code < 400:
                raise
            response = BadRequest(e.status_code, e.reason.lower().replace(" ", "_"),
                                  f"{request.method} {request.path}: {e.reason}")
            response = json_error(response)
        except Exception as e:  # never aiohttp's plain-text 500 without the version
            response = json_error(internal_error(request, e))
        response.headers[VERSION_HEADER] = str(self.version)
        return response

    def _authorize(self, request: web.Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise BadRequest(401, "unauthorized", "missing or wrong bearer token "
                             "(send 'Authorization: Bearer <token>')")

    async def in_thread(self, fn, *args):
        """Engine work off the event loop, so health and uploads stay responsive."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ---- routes ------------------------------------------------------------------------
    async def health(self, request):
        return web.json_response({"status": "ok", "engine": self.engine.name,
                                  "version": self.version, "instance": self.instance,
                                  "max_model_len": self.engine.max_model_len,
                                  "protocol": wire.PROTOCOL_VERSION,
                                  "embeddings": self.embeddings.stats(),
                                  "shm": slots.stats() if (slots := self.pushes.slots) else None})

    async def apply(self, tensors, wanted) -> web.Response:
        """Loads a complete push as version `wanted` (above the serving one), or 409."""
        async with self.engine_lock:  # the check too: another commit may be applying
            if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted <= self.version:
                raise BadRequest(409, "stale_version", f"version {wanted!r} is not above the "
                                 f"serving version {self.version}")
            await self.in_thread(self.engine.apply, tensors)
            self.version = wanted
        log.warning("weights version %d applied (%d tensors)", wanted, len(tensors))
        return web.json_response({"version": self.version})

    async def has_embeddings(self, request):
        known = request.match_info["key"] in self.embeddings
        return web.Response(status=200 if known else 404)

    async def put_embeddings(self, request):
        key = request.match_info["key"]
        body = await request.read()
        if wire.content_key(body) != key:
            raise BadRequest(400, "key_mismatch", f"the body's sha256 is not {key!r}")
        try:
            embeds = load_safetensors(body)[wire.EMBEDS_NAME]
        except Exception as e:
            raise BadRequest(400, "bad_body", f"embeddings body must be safetensors with one "
                             f"tensor {wire.EMBEDS_NAME!r}: {e}") from None
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden or not embeds.is_floating_point():
            raise BadRequest(422, "bad_embeddings", f"embeddings must be float [N, {self.hidden}]"
                             f", got {embeds.dtype} {tuple(embeds.shape)}")
        if bad := count_non_finite(embeds):
            raise BadRequest(422, "bad_embeddings", f"embeddings {key[:12]}... have {bad} "
                             "non-finite values (NaN or inf); not stored")
        try:
            self.embeddings.put(key, embeds.to(self.engine.dtype))
        except ValueError as e:
            raise BadRequest(413, "too_large", str(e)) from None
        return web.json_response({"key": key, "version": self.version})

    async def generate(self, request):
        job = parse_generate(await self.json_body(request), self)
        async with self.generate_slots:
            async with self.engine_lock:
                if job.version is not None and job.version != self.version:
                    raise BadRequest(409, "version_mismatch", f"request wants weights version "
                                     f"{job.version}; serving {self.version} (push first)")
                try:
                    outputs = await self._sample(request, job)
                except ClientGone as e:  # nobody reads this answer; the log says why it ended
                    log.warning("generate of %d prompts not finished: %s", len(job.prompts), e)
                    raise BadRequest(499, "client_closed", str(e)) from None
                version = self.version
        return web.json_response({"version": version, "outputs": [
            [{"token_ids": t, "logprobs": lp} for t, lp in samples] for samples in outputs]})

    async def _sample(self, request, job):
        """The engine's samples for `job`, unless its client has gone (ClientGone) before or
        while they are made: queued work of a client that timed out is never started."""
        if client_gone(request):
            raise ClientGone("its client closed the connection while it waited its turn")
        prompts = [self._prompt_embeds(p) for p in job.prompts]
        self._check_length(prompts, job.sampling.max_new_tokens)
        try:
            return await run_unless_gone(request, self.engine.generate, prompts, job.sampling,
                                         job.seed)
        except self.engine.rejects as e:  # the engine's own validation (vLLM's limits)
            raise BadRequest(422, "engine_rejected", f"{type(e).__name__}: {e}") from e

    def _prompt_embeds(self, prompt):
        """Text embeddings from the current weights around the uploaded video embeddings."""
        import torch
        parts = [self.engine.embed(prompt.before)] if prompt.before else []
        if prompt.embeddings is not None:
            video = self.embeddings.get(prompt.embeddings)
            if video is None:
                raise BadRequest(404, "unknown_embeddings", f"no embeddings {prompt.embeddings!r}"
                                 " on this server (upload them first; they may have been evicted)")
            parts.append(video)
        if prompt.after:
            parts.append(self.engine.embed(prompt.after))
        return torch.cat(parts, 0)

    def _check_length(self, prompts_td, max_tokens: int) -> None:
        """BadRequest unless every prompt + max_tokens fits in the engine's max_model_len."""
        limit = self.engine.max_model_len
        for i, prompt in enumerate(prompts_td):
            if len(prompt) + max_tokens > limit:
                raise BadRequest(400, "too_long", f"prompts[{i}]: {len(prompt)} prompt tokens "
                                 f"+ max_tokens {max_tokens} = {len(prompt) + max_tokens} "
                                 f"exceeds the served model's limit of {limit} (--max-model-len)")

    async def json_body(self, request, optional: bool = False) -> dict:
        """The request's JSON object ({} for no body where `optional`), or 400."""
        if optional and not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise  # the middleware's 413
        except Exception:
            raise BadRequest(400, "bad_json", "request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "bad_json", "request body must be a JSON object")
        return body

    def app(self, max_request_bytes: int) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=max_request_bytes)
        app.add_routes([web.get("/health", self.health), *self.pushes.routes(),
                        web.head("/embeddings/{key}", self.has_embeddings),
                        web.put("/embeddings/{key}", self.put_embeddings),
                        web.post("/generate", self.generate)])
        return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rollout_bridge.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Qwen2 directory or VILA directory (uses llm/)")
    p.add_argument("--engine", default="auto", choices=("auto", "vllm", "transformers"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--token", default=os.environ.get("ROLLOUT_TOKEN"),
                   help="bearer token (or $ROLLOUT_TOKEN); required off loopback")
    p.add_argument("--max-request-mb", type=int, default=1024)
    p.add_argument("--embed-budget-mb", type=int, default=4096)
    p.add_argument("--shm-dir", default=shm.default_directory(),
                   help="where same-host clients get shared-memory slots for weight chunks "
                        "(default /dev/shm where writable); refused if other users can "
                        "write it without the sticky bit, or if another user owns it")
    p.add_argument("--shm-mb", type=int, default=2048,
                   help="bytes of slots lent at once (0: chunks only over HTTP)")
    p.add_argument("--push-idle-s", type=float, default=60.0,
                   help="a weight push with no request for this long may be taken over by "
                        "another client's begin (its trainer died)")
    p.add_argument("--max-concurrent", type=int, default=4, help="generate requests at once")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + max_tokens served (default: the model's "
                        "max_position_embeddings); longer requests get 400")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    args = p.parse_args(argv)
    if not is_loopback(args.host) and not args.token:
        p.error(f"--host {args.host} is not loopback: pass --token (or set ROLLOUT_TOKEN) so "
                "that only the trainer can push weights")
    if args.shm_dir and args.shm_mb > 0:
        args.shm_dir = os.path.realpath(args.shm_dir)
        if problem := shm.unsafe_directory(args.shm_dir):
            p.exit(2, f"{p.prog}: error: --shm-dir {args.shm_dir} {problem}; pass a directory "
                   "only this user can write (chmod go-w), /dev/shm, or --shm-mb 0 for HTTP "
                   "pushes only\n")
    return args


def model_problem(path: str) -> str | None:
    """Why `--model` cannot be served (None when it can): a missing folder, a file, or a
    folder with no config.json of its own or in llm/."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isdir(path):
        return "is a file, not a folder"
    if not any(os.path.isfile(os.path.join(path, sub, "config.json")) for sub in ("", "llm")):
        return "holds no config.json (nor llm/config.json)"
    return None


def check_model(path: str) -> None:
    """Stops the server in one line (exit 2) before any engine loads when `--model` is unusable."""
    if problem := model_problem(path):
        print(f"python -m rollout_bridge.server: error: --model {path} {problem}; pass a "
              "Qwen2 directory or a VILA directory (its llm/ is served), e.g. a training run's "
              "model/ export", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_model(args.model)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.engine in ("vllm", "auto"):
        # The engine core in this process: weight loads call the model directly.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rollout_bridge.engines import make_engine
    extra = ({} if args.engine == "transformers" else
             {"gpu_memory_utilization": args.gpu_memory_utilization})
    engine = make_engine(args.engine, args.model, args.dtype, args.max_model_len, **extra)
    slots = (shm.SlotPool(args.shm_dir, args.shm_mb << 20, uuid.uuid4().hex[:8])
             if args.shm_dir and args.shm_mb > 0 else None)
    server = RolloutServer(engine, token=args.token, embed_budget_bytes=args.embed_budget_mb << 20,
                           max_concurrent=args.max_concurrent, slots=slots,
                           push_idle_s=args.push_idle_s)
    log.warning("serving %s with the %s engine on %s:%d", args.model, engine.name, args.host,
                args.port)
    app = server.app(args.max_request_mb << 20)
    if slots is not None:
        async def remove_slots(_):
            slots.close()
        app.on_cleanup.append(remove_slots)
    web.run_app(app, host=args.host, port=args.port, print=None, reuse_address=True)


if __name__ == "__main__":
    main()

"""Weight sync benchmark: one LLM push to a loopback rollout server (transformers engine),
the before-style push (safetensors bytes, chunks one after another) against the current
one (views of the parameters, parallel chunks, the server's copy staged while chunks
arrive) over HTTP and through the shared-memory slots a same-host server lends, f32 and
bf16 on the wire. MB/s counts the bytes on the wire over the whole push (export + transfer
+ validation + apply); the trainer's pause is how long `push` blocks it.

    python -m benchmarks.weight_sync --size_mb 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import jax

WIRE_DTYPES = {"f32": None, "bf16": "bfloat16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.weight_sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_mb", type=float, default=1000, help="f32 size of the LLM")
    p.add_argument("--wire", nargs="+", default=["f32", "bf16"], choices=tuple(WIRE_DTYPES),
                   help="dtypes on the wire")
    p.add_argument("--engine_dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="the server's weights (bf16 keeps a 1 GB run within ~3 GB of RAM)")
    p.add_argument("--chunk_mb", type=int, default=64)
    p.add_argument("--threads", type=int, default=4, help="parallel uploads of the new push")
    p.add_argument("--repeats", type=int, default=2, help="pushes per row (the best is kept)")
    return p.parse_args(argv)


def llm_of_size(size_mb: float):
    """A random LongVILA whose LLM holds about `size_mb` MB of f32 weights (untied head)."""
    from flax import nnx
    from lvr_jax.model import PRESETS, LongVILA
    hidden = 1024 if size_mb >= 200 else 128
    vocab = 32000 if size_mb >= 200 else 1024
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * 4 * hidden)
    layers = max(1, round((size_mb * 1e6 - 4 * 2 * vocab * hidden) / per_layer))
    base = PRESETS["tiny"](vocab_size=vocab)
    llm = dataclasses.replace(base.llm, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=hidden // 64,
                              num_key_value_heads=hidden // 256 or 1, tie_word_embeddings=False)
    model = LongVILA(base.replace(llm=llm), rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    return model


def best_push(push, repeats: int) -> float:
    """Seconds of the fastest of `repeats` pushes (each a new version)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        push()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(model, client, url: str, wire: str, threads: int, repeats: int) -> list[tuple]:
    """Rows (push, wire, MB, seconds) for the before-style and the current pushes."""
    from rollout_bridge import export
    dtype, chunk = WIRE_DTYPES[wire], client.chunk_bytes
    version = [client.health(url)["version"]]

    def next_version():
        version[0] += 1
        return version[0]

    client.dtype, client.upload_threads = dtype, threads

    def before():
        client.transport = "http"
        client.push_chunks(url, lambda: export.iter_chunks(model, chunk, dtype=dtype),
                           next_version())

    def now(transport):
        client.transport = transport
        return lambda: client.push_weights(model, next_version(), [url])
    mb = sum(len(b) for b in export.iter_chunks(model, chunk, dtype=dtype)) / 1e6
    start = time.perf_counter()
    for _ in export.iter_weight_chunks(model, chunk, dtype=dtype):
        pass
    export_s = time.perf_counter() - start
    print(f"{wire}: {mb:.0f} MB on the wire; the new export alone takes {export_s:.2f} s",
          flush=True)
    rows = [("before: safetensors bytes, sequential", wire, mb, best_push(before, repeats)),
            (f"HTTP: views, {threads} parallel chunks", wire, mb, best_push(now("http"), repeats))]
    shm_s = best_push(now("auto"), repeats)
    lent = (client.health(url)["shm"] or {}).get("slots", 0)
    name = f"shared memory: {threads} slots" if lent else "shared memory unavailable: HTTP"
    return rows + [(name, wire, mb, shm_s)]


def table(rows: list[tuple]) -> str:
    lines = ["| push | wire | MB | trainer pause (s) | MB/s end to end | ratio to before |",
             "|---|---|---|---|---|---|"]
    before = {wire: s for name, wire, _, s in rows if name.startswith("before")}
    for name, wire, mb, s in rows:
        lines.append(f"| {name} | {wire} | {mb:.0f} | {s:.2f} | {mb / s:.0f} | "
                     f"{before[wire] / s:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    from rollout_bridge import export
    from rollout_bridge.client import RolloutClient
    from rollout_bridge.launch import running_server
    args = parse_args(argv)
    model = llm_of_size(args.size_mb)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export.export_dir(model, tmp, dtype=args.engine_dtype)
        server_args = ["--dtype", args.engine_dtype,
                       "--max-request-mb", str(max(1024, 4 * args.chunk_mb))]
        with running_server(tmp, "transformers", python=sys.executable, args=server_args,
                            log_dir=tmp, max_model_len=None) as server:
            client = RolloutClient([server.url], chunk_bytes=args.chunk_mb << 20)
            for wire in args.wire:
                rows += measure(model, client, server.url, wire, args.threads, args.repeats)
            client.close()
    print(f"\nweight push of a {args.size_mb:.0f} MB (f32) LLM to a loopback transformers server "
          f"({args.engine_dtype} weights), best of {args.repeats}:\n")
    print(table(rows))


if __name__ == "__main__":
    main()

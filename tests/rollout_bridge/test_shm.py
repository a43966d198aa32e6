"""Weight chunks through the shared-memory slots a same-host rollout server lends.

A real server process (transformers engine) with its slots in a test directory: pushes
through slots serve the pushed weights, slots are reused within the byte budget, a chunk
over the budget or a client that cannot open the slots falls back to HTTP, a bad slot
request (or slot id) is a 4xx, and slot files go with the server (or with the next one,
after a kill). The pool alone: its byte budget, waiting for a release, and the slots of a
dropped push retired. (Slots the client must not write: test_shm_trust.py.)
"""

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
import time

import httpx2
import numpy as np
import pytest

from rollout_bridge import export, shm
from rollout_bridge.client import RolloutClient
from rollout_bridge.launch import running_server, start_server, stop_server
from tests.rollout_bridge.test_server import jax_greedy, server_greedy, video_and_text

CHUNK = 20_000  # bytes of tensor data per chunk: the tiny model in ~20 chunks


def serve(model_dir, slot_dir, tmp_path, shm_mb=8, **kwargs):
    return running_server(model_dir, "transformers", log_dir=str(tmp_path),
                          args=["--shm-dir", str(slot_dir), "--shm-mb", str(shm_mb)], **kwargs)


def slot_files(slot_dir):
    return sorted(p for p in os.listdir(slot_dir) if p.startswith(shm.PREFIX))


def push_and_check(client, model, tokenizer, seed=0):
    """Pushes `model` as the next version; the server's greedy answer must be the model's."""
    version = client.push_weights(model, client.health()["version"] + 1)
    video, before, after = video_and_text(tokenizer, seed)
    got_version, samples = server_greedy(client, tokenizer, video, before, after)
    expected = jax_greedy(model, tokenizer, video, before, after)
    assert got_version == version
    assert samples[0]["token_ids"] == expected[0][0]
    np.testing.assert_allclose(samples[0]["logprobs"], expected[0][1], atol=1e-3)


def test_pushes_through_slots_serve_the_weights_and_reuse_the_slots(
        model_dir, models, tokenizer, tmp_path):
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path) as server:
        # One chunk at a time: a slot of a chunk's size, one for the embedding table alone.
        # (Parallel pushes through slots: tests/rollout_bridge/test_server.py.)
        client = RolloutClient([server.url], chunk_bytes=CHUNK, upload_threads=1)
        push_and_check(client, models[1], tokenizer)
        first = slot_files(slot_dir)
        stats = client.health()["shm"]
        assert stats["slots"] == len(first) == 2
        assert stats["bytes"] <= stats["budget_bytes"] == 8 << 20
        push_and_check(client, models[2], tokenizer, seed=1)
        assert slot_files(slot_dir) == first  # the same slots, lent again
        client.close()


def test_a_chunk_over_the_budget_goes_over_http(model_dir, models, tokenizer, tmp_path):
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path, shm_mb=1) as server:  # < a chunk + its slack
        client = RolloutClient([server.url], chunk_bytes=CHUNK)
        push_and_check(client, models[1], tokenizer)
        assert client.health()["shm"]["slots"] == 0 and slot_files(slot_dir) == []
        client.close()


def test_a_client_that_cannot_open_the_slots_pushes_over_http(
        model_dir, models, tokenizer, tmp_path, caplog):
    """As a client on another host: the lent paths do not exist where it runs."""
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path) as server:
        here = RolloutClient([server.url], chunk_bytes=CHUNK)
        push_and_check(here, models[1], tokenizer)
        here.close()
        for name in slot_files(slot_dir):  # the server keeps its mappings; the paths go
            os.unlink(slot_dir / name)
        elsewhere = RolloutClient([server.url], chunk_bytes=CHUNK)
        with caplog.at_level(logging.INFO, logger="rollout_bridge.client"):
            push_and_check(elsewhere, models[2], tokenizer, seed=1)
        assert "this host cannot open" in caplog.text and "No such file" in caplog.text
        elsewhere.close()


def test_bad_slot_requests_get_a_4xx_and_leave_the_push_usable(model_dir, models, tmp_path):
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path) as server:
        http = httpx2.Client(base_url=server.url)
        push_id = http.post("/weights").json()["push_id"]
        for body in ({"bytes": 0}, {"bytes": "1"}, {"bytes": True}, {}):
            answer = http.post(f"/weights/{push_id}/slots", json=body)
            assert answer.status_code == 400 and "bytes" in answer.json()["error"]
        answer = http.post(f"/weights/{push_id}/slots", json={"bytes": 9 << 20})
        assert answer.status_code == 413 and answer.json()["code"] == "too_large"
        lent = http.post(f"/weights/{push_id}/slots", json={"bytes": 1 << 20}).json()
        slot, lend = lent["slot"], lent["lend"]
        for slot_id, body in ((slot, {"bytes": (1 << 20) + 1, "lend": lend}),
                              (slot, {"bytes": 8}), (slot, {"bytes": 8, "lend": lend + 1}),
                              ("7", {"bytes": 8, "lend": lend}), ("x", {"bytes": 8, "lend": lend})):
            answer = http.post(f"/weights/{push_id}/slots/{slot_id}", json=body)
            assert answer.status_code in (400, 404), answer.text
        answer = http.post("/weights/nope/slots", json={"bytes": 8})
        assert answer.status_code == 404 and answer.json()["code"] == "unknown_push"
        other = http.post("/weights", json={"replace": True}).json()["push_id"]
        answer = http.post(f"/weights/{push_id}/slots/{slot}", json={"bytes": 8, "lend": lend})
        assert answer.status_code == 404
        assert not os.path.exists(lent["path"])  # still lent to the replaced push: retired
        bodies = list(export.iter_weight_chunks(models[1], CHUNK))
        again = http.post(f"/weights/{other}/slots", json={"bytes": 1 << 20}).json()
        assert again["path"] != lent["path"] and again["lend"] > lend
        with open(again["path"], "r+b") as f:  # a not-safetensors chunk drops the push
            f.write(b"\xff" * 64)
        answer = http.post(f"/weights/{other}/slots/{again['slot']}",
                           json={"bytes": 64, "lend": again["lend"]})
        assert answer.status_code == 400 and answer.json()["code"] == "bad_body"
        assert http.get("/health").json()["shm"]["slots"] == 0  # the dropped push's: retired
        client = RolloutClient([server.url], chunk_bytes=CHUNK)
        client.push_chunks(server.url, lambda: bodies, 5, threads=2)
        assert client.health()["version"] == 5
        client.close()
        http.close()


def test_slot_ids_that_are_no_slot_number_get_400_naming_them(model_dir, tmp_path):
    """'²' passed str.isdigit but not int(), 5000 digits pass neither int()'s limit: both
    were 500s."""
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path) as server:
        http = httpx2.Client(base_url=server.url)
        push_id = http.post("/weights").json()["push_id"]
        lend = http.post(f"/weights/{push_id}/slots", json={"bytes": 1 << 20}).json()["lend"]
        for slot_id in ("\u00b2", "9" * 5000, "\u0663", "-1", "1e3"):
            answer = http.post(f"/weights/{push_id}/slots/{slot_id}",
                               json={"bytes": 8, "lend": lend})
            assert answer.status_code == 400, answer.text
            assert f"slot id {slot_id[:24]!r}" in answer.json()["error"]
        http.close()


def test_a_slot_chunk_of_a_push_dropped_while_its_request_arrives_is_an_unknown_push(
        model_dir, tmp_path):
    """Parallel uploads: one chunk's request is being read when another chunk drops the
    push and frees its slots. The answer names the dropped push (which the client passes
    over for the bad chunk's own error), not a slot that looks never lent."""
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    with serve(model_dir, slot_dir, tmp_path) as server:
        http = httpx2.Client(base_url=server.url)
        push_id = http.post("/weights").json()["push_id"]
        lent = http.post(f"/weights/{push_id}/slots", json={"bytes": 1 << 20}).json()
        rest_of_body = threading.Event()

        def slowly_sent_body():
            yield b'{"bytes": 8, "lend": '
            rest_of_body.wait(30)
            yield b"%d}" % lent["lend"]

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx2.post, f"{server.url}/weights/{push_id}/slots/"
                                 f"{lent['slot']}", content=slowly_sent_body(), timeout=60)
            time.sleep(1.0)  # the server is reading that body
            bad = http.put(f"/weights/{push_id}", content=b"\xff" * 64)
            assert bad.status_code == 400 and bad.json()["code"] == "bad_body"
            rest_of_body.set()
            answer = answer.result()
        assert answer.status_code == 404 and answer.json()["code"] == "unknown_push", answer.text
        assert http.get("/health").json()["shm"]["lent"] == 0
        http.close()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_slot_files_go_with_the_server_or_with_the_next_one(model_dir, models, tmp_path, stop):
    slot_dir = tmp_path / "shm"
    slot_dir.mkdir()
    args = ["--shm-dir", str(slot_dir), "--shm-mb", "8"]
    server = start_server(model_dir, "transformers", log_dir=str(tmp_path), args=args)
    client = RolloutClient([server.url], chunk_bytes=CHUNK)
    client.push_weights(models[1], 1)
    client.close()
    assert slot_files(slot_dir)
    stop_server(server, signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
    if stop == "sigterm":
        assert slot_files(slot_dir) == []
        return
    assert slot_files(slot_dir)  # a killed server cannot clean up
    with running_server(model_dir, "transformers", log_dir=str(tmp_path), args=args):
        assert slot_files(slot_dir) == []  # the next server on the directory does


# ---- the pool itself (no server) ------------------------------------------------------------

def test_a_slot_still_lent_when_its_push_is_dropped_is_retired_not_lent_again(tmp_path):
    """A push dropped while its client may still write a lent slot: the next push gets
    another file, released slots are reused under a new lend number, and the late release
    of the old chunk changes nothing."""
    async def scenario():
        pool = shm.SlotPool(str(tmp_path), 4 << 20, "t")
        done = await pool.acquire(1 << 20, "old")
        pool.release(done, "old")  # a chunk read and staged: the slot is free
        slot = await pool.acquire(1 << 20, "old")
        assert slot is done
        writing = await pool.acquire(1 << 20, "old")
        pool.release(slot, "old")
        pool.retire_owner("old")  # the push was dropped while `writing` was lent
        assert not os.path.exists(writing.path) and slot_files(tmp_path) == [
            os.path.basename(slot.path)]
        again = await pool.acquire(1 << 20, "new")
        other = await pool.acquire(1 << 20, "new")
        assert again is slot and again.lend > writing.lend and other is not writing
        pool.release(writing, "old")  # the old chunk's handler finishing late
        assert pool.lent(again.index, "new", again.lend) is again
        assert pool.lent(again.index, "new", writing.lend) is None
        pool.close()
        assert slot_files(tmp_path) == []
    asyncio.run(scenario())


def test_the_pool_waits_for_a_release_within_its_budget_and_refuses_a_larger_chunk(tmp_path):
    async def scenario():
        pool = shm.SlotPool(str(tmp_path), 3 << 20, "t")
        held = [await pool.acquire(1 << 20, "p") for _ in range(3)]
        waiting = asyncio.ensure_future(pool.acquire(1 << 20, "p"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the budget is lent out
        pool.release(held[1], "p")
        assert await asyncio.wait_for(waiting, 5) is held[1]
        with pytest.raises(shm.SlotUnavailable, match="no slot came free"):
            await pool.acquire(1 << 20, "p", timeout_s=0.05)
        with pytest.raises(shm.SlotTooLarge, match="exceeds the shared-memory budget"):
            await pool.acquire(4 << 20, "p")
        for slot in held:
            pool.release(slot, "p")
        bigger = await pool.acquire(2 << 20, "p")  # free small slots give way to it
        assert bigger.capacity == 2 << 20 and pool.bytes <= 3 << 20
        pool.close()
    asyncio.run(scenario())

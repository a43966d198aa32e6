"""A weight version holds exactly the bytes of its own push.

One push at a time: a second client's begin gets 409 push_in_progress (the client waits
for the other push to end, up to its `wait_s`), `{"replace": true}` takes over (a
restarted trainer), and a push idle for --push-idle-s is taken over by the next begin.
A push dropped while its client still writes a lent slot can never have those bytes
committed under the next push's version: that slot is retired, not lent again.
"""

import logging
import mmap
import threading
import time

import httpx2
import pytest

from rollout_bridge import export, shm
from rollout_bridge.client import RetryPolicy, RolloutClient, RolloutError
from rollout_bridge.launch import running_server
from tests.rollout_bridge.test_server import jax_greedy, server_greedy, video_and_text

IDLE_S = 5


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    slot_dir = tmp_path_factory.mktemp("shm")
    args = ["--shm-dir", str(slot_dir), "--shm-mb", "8", "--push-idle-s", str(IDLE_S)]
    with running_server(model_dir, "transformers", args=args,
                        log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


def whole_model(model) -> bytes:
    """The tiny model's LLM as one safetensors chunk."""
    [body] = export.iter_weight_chunks(model, 4 << 20)
    return b"".join(bytes(b) for b in body)


def lend(http, push_id: str, nbytes: int) -> dict:
    answer = http.post(f"/weights/{push_id}/slots", json={"bytes": nbytes + shm.SLACK})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_dropped_pushs_late_write_into_its_slot_never_becomes_the_next_version(
        server, models, tokenizer):
    """The interleaving of the issue: push A is lent a slot and its client maps it; push B
    replaces A and is lent a slot; B's chunk is written, then A's client writes its chunk
    late; B names its slot and commits. B must serve B's weights."""
    http = httpx2.Client(base_url=server.url)
    chunk_a, chunk_b = whole_model(models[1]), whole_model(models[2])
    push_a = http.post("/weights").json()["push_id"]
    slot_a = lend(http, push_a, len(chunk_a))
    with open(slot_a["path"], "r+b") as f:
        late_writer = mmap.mmap(f.fileno(), slot_a["capacity"])  # A's client, mapped
    push_b = http.post("/weights", json={"replace": True}).json()["push_id"]
    slot_b = lend(http, push_b, len(chunk_b))
    with open(slot_b["path"], "r+b") as f:
        f.write(chunk_b)
    late_writer[:len(chunk_a)] = chunk_a  # the dropped push's client, still writing
    late_writer.close()
    answer = http.post(f"/weights/{push_a}/slots/{slot_a['slot']}",
                       json={"bytes": len(chunk_a), "lend": slot_a["lend"]})
    assert answer.status_code == 404 and answer.json()["code"] == "unknown_push"
    answer = http.post(f"/weights/{push_b}/slots/{slot_b['slot']}",
                       json={"bytes": len(chunk_b), "lend": slot_b["lend"]})
    if answer.status_code == 200:  # else B was refused: also never A's weights as B
        version = http.get("/health").json()["version"] + 1
        answer = http.post(f"/weights/{push_b}/commit", json={"version": version})
        assert answer.status_code == 200, answer.text
        client = RolloutClient([server.url])
        video, before, after = video_and_text(tokenizer, seed=7)
        got_version, samples = server_greedy(client, tokenizer, video, before, after)
        assert got_version == version
        assert samples[0]["token_ids"] == jax_greedy(models[2], tokenizer, video, before,
                                                     after)[0][0]
        client.close()
    http.close()


def test_a_second_begin_gets_409_naming_the_push_in_progress_and_replace_takes_over(server):
    http = httpx2.Client(base_url=server.url)
    first = http.post("/weights").json()["push_id"]
    answer = http.post("/weights")
    assert answer.status_code == 409 and answer.json()["code"] == "push_in_progress"
    assert "another weight push" in answer.json()["error"]
    assert '{"replace": true}' in answer.json()["error"]
    for body in ({"replace": "yes"}, {"force": True}):
        answer = http.post("/weights", json=body)
        assert answer.status_code == 400 and "replace" in answer.json()["error"], answer.text
    second = http.post("/weights", json={"replace": True})
    assert second.status_code == 200
    answer = http.put(f"/weights/{first}", content=b"\0" * 16)
    assert answer.status_code == 404 and answer.json()["code"] == "unknown_push"
    http.post("/weights", json={"replace": True})  # leaves no push that looks active
    http.close()


def test_a_push_idle_for_push_idle_s_is_taken_over_by_the_next_begin(server):
    http = httpx2.Client(base_url=server.url)
    abandoned = http.post("/weights", json={"replace": True}).json()["push_id"]
    assert http.post("/weights").status_code == 409
    time.sleep(IDLE_S + 0.5)
    assert http.post("/weights").status_code == 200
    answer = http.post(f"/weights/{abandoned}/commit", json={})
    assert answer.status_code == 404 and answer.json()["code"] == "unknown_push"
    http.close()


def test_a_client_waits_for_another_clients_push_or_is_told_it_is_in_progress(
        server, models, caplog):
    """Two trainers on one server: the second one's push waits for the first to commit;
    with too short a wait it fails naming the push in progress (not unknown_push)."""
    http = httpx2.Client(base_url=server.url)
    impatient = RolloutClient([server.url], retry=RetryPolicy(backoff_s=0.2, wait_s=1))
    http.post("/weights", json={"replace": True})
    with pytest.raises(RolloutError, match="another weight push .* is in progress") as info:
        impatient.push_weights(models[1], 1000)
    assert info.value.status == 409 and info.value.code == "push_in_progress"
    other = http.post("/weights", json={"replace": True}).json()["push_id"]
    for chunk in export.iter_weight_chunks(models[2], 4 << 20):
        http.put(f"/weights/{other}", content=b"".join(bytes(b) for b in chunk))
    version = http.get("/health").json()["version"] + 1
    committer = threading.Timer(2.0, lambda: http.post(f"/weights/{other}/commit",
                                                       json={"version": version}))
    committer.start()
    patient = RolloutClient([server.url], retry=RetryPolicy(backoff_s=0.2, wait_s=30))
    with caplog.at_level(logging.WARNING, logger="rollout_bridge.client"):
        patient.push_weights(models[1], version + 1)
    committer.join()
    assert "in progress" in caplog.text  # it waited, and said why
    assert patient.health()["version"] == version + 1
    for client in (impatient, patient, http):
        client.close()

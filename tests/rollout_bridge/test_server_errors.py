"""The rollout server's limits and failures: oversized bodies get 413, prompts longer than
the model's positions get 400 stating both numbers, and an unexpected exception comes back
as a JSON 500 with the weight version header, never as aiohttp's plain text."""

import httpx2
import pytest

from rollout_bridge import export
from rollout_bridge.engines import TransformersEngine
from rollout_bridge.server import RolloutServer
from tests.rollout_bridge.servers import serving_in_thread, tiny_model
from rollout_bridge.launch import running_server, start_server

MODEL_POSITIONS = 8192  # max_position_embeddings of the tiny preset


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return export.export_dir(tiny_model(tokenizer), str(tmp_path_factory.mktemp("llm")), tokenizer)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Transformers engine, a 1 MB request limit, no --max-model-len (the model's own)."""
    with running_server(model_dir, "transformers", args=["--max-request-mb", "1"],
                        max_model_len=None, log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


def test_generate_body_over_the_request_limit_gets_413_not_bad_json(server):
    body = {"prompts": [{"before": [1] * 700_000}]}  # about 2 MB of JSON
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 413, reply.text
    assert reply.json()["code"] == "too_large" and "--max-request-mb" in reply.json()["error"]
    assert "X-Weight-Version" in reply.headers


def test_without_max_model_len_the_limit_is_the_models_positions(server, tokenizer):
    assert httpx2.get(f"{server.url}/health").json()["max_model_len"] == MODEL_POSITIONS
    word = tokenizer.encode("a")[0]
    body = {"prompts": [{"before": [word] * 9000}], "max_tokens": 64}
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 400 and reply.json()["code"] == "too_long", reply.text
    assert "9000 prompt tokens + max_tokens 64 = 9064" in reply.json()["error"]
    assert f"limit of {MODEL_POSITIONS}" in reply.json()["error"]


def test_max_model_len_above_the_models_positions_stops_the_server_at_start(model_dir, tmp_path):
    with pytest.raises(RuntimeError, match=f"--max-model-len 9000 exceeds the model's "
                                           f"max_position_embeddings {MODEL_POSITIONS}"):
        start_server(model_dir, "transformers", max_model_len=9000, log_dir=str(tmp_path))


async def fail_unexpectedly(request):
    raise RuntimeError("disk on fire")


def test_unexpected_exceptions_come_back_as_json_500_with_the_version_header(model_dir):
    rollout = RolloutServer(TransformersEngine(model_dir))
    app = rollout.app(1 << 20)
    app.router.add_get("/fail", fail_unexpectedly)  # a route that raises what no check expects
    with serving_in_thread(app) as url:
        reply = httpx2.get(f"{url}/fail")
    assert reply.status_code == 500
    assert reply.headers["X-Weight-Version"] == "0"
    assert reply.json()["code"] == "internal_error"
    assert "GET /fail: RuntimeError: disk on fire" in reply.json()["error"]

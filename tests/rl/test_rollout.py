"""The rollout's parts: one reward weighting, the prompts the passes see, the training batch."""

import jax
import ml_collections
import numpy as np
import pytest

from lvr_jax.model.sampler import Generation
from lvr_jax.rl import engines, rewards, rollout

RIGHT, WRONG, JUNK = "<think>x</think><answer>B</answer>", "<think>x</think><answer>C</answer>", "B"


def test_batch_scores_weigh_accuracy_and_format_exactly_as_one_response_is_scored():
    texts = [RIGHT, WRONG, JUNK, "nothing"]
    parts = rewards.score_responses(texts, ["B"] * 4, [10] * 4, format_weight=0.3)
    np.testing.assert_allclose(parts["score"], [rewards.score(t, "B", 0.3) for t in texts])
    np.testing.assert_array_equal(parts["accuracy"], [1, 0, 1, 0])
    np.testing.assert_array_equal(parts["format"], [1, 1, 0, 0])


def test_overlong_responses_lose_dapos_soft_penalty():
    parts = rewards.score_responses([RIGHT] * 3, ["B"] * 3, [8, 12, 16], max_length=16,
                                    overlong_buffer=8)
    np.testing.assert_allclose(parts["score"], [1.0, 0.5, 0.0])


def rl_config(**kw):
    return ml_collections.ConfigDict(dict(format_weight=0.1, max_new_tokens=16, overlong_buffer=0,
                                          scale_by_std=True, **kw))


def test_advantages_are_taken_per_group_of_g():
    texts = [RIGHT, WRONG, RIGHT, RIGHT]  # group 0 mixed, group 1 all right
    parts = rollout.score(texts, [8] * 4, ["B"] * 4, 2, rl_config())
    assert parts["advantages"][0] > 0 > parts["advantages"][1]
    np.testing.assert_allclose(parts["advantages"][2:], 0.0)


def test_without_dynamic_sampling_every_prompt_trains():
    order, keep = rollout.select_prompts(np.array([1, 1, 0, 1, 0, 0]), 2, 2, False)
    np.testing.assert_array_equal(order, [0, 1, 2])
    assert keep.all()


@pytest.mark.parametrize("scores, chunk, order, keep", [
    # groups of 2: prompt 1 and 3 mixed -> one chunk of 2
    ([1, 1, 0, 1, 0, 0, 1, 0], 2, [1, 3], [True, True]),
    # three mixed in chunks of 2: a uniform prompt pads the second chunk, masked
    ([0, 1, 1, 0, 1, 1, 0, 1], 2, [0, 1, 3, 2], [True, True, True, False]),
    # none mixed: still one (masked) chunk, so the step keeps its shapes
    ([1, 1, 0, 0, 1, 1], 2, [0, 1], [False, False]),
    # fewer prompts than a chunk: all of them
    ([0, 1, 1, 1], 4, [0, 1], [True, False]),
])
def test_dynamic_sampling_leaves_uniform_groups_out_in_whole_chunks(scores, chunk, order, keep):
    got_order, got_keep = rollout.select_prompts(np.array(scores, float), 2, chunk, True)
    np.testing.assert_array_equal(got_order, order)
    np.testing.assert_array_equal(got_keep, keep)


def test_the_training_batch_holds_the_chosen_prompts_groups_with_kept_ones_in_the_loss():
    g, m = 2, 5
    tokens = np.arange(8 * m).reshape(8, m)
    lengths = np.array([5, 4, 3, 2, 5, 5, 1, 1])
    gen = Generation(tokens, -np.ones((8, m), np.float32), lengths)
    embeds, valid = np.arange(4)[:, None, None] * np.ones((4, 3, 2)), np.ones((4, 3), bool)
    parts = {"advantages": np.arange(8, dtype=np.float32)}
    batch = rollout.training_batch(embeds, valid, gen, parts, np.array([2, 0]),
                                   np.array([True, False]), g)
    np.testing.assert_array_equal(batch["tokens"], tokens[[4, 5, 0, 1]])
    np.testing.assert_array_equal(batch["advantages"], [4, 5, 0, 1])
    np.testing.assert_array_equal(batch["prompt_embeds"][:, 0, 0], [2, 0])
    np.testing.assert_array_equal(batch["prompt_index"], [0, 0, 1, 1])
    np.testing.assert_array_equal(batch["response_mask"].sum(1), [5, 5, 5, 4])
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [5, 5, 0, 0])


def test_both_engines_follow_the_protocol(tokenizer):
    from rollout_bridge.client import RolloutClient
    for engine in (engines.JaxEngine(tokenizer.pad_id),
                   engines.ServerEngine(RolloutClient(["http://127.0.0.1:9"]))):
        assert callable(engine.sync_weights) and callable(engine.generate)
    with pytest.raises(ValueError, match="config.rl.rollout.backend must be 'jax' or 'server'"):
        engines.make_engine(ml_collections.ConfigDict(dict(rl=dict(rollout=dict(backend="torch")))), 0)


def test_the_embedded_engine_samples_the_model_it_is_handed(tokenizer):
    from flax import nnx
    from lvr_jax.model import PRESETS, LongVILA
    from lvr_jax.model.sampler import SamplingParams
    model = LongVILA(PRESETS["tiny"](vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    embeds = jax.random.normal(jax.random.key(0), (2, 6, model.config.llm.hidden_size))
    params = SamplingParams(max_new_tokens=4, temperature=0.0, num_samples=3)
    engine = engines.JaxEngine(tokenizer.pad_id)
    engine.sync_weights(model, 0)
    gen = engine.generate(model, embeds, np.ones((2, 6), bool), params, jax.random.key(1))
    assert gen.tokens.shape == (6, 4)
    np.testing.assert_array_equal(gen.tokens[0], gen.tokens[2])  # greedy: a group agrees

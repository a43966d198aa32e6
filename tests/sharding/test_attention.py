"""Sequence-parallel attention: every strategy equals the unsharded model, forward and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lvr_jax.kernels import dot_product_attention
from lvr_jax.model.qwen2 import positions_from_valid
from lvr_jax.sharding import attention, mesh as mesh_lib
from lvr_jax.sharding.frames import encode_video_sharded
from lvr_jax.sharding.param_placement import shard_model
from lvr_jax.sharding.sequence import from_zigzag, sp_hidden_states, to_zigzag
from tests.kernels.helpers import attention_loss, random_qkv
from tests.sharding.helpers import frames, make_model, mesh_of, rel_err, shard_map_specs

VIDEO_ID = 151650  # the config's placeholder id


@pytest.mark.parametrize("strategy", mesh_lib.STRATEGIES)
@pytest.mark.parametrize("shape", [dict(sp=8), dict(fsdp=2, sp=2, tp=2)])
def test_strategy_matches_dense_attention_with_grads(strategy, shape):
    q, k, v, pos, kv_pos, valid = random_qkv()
    dense = jax.value_and_grad(attention_loss, argnums=(1, 2, 3))
    want = dense(dot_product_attention, q, k, v, pos, kv_pos, valid)
    fn = attention.make_attention_fn(mesh_of(**shape), strategy, block_size=4)
    got = jax.jit(jax.value_and_grad(lambda *a: attention_loss(fn, *a), argnums=(0, 1, 2)))(
        q, k, v, pos, kv_pos, valid)
    assert rel_err(got[0], want[0]) < 1e-5
    for g, w in zip(got[1], want[1]):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("shape, q_spec", [
    (dict(sp=8), P(None, "sp", None, None)),
    (dict(fsdp=2, sp=2, tp=2), P("fsdp", "sp", "tp", None)),
    (dict(data=2, fsdp=2, sp=2), P(("data", "fsdp"), "sp", None, None))])
def test_default_rules_put_batch_on_data_fsdp_sequence_on_sp_heads_on_tp(shape, q_spec):
    layout = attention.attention_layout(mesh_of(**shape))
    assert layout.q == layout.kv == q_spec and layout.pos == P(*q_spec[:2])
    assert (layout.axis, layout.size) == ("sp", shape["sp"])


# A recipe's rules (prepended to the defaults), its mesh, and the query spec they give.
OVERRIDES = {
    "heads replicated, batch on data only": (
        (("activation_batch", "data"), ("activation_heads", None), ("activation_kv_heads", None)),
        dict(fsdp=2, sp=2, tp=2), P(None, "sp", None, None)),
    "sequence on fsdp": ((("activation_batch", "data"), ("activation_length", "fsdp")),
                         dict(fsdp=4, sp=2), P(None, "fsdp", None, None)),
}


@pytest.mark.parametrize("strategy", mesh_lib.STRATEGIES)
@pytest.mark.parametrize("override", OVERRIDES)
def test_a_rules_override_moves_the_shard_map_and_keeps_the_numbers(override, strategy):
    """The shard_map's specs, and the axis its collectives use, follow the recipe's rules."""
    prepend, shape, want_q_spec = OVERRIDES[override]
    mesh = mesh_of(**shape)
    q, k, v, pos, kv_pos, valid = random_qkv()
    fn = attention.make_attention_fn(mesh, strategy, block_size=4,
                                     rules=prepend + mesh_lib.DEFAULT_RULES)
    [got_specs] = shard_map_specs(fn, q, k, v, pos, kv_pos)
    assert got_specs[:3] == (want_q_spec,) * 3 and got_specs[3] == P(*want_q_spec[:2])
    assert attention.attention_layout(mesh).q != want_q_spec  # the defaults differ
    dense = jax.value_and_grad(attention_loss, argnums=(1, 2, 3))
    want = dense(dot_product_attention, q, k, v, pos, kv_pos, valid)
    got = jax.jit(jax.value_and_grad(lambda *a: attention_loss(fn, *a), argnums=(0, 1, 2)))(
        q, k, v, pos, kv_pos, valid)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("prepend, rule", [
    ((("activation_length", ("sp", "tp")),), "activation_length"),
    ((("activation_heads", None),), "activation_kv_heads")])
def test_rules_the_attention_cannot_follow_are_refused_naming_the_rule(prepend, rule):
    with pytest.raises(ValueError, match=rule):
        attention.make_attention_fn(mesh_of(sp=2, tp=4), "ring",
                                    rules=prepend + mesh_lib.DEFAULT_RULES)


def test_cudnn_kernel_refuses_strategies_that_split_queries_from_keys():
    with pytest.raises(ValueError, match="ulysses"):
        attention.make_attention_fn(mesh_of(sp=8), "ring", kernel="cudnn")


def test_zigzag_reshapes_match_the_documented_order_and_invert():
    x = jnp.arange(48)[None]
    np.testing.assert_array_equal(to_zigzag(x, 4)[0], attention.zigzag_order(48, 4))
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)


def test_indivisible_sequence_names_the_fix():
    q, k, v, pos, kv_pos, _ = random_qkv(t=36)
    fn = attention.make_attention_fn(mesh_of(sp=8), "ring")
    with pytest.raises(ValueError, match="pad_sequence"):
        fn(q, k, v, pos, kv_pos)


def prompt_ids():
    """Two prompts of 10 tokens, placeholders at different places, row 1 left-padded."""
    ids = np.array([[5, 6, 7, VIDEO_ID, 8, 9, 10, 11, 12, 19],
                    [0, 0, 13, 14, VIDEO_ID, 15, 16, 17, 18, 19]], np.int32)
    valid = np.ones(ids.shape, bool)
    valid[1, :2] = False
    return jnp.asarray(ids), jnp.asarray(valid)


def token_logprob_loss(logits_btv, positions_bt, valid_bt):
    """Mean log-prob of a label fixed by each token's position, over valid tokens."""
    labels = (positions_bt * 7 + 3) % logits_btv.shape[-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_btv), labels[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid_bt, logp, 0.0)) / jnp.sum(valid_bt)


def unsharded_reference(video_frames):
    """(logits at valid tokens, loss, LLM grads) of the plain single-device model."""
    model = make_model()
    ids, valid = prompt_ids()
    embeds, merged_valid = model.embed_inputs(ids, model.encode_video(video_frames), valid)
    positions = positions_from_valid(merged_valid)

    def loss_fn(llm):
        logits = llm(inputs_embeds=embeds, valid=merged_valid, positions=positions)
        return token_logprob_loss(logits, positions, merged_valid), logits

    (loss, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model.llm)
    return np.asarray(logits)[np.asarray(merged_valid)], loss, nnx.state(grads, nnx.Param)


@pytest.fixture(scope="module")
def reference():
    video = frames(5)  # 5 frames over sp=8: padded and masked
    return video, unsharded_reference(video)


@pytest.mark.parametrize("strategy, chunk_tokens", [(s, 8192) for s in mesh_lib.STRATEGIES]
                         + [("ring", 2)])
def test_sharded_model_equals_unsharded_logits_and_grads(strategy, chunk_tokens, reference):
    video, (want_logits, want_loss, want_grads) = reference
    mesh = mesh_of(sp=8)
    model = shard_model(make_model(), mesh)
    ids, valid = prompt_ids()
    video_embeds, video_valid = encode_video_sharded(model, video, mesh)
    embeds, merged_valid = model.embed_inputs(ids, video_embeds, valid, video_valid)
    positions = positions_from_valid(merged_valid)
    t = embeds.shape[1]
    assert t % 8, "the test wants a sequence that does not divide by sp"

    @nnx.jit
    def loss_and_grads(llm, embeds, merged_valid, positions):
        def loss_fn(llm):
            hidden = sp_hidden_states(llm, embeds, merged_valid, positions, mesh, strategy,
                                      block_size=8, chunk_tokens=chunk_tokens)[:, :t]
            logits = llm.logits(hidden)
            return token_logprob_loss(logits, positions, merged_valid), logits
        return nnx.value_and_grad(loss_fn, has_aux=True)(llm)

    (loss, logits), grads = loss_and_grads(model.llm, embeds, merged_valid, positions)
    assert rel_err(np.asarray(logits)[np.asarray(merged_valid)], want_logits) < 1e-5
    assert rel_err(loss, want_loss) < 1e-5
    got_leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    for g, w in zip(got_leaves, jax.tree.leaves(want_grads), strict=True):
        assert rel_err(g, w) < 1e-5

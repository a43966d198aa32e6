"""Sequence-parallel frame encoding equals the single-device encoder."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvr_jax.model import LongVILA
from lvr_jax.model.video_encoders import VideoEncoderConfig
from lvr_jax.sharding.mesh import DEFAULT_RULES
from lvr_jax.sharding.frames import encode_video_sharded, padded_frames
from lvr_jax.sharding.param_placement import shard_model
from tests.sharding.helpers import frames, make_model, mesh_of, rel_err, sp_config


def test_indivisible_frame_count_is_padded_and_masked_not_truncated():
    mesh = mesh_of(sp=8)
    model = make_model()
    video = frames(5)
    embeds, valid = encode_video_sharded(model, video, mesh)
    tokens = model.config.tokens_per_frame
    assert padded_frames(5, mesh) == 8 and embeds.shape[0] == 8 * tokens
    assert embeds.sharding.is_equivalent_to(NamedSharding(mesh, P("sp", None)), 2)
    np.testing.assert_array_equal(valid, jnp.arange(8 * tokens) < 5 * tokens)
    assert rel_err(embeds[:5 * tokens], model.encode_video(video)) < 1e-5


def test_several_videos_split_over_data_and_sp_with_sharded_weights():
    mesh = mesh_of(data=2, sp=2, tp=2)
    model = shard_model(make_model(), mesh)
    videos = jnp.stack([frames(3, seed=1), frames(3, seed=2)])
    embeds, valid = encode_video_sharded(model, videos, mesh)
    assert embeds.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "sp", None)), 3)
    tokens = model.config.tokens_per_frame
    for i in range(2):
        assert rel_err(embeds[i, :3 * tokens], model.encode_video(videos[i])) < 1e-5
    assert int(valid.sum()) == 3 * tokens


def test_tsp_pooling_across_devices_equals_the_single_device_encoder():
    mesh = mesh_of(data=2, sp=4)
    config = sp_config().replace(video_encoder=VideoEncoderConfig("tsp", ((2, 1, 1), (1, 2, 2))))
    model = LongVILA(config, rngs=nnx.Rngs(0))
    videos = jnp.stack([frames(6, seed=3), frames(6, seed=4)])  # 6 frames on 4 devices: padded
    embeds, valid = encode_video_sharded(model, videos, mesh)
    n = model.config.num_video_tokens(6)
    assert n == 3 * 5 + 6 * 2 and embeds.shape[1] == 28 and int(valid.sum()) == n
    assert embeds.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "sp", None)), 3)
    for i in range(2):
        assert rel_err(embeds[i, :n], model.encode_video(videos[i])) < 1e-5


def test_frames_split_where_a_rules_override_puts_them():
    """A recipe that spreads one video's frames over data and sp: 3 frames pad to 8, not 4."""
    mesh = mesh_of(data=2, sp=4)
    rules = (("activation_batch", None), ("activation_frames", ("data", "sp"))) + DEFAULT_RULES
    model = make_model()
    video = frames(3)
    embeds, valid = encode_video_sharded(model, video, mesh, rules)
    tokens = model.config.tokens_per_frame
    assert padded_frames(3, mesh) == 4 and padded_frames(3, mesh, rules) == 8
    assert embeds.shape[0] == 8 * tokens and int(valid.sum()) == 3 * tokens
    assert embeds.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "sp"), None)), 2)
    assert rel_err(embeds[:3 * tokens], model.encode_video(video)) < 1e-5

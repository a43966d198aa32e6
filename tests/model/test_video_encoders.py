"""VILA's video encoders: TSP pooling against a numpy reference, token counts, config values."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lvr_jax.sharding import forwards
from lvr_jax.model import PRESETS, LongVILA, load_pretrained, save_pretrained
from lvr_jax.model.video_encoders import (VideoEncoderConfig, VideoEncoderError, arrange_video,
                                          num_video_tokens, parse_video_encoder, pool_tokens,
                                          to_vila)
from lvr_jax.sft.learner import sft_loss

TSP = "llava.model.encoders.TSPVideoEncoder"


def reference_pool(tokens, t, h, w):
    """Output cell (g, r, c) = mean of frames g*t.., rows r*h.., cols c*w.. (row-major cells)."""
    f, n, d = tokens.shape
    side = int(np.sqrt(n))
    grid = tokens.reshape(f, side, side, d)
    out = np.zeros((f // t, side // h, side // w, d))
    for g in range(f // t):
        for r in range(side // h):
            for c in range(side // w):
                cells = [grid[g * t + i, r * h + j, c * w + k]
                         for i in range(t) for j in range(h) for k in range(w)]
                out[g, r, c] = np.mean(cells, axis=0)
    return out.reshape(f // t, -1, d)


def reference_arrange(tokens, pools, start, end, sep):
    """VILA's order: per pool size, each pooled frame as start + cells + end, then sep."""
    rows = []
    for t, h, w in pools:
        for frame in reference_pool(tokens, t, h, w):
            rows += [*start, *frame, *end]
        rows += [*sep]
    return np.stack(rows)


@pytest.mark.parametrize("pool", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (4, 2, 1), (2, 4, 4)])
def test_pool_tokens_is_a_block_mean_over_frames_and_grid_cells(pool):
    tokens = np.random.default_rng(0).normal(size=(8, 16, 5)).astype(np.float32)
    ours = pool_tokens(jnp.asarray(tokens), pool)
    np.testing.assert_allclose(ours, reference_pool(tokens, *pool), rtol=1e-5, atol=1e-6)


def test_several_pool_sizes_concatenate_with_start_end_and_separator_tokens():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(4, 16, 3)).astype(np.float32)
    start, end, sep = (rng.normal(size=(n, 3)).astype(np.float32) for n in (2, 1, 1))
    pools = ((4, 1, 1), (1, 2, 2), (2, 4, 2))
    ours = arrange_video(jnp.asarray(tokens), pools, *map(jnp.asarray, (start, end, sep)))
    np.testing.assert_allclose(ours, reference_arrange(tokens, pools, start, end, sep),
                               rtol=1e-5, atol=1e-6)
    config = VideoEncoderConfig("tsp", pools, start_tokens="<s>", start_ids=(5, 6),
                                sep_tokens="|", sep_ids=(7,))
    # per pool: pooled frames x (cells + 2 start + 1 end) + 1 separator
    assert num_video_tokens(config, 4, 4) == ours.shape[0] == 20 + 29 + 11


def test_basic_encoder_is_each_frame_then_the_newline():
    tokens = np.random.default_rng(2).normal(size=(3, 4, 2)).astype(np.float32)
    newline = np.ones((1, 2), np.float32)
    ours = arrange_video(jnp.asarray(tokens), VideoEncoderConfig().pools, None,
                         jnp.asarray(newline))
    expected = np.concatenate([tokens, np.ones((3, 1, 2))], axis=1).reshape(-1, 2)
    np.testing.assert_array_equal(ours, expected)
    assert num_video_tokens(VideoEncoderConfig(), 3, 2) == 15


def test_frame_count_or_grid_that_a_pool_size_does_not_divide_is_refused():
    with pytest.raises(VideoEncoderError, match=r"pool size \[8, 1, 1\] needs a multiple of 8 "
                                                r"frames; the video has 12"):
        num_video_tokens(VideoEncoderConfig("tsp", ((8, 1, 1),)), 12, 16)
    with pytest.raises(VideoEncoderError, match=r"\[1, 3, 3\] does not divide the 2x2 grid"):
        PRESETS["tiny"](video_encoder=VideoEncoderConfig("tsp", ((1, 3, 3),)))


# ---- VILA config values ---------------------------------------------------------------------

def test_vila_value_as_json_string_or_object_or_absent():
    value = {"_target_": TSP, "pool_sizes": [[8, 1, 1]]}
    expected = VideoEncoderConfig(kind="tsp", pool_sizes=((8, 1, 1),))
    assert parse_video_encoder(json.dumps(value)) == parse_video_encoder(value) == expected
    assert parse_video_encoder(None) == VideoEncoderConfig()
    basic = '{"_target_": "llava.model.encoders.BasicVideoEncoder"}'
    assert parse_video_encoder(basic) == VideoEncoderConfig()
    assert parse_video_encoder(basic, tokenize=lambda text: [7]).cache_tag() == ""
    assert parse_video_encoder(to_vila(expected)) == expected
    assert json.loads(to_vila(expected)) == value


def test_token_strings_are_resolved_by_the_tokenizer(tokenizer):
    value = {"_target_": TSP, "pool_sizes": [[2, 1, 1]], "sep_tokens": "Question",
             "start_tokens": None}
    config = parse_video_encoder(value, tokenize=tokenizer.encode)
    assert config.end_ids is None  # "\n" is always the model's newline_token_id
    start, end, sep = config.token_ids(newline_token_id=tokenizer.newline_id)
    assert start == () and end == (tokenizer.newline_id,)
    assert sep == tuple(tokenizer.encode("Question")) and sep
    assert parse_video_encoder(to_vila(config), tokenize=tokenizer.encode) == config
    with pytest.raises(VideoEncoderError, match="'sep_tokens' is 'Question'; a tokenizer must"):
        parse_video_encoder(value)


@pytest.mark.parametrize("value,message", [
    ({"_target_": "llava.model.encoders.PoolVideoEncoder"},
     "field '_target_' of video_encoder is 'llava.model.encoders.PoolVideoEncoder'"),
    ({"pool_sizes": [[8, 1, 1]]}, "field '_target_' of video_encoder is None"),
    ({"_target_": TSP, "pool_sizes": [[8, 1, 1]], "stride": 2},
     "field 'stride' of video_encoder is 2"),
    ({"_target_": "llava.model.encoders.BasicVideoEncoder", "pool_sizes": [[2, 1, 1]]},
     "field 'pool_sizes' of video_encoder is"),
    ({"_target_": TSP}, "field 'pool_sizes' is \\(\\); the tsp encoder needs"),
    ({"_target_": TSP, "pool_sizes": [[8, 1]]}, "field 'pool_sizes' is \\[\\[8, 1\\]\\]"),
    ({"_target_": TSP, "pool_sizes": [[0, 1, 1]]}, "\\[0, 1, 1\\] is not a \\[t, h, w\\]"),
    ({"_target_": TSP, "pool_sizes": [[2, 1, 1]], "end_tokens": 3}, "field 'end_tokens' is 3"),
    ('{"_target_": ', "video_encoder is '{\"_target_\": ', which is not JSON"),
    ([[8, 1, 1]], "expected an object with '_target_'"),
])
def test_values_that_cannot_be_honoured_are_refused_naming_field_and_value(value, message):
    with pytest.raises(VideoEncoderError, match=message):
        parse_video_encoder(value)


# ---- the model ------------------------------------------------------------------------------

def tsp_model(tokenizer, pools):
    config = PRESETS["tiny"](vocab_size=tokenizer.vocab_size, video_token_id=tokenizer.video_id,
                             newline_token_id=tokenizer.newline_id,
                             video_encoder=VideoEncoderConfig("tsp", pools))
    return LongVILA(config, rngs=nnx.Rngs(0))


def test_tiny_tsp_model_encodes_pooled_frames_then_newlines_and_trains(tokenizer):
    model = tsp_model(tokenizer, ((2, 1, 1), (4, 2, 2)))
    frames = jax.random.uniform(jax.random.key(0), (2, 4, 56, 56, 3), minval=-1, maxval=1)
    video = model.encode_video(frames[0])
    # 4 frames, 2x2 grid: 2 frames of 4 cells + "\n", then 1 frame of 1 cell + "\n"
    assert video.shape[0] == model.config.num_video_tokens(4) == 2 * 5 + 1 * 2
    tokens = np.asarray(model.mm_projector(model.vision_tower(frames[0])))
    newline = np.asarray(model.embed_tokens(jnp.asarray([tokenizer.newline_id])))
    expected = reference_arrange(tokens, model.config.video_encoder.pools, [], newline, [])
    np.testing.assert_allclose(video, expected, rtol=1e-5, atol=1e-6)

    v = tokenizer.video_id
    ids = jnp.asarray([[1, 2, v, 40, 41, 42], [1, v, 40, 41, 42, 0]])
    batch = {"input_ids": ids, "token_mask": ids != 0, "frames": frames,
             "loss_mask": jnp.asarray([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])}
    assert model(ids, video).shape == (2, 6 - 1 + 12, tokenizer.vocab_size)
    loss, aux = sft_loss(model, batch, forwards.hidden_fn())
    assert np.isfinite(float(loss)) and int(aux["target_tokens"]) == 6
    # SFT's cached path (frozen tower features, projector + pooling in the step) agrees
    features = {**batch, "video_features": jax.vmap(model.vision_tower)(batch.pop("frames"))}
    np.testing.assert_allclose(sft_loss(model, features, forwards.hidden_fn())[0], loss, rtol=1e-6)
    with pytest.raises(ValueError, match="tokens_per_frame is not defined for the 'tsp'"):
        model.config.tokens_per_frame


def test_save_pretrained_writes_the_video_encoder_as_vila_does(tmp_path, tokenizer):
    model = tsp_model(tokenizer, ((8, 1, 1), (1, 2, 2)))
    save_pretrained(model, str(tmp_path), tokenizer=tokenizer)
    with open(tmp_path / "config.json") as f:
        value = json.load(f)["video_encoder"]
    assert isinstance(value, str)  # VILA's config holds the JSON string
    assert parse_video_encoder(value, tokenize=tokenizer.encode) == VideoEncoderConfig(
        "tsp", ((8, 1, 1), (1, 2, 2)))
    loaded = load_pretrained(str(tmp_path), video_encoder=parse_video_encoder(value))
    assert loaded.config.num_video_tokens(8) == 1 * 5 + 8 * 2

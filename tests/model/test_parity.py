"""Numerical parity of every model part with transformers (torch, f32) on tiny configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lvr_jax.model import load_pretrained
from tests.hf_reference import rel_err

TOL = 1e-5


def random_frames(n, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 2, False), (6, 2, True), (4, 1, False),
                                                 (4, 4, True)])
def test_qwen2_logits_match_transformers(make_vila_dir, heads, kv_heads, tied):
    path, hf_llm, _, _ = make_vila_dir(heads=heads, kv_heads=kv_heads, tied=tied, hidden=48)
    model = load_pretrained(path)
    ids = np.random.default_rng(0).integers(0, 500, (2, 23))
    with torch.no_grad():
        expected = hf_llm(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.llm(jnp.asarray(ids)), expected) < TOL


def test_rope_theta_is_read_from_the_checkpoint(make_vila_dir):
    path, _, _, _ = make_vila_dir(theta=1e6)
    assert load_pretrained(path).config.llm.rope_theta == 1e6


def test_siglip_features_are_second_to_last_hidden_state(make_vila_dir):
    path, _, hf_vision, _ = make_vila_dir()
    model = load_pretrained(path)
    frames = random_frames(3, 70)
    with torch.no_grad():
        out = hf_vision(torch.from_numpy(frames).permute(0, 3, 1, 2), output_hidden_states=True)
    assert rel_err(model.vision_tower(jnp.asarray(frames)), out.hidden_states[-2].numpy()) < TOL


@pytest.mark.parametrize("projector_type", ["mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix"])
@pytest.mark.parametrize("image_size", [70, 56])  # 5x5 (odd, padded) and 4x4 patch grids
def test_projector_matches_formula(make_vila_dir, projector_type, image_size):
    path, _, hf_vision, projector = make_vila_dir(projector_type, image_size)
    model = load_pretrained(path)
    patches = (image_size // 14) ** 2
    features = np.random.default_rng(1).normal(size=(3, patches, 64)).astype(np.float32)
    with torch.no_grad():
        expected = projector(torch.from_numpy(features)).numpy()
    ours = model.mm_projector(jnp.asarray(features))
    side = -(-(image_size // 14) // model.mm_projector.k)
    assert ours.shape == (3, side * side, model.config.llm.hidden_size)
    assert rel_err(ours, expected) < TOL


def reference_video_logits(hf_llm, hf_vision, projector, frames, ids, video_id, newline_id):
    """Logits of the whole VLM computed by the torch modules, spliced by hand."""
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2)
        features = hf_vision(pixels, output_hidden_states=True).hidden_states[-2]
        tokens = projector(features)
        embed = hf_llm.get_input_embeddings()
        newline = embed(torch.full((tokens.shape[0], 1), newline_id))
        video = torch.cat([tokens, newline], dim=1).reshape(-1, tokens.shape[-1])
        rows = []
        for row in ids:
            p = int(np.nonzero(row == video_id)[0][0])
            text = embed(torch.from_numpy(np.where(row == video_id, 0, row)))
            rows.append(torch.cat([text[:p], video, text[p + 1:]]))
        return video.numpy(), hf_llm(inputs_embeds=torch.stack(rows)).logits.numpy()


def test_video_is_spliced_in_place_of_the_placeholder(make_vila_dir, tokenizer):
    path, hf_llm, hf_vision, projector = make_vila_dir()
    model = load_pretrained(path)
    frames = random_frames(4, 70, seed=3)
    v = tokenizer.video_id
    ids = np.array([[1, 40, v, 41, 42, 43], [1, v, 40, 41, 42, 43]])  # placeholder moves
    video, expected = reference_video_logits(hf_llm, hf_vision, projector, frames, ids, v,
                                             tokenizer.newline_id)
    embeds = model.encode_video(jnp.asarray(frames))
    assert embeds.shape == (4 * model.config.tokens_per_frame, model.config.llm.hidden_size)
    assert model.config.tokens_per_frame == 9 + 1  # 5x5 grid -> 3x3 tokens, plus "\n"
    assert rel_err(embeds, video) < TOL
    assert rel_err(model(jnp.asarray(ids), embeds), expected) < TOL


def test_left_padding_does_not_change_logits(make_vila_dir):
    path, _, _, _ = make_vila_dir()
    llm = load_pretrained(path).llm
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 500, (1, 9)))
    padded = jnp.concatenate([jnp.zeros((1, 4), ids.dtype), ids], axis=1)
    valid = jnp.arange(13)[None] >= 4
    np.testing.assert_allclose(llm(padded, valid=valid)[:, 4:], llm(ids), rtol=1e-5, atol=1e-5)


def test_bf16_compute_stays_close(make_vila_dir):
    path, hf_llm, _, _ = make_vila_dir()
    model = load_pretrained(path, dtype="bfloat16")
    assert jax.tree.leaves(model)[0].dtype == jnp.float32  # parameters stay f32
    ids = np.random.default_rng(0).integers(0, 500, (1, 16))
    with torch.no_grad():
        expected = hf_llm(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(model.llm(jnp.asarray(ids)), expected) < 0.05

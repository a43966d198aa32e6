"""The one video path: cache, frame-parallel encoding on a miss, the prompt embeddings."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lvr_jax.model.siglip import normalize_frames
from lvr_jax.sharding.embedding_cache import EmbeddingCache
from lvr_jax.sharding.video_embeddings import VideoEmbedder
from tests.sharding.helpers import make_model, mesh_of, rel_err


def uint8_videos(count, num_frames, size=56, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, num_frames, size, size, 3), dtype=np.uint8)


def batch_of(videos):
    return {"frames": videos, "video_key": [f"v{i}" for i in range(len(videos))],
            "frame_indices": np.tile(np.arange(videos.shape[1]), (len(videos), 1))}


def test_a_miss_on_a_mesh_encodes_the_frames_split_over_sp_and_equals_one_device():
    model, mesh = make_model(), mesh_of(sp=8)
    batch = batch_of(uint8_videos(2, 8))
    sharded = VideoEmbedder(model, EmbeddingCache(), mesh)
    got = sharded.videos(batch)
    want = VideoEmbedder(model).videos(batch)
    assert rel_err(got, want) < 1e-5
    entry = next(iter(sharded.cache.entries.values()))  # one video's embeddings, as cached
    assert entry.sharding.is_equivalent_to(NamedSharding(mesh, P("sp", None)), 2)
    np.testing.assert_allclose(want[0], model.encode_video(normalize_frames(batch["frames"][0])),
                               rtol=1e-5, atol=1e-5)


def test_a_frame_count_the_mesh_does_not_divide_gives_exactly_the_videos_tokens():
    model, mesh = make_model(), mesh_of(sp=4, data=2)
    batch = batch_of(uint8_videos(1, 6, seed=1))
    got = VideoEmbedder(model, mesh=mesh).videos(batch)
    assert got.shape[1] == model.config.num_video_tokens(6)
    assert rel_err(got, VideoEmbedder(model).videos(batch)) < 1e-5


def test_sft_features_are_the_towers_split_over_sp():
    model, mesh = make_model(), mesh_of(sp=8)
    batch = batch_of(uint8_videos(1, 8, seed=2))
    videos = VideoEmbedder(model, mesh=mesh, output="features")
    entry = videos.videos(batch)[0]
    want = model.vision_tower(normalize_frames(batch["frames"][0]))
    assert entry.shape == want.shape and rel_err(entry, want) < 1e-5
    cached = next(iter(videos.cache.entries.values()))
    assert cached.sharding.is_equivalent_to(NamedSharding(mesh, P("sp", None, None)), 3)


def test_prompts_splice_the_cached_video_into_the_prompt():
    model = make_model()
    batch = batch_of(uint8_videos(2, 2, seed=3))
    ids = np.full((2, 5), 7, np.int32)
    ids[:, 2] = model.config.video_token_id
    batch.update(prompt_ids=ids, prompt_mask=np.ones((2, 5), bool))
    videos = VideoEmbedder(model)
    embeds, valid = videos.prompts(model, batch)
    want, want_valid = model.embed_inputs(ids, videos.videos(batch), batch["prompt_mask"])
    np.testing.assert_allclose(embeds, want, rtol=1e-6)
    np.testing.assert_array_equal(valid, want_valid)
    assert videos.cache.stats.misses == 2 and videos.cache.stats.hits == 2


def test_runs_with_other_vision_or_projector_weights_never_share_disk_entries(tmp_path):
    batch = batch_of(uint8_videos(1, 2, seed=4))
    disk = str(tmp_path / "cache")

    def run(model, output="embeddings"):
        videos = VideoEmbedder(model, EmbeddingCache(disk_dir=disk), output=output)
        out = videos.videos(batch)
        return out, videos.cache.stats

    base = make_model(seed=0)
    first, stats = run(base)
    assert stats.misses == 1
    again, stats = run(make_model(seed=0))  # same weights: read from disk, not encoded
    assert stats.disk_hits == 1 and stats.misses == 0
    np.testing.assert_array_equal(again, first)
    for part in ("vision_tower", "mm_projector"):
        other = make_model(seed=0)
        params = nnx.state(getattr(other, part), nnx.Param)
        nnx.update(getattr(other, part), jax.tree.map(lambda x: x * 1.01, params))
        out, stats = run(other)
        assert stats.misses == 1 and stats.disk_hits == 0, part
        assert not np.allclose(out, first), part
    # SFT caches the tower's features: the projector is not part of their key
    run(base, "features")
    projector_moved = make_model(seed=0)
    params = nnx.state(projector_moved.mm_projector, nnx.Param)
    nnx.update(projector_moved.mm_projector, jax.tree.map(lambda x: x * 1.01, params))
    _, stats = run(projector_moved, "features")
    assert stats.disk_hits == 1 and stats.misses == 0

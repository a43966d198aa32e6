"""The MR-SP stage-1 cache: one encode per video, LRU by bytes, disk store, valid keys."""

import jax.numpy as jnp
import numpy as np

from lvr_jax.model.video_encoders import VideoEncoderConfig
from lvr_jax.sharding.embedding_cache import (CachedVideoEncoder, EmbeddingCache, entry_key,
                                              weights_fingerprint)


class CountingEncoder:
    """A real (if trivial) encoder that records how often it runs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, frames):
        self.calls += 1
        return jnp.mean(frames, axis=(1, 2))  # [F, 3]


def frames(seed, n=4):
    return np.random.default_rng(seed).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)


def test_each_video_is_encoded_once_across_calls():
    encode = CountingEncoder()
    encoder = CachedVideoEncoder(encode, {"w": jnp.ones(3)}, EmbeddingCache())
    batch = np.stack([frames(0), frames(1), frames(0)])
    keys, idx = ["a", "b", "a"], np.tile(np.arange(4), (3, 1))
    first = encoder(batch, keys, idx)
    second = encoder(batch, keys, idx)
    assert encode.calls == 2
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], first[2])
    assert encoder.cache.stats.hit_rate == 4 / 6


def test_keys_change_with_frames_indices_and_weights():
    base = entry_key("video", [0, 5, 9], "w1")
    assert base != entry_key("video", [0, 5, 8], "w1")
    assert base != entry_key("video", [0, 5, 9], "w2")
    assert base != entry_key("other", [0, 5, 9], "w1")
    assert weights_fingerprint({"w": jnp.ones(3)}) != weights_fingerprint({"w": jnp.zeros(3)})


def test_lru_evicts_oldest_beyond_the_byte_budget():
    cache = EmbeddingCache(budget_bytes=2 * 64)  # two entries of 16 f32
    for key in "abc":
        cache.get(key, lambda: jnp.zeros(16))
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 128
    cache.get("b", lambda: jnp.zeros(16))  # refresh b, then d evicts c
    cache.get("d", lambda: jnp.zeros(16))
    assert list(cache.entries) == ["b", "d"]


def test_disk_store_serves_a_new_process_without_encoding(tmp_path):
    encode = CountingEncoder()
    first = CachedVideoEncoder(encode, {}, EmbeddingCache(disk_dir=str(tmp_path)))
    out = first(frames(3)[None], ["v"], np.arange(4)[None])
    again = CountingEncoder()
    second = CachedVideoEncoder(again, {}, EmbeddingCache(disk_dir=str(tmp_path)))
    np.testing.assert_array_equal(second(frames(3)[None], ["v"], np.arange(4)[None]), out)
    assert again.calls == 0 and second.cache.stats.disk_hits == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_video_encoder_pooling_is_part_of_the_key_and_the_basic_encoder_keeps_old_keys():
    weights = {"w": jnp.ones(3)}
    basic = CachedVideoEncoder(lambda x: x, weights, EmbeddingCache(), tag="")
    assert basic.fingerprint == weights_fingerprint(weights)
    tsp = VideoEncoderConfig("tsp", ((8, 1, 1),))
    pooled = CachedVideoEncoder(lambda x: x, weights, EmbeddingCache(), tag=tsp.cache_tag())
    assert VideoEncoderConfig().cache_tag() == "" and pooled.fingerprint != basic.fingerprint
    assert entry_key("v", [0, 1], pooled.fingerprint) != entry_key("v", [0, 1], basic.fingerprint)


def test_entries_kept_on_the_host_serve_hits_like_device_entries():
    """`on_host` (the 7B recipes): entries sit in host memory, not on an accelerator, and a
    hit gives the same embeddings as the device cache."""
    import jax

    out = {}
    for on_host in (False, True):
        encode = CountingEncoder()
        encoder = CachedVideoEncoder(encode, {}, EmbeddingCache(on_host=on_host))
        batch, keys, idx = np.stack([frames(0), frames(1)]), ["a", "b"], np.tile(np.arange(4), (2, 1))
        encoder(batch, keys, idx)
        out[on_host] = encoder(batch, keys, idx)  # hits
        assert encode.calls == 2
        kinds = {type(v) for v in encoder.cache.entries.values()}
        assert kinds == ({np.ndarray} if on_host else {type(jnp.zeros(1))}), kinds
        assert isinstance(out[on_host], jax.Array)
    np.testing.assert_array_equal(out[True], out[False])

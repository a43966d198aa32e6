"""Decoding real files: sampled indices, shapes, decord == PyAV, bad files named, the frame cache."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from lvr_jax.data.frame_cache import FrameCache
from lvr_jax.data.video import (BadVideoError, read_decord, read_frames, read_pyav,
                                resize_frames, sample_indices)
from lvr_jax.model.siglip import normalize_frames
from tests.data.conftest import BAD_VIDEOS, SIZE, write_faststart_mp4, ramp_frames


def _levels(frames: np.ndarray) -> np.ndarray:
    """Grey level of each frame, read away from its bright corner."""
    return frames[:, -8:, -8:].astype(np.float32).mean(axis=(1, 2, 3))


def test_sample_indices_is_linspace_rounded_down():
    np.testing.assert_array_equal(sample_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_indices(64, 64), np.arange(64))
    np.testing.assert_array_equal(sample_indices(100, 3), [0, 49, 99])
    assert sample_indices(7, 7).dtype == np.int32


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_reads_the_uniformly_sampled_frames_of_a_real_mp4(video_dir, backend):
    video = read_frames(os.path.join(video_dir, "good.mp4"), 8, SIZE, backend)
    assert video.frames.shape == (8, SIZE, SIZE, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 40
    np.testing.assert_array_equal(video.indices, np.floor(np.linspace(0, 39, 8)).astype(int))
    np.testing.assert_allclose(_levels(video.frames), 4.0 * video.indices, atol=3)


@pytest.mark.parametrize("name", ["good.mp4", "good.webm", "faststart.mp4"])
def test_decord_and_pyav_give_the_same_frames(video_dir, name):
    path = os.path.join(video_dir, name)
    by_decord, by_pyav = read_decord(path, 16, SIZE), read_pyav(path, 16, SIZE)
    np.testing.assert_array_equal(by_decord.indices, by_pyav.indices)
    assert by_decord.total_frames == by_pyav.total_frames == 40
    assert np.abs(by_decord.frames.astype(int) - by_pyav.frames).max() <= 1
    assert by_decord.fingerprint == by_pyav.fingerprint or name == "good.webm"


def test_frames_are_resized_to_the_tower_resolution(video_dir):
    video = read_frames(os.path.join(video_dir, "good.mp4"), 4, 32)
    assert video.frames.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(_levels(video.frames[:, :, :, :]), 4.0 * video.indices, atol=3)


def test_resize_keeps_uint8_and_flat_colours():
    frames = np.full((2, 50, 70, 3), 200, np.uint8)
    out = resize_frames(frames, 24)
    assert out.shape == (2, 24, 24, 3) and out.dtype == np.uint8 and (out == 200).all()


def test_normalize_maps_uint8_to_minus_one_one():
    out = normalize_frames(np.array([0, 127, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 127 / 127.5 - 1, 1.0])


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_bad_videos_raise_an_error_naming_the_file(video_dir, name, backend):
    path = os.path.join(video_dir, name)
    with pytest.raises(BadVideoError) as error:
        read_frames(path, 16, SIZE, backend)
    assert repr(path) in str(error.value)
    assert BAD_VIDEOS[name].split(" (")[0] in str(error.value)


def test_auto_falls_back_to_pyav_when_decord_is_missing(video_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    with pytest.raises(ImportError):
        read_decord(os.path.join(video_dir, "good.mp4"), 4, SIZE)
    video = read_frames(os.path.join(video_dir, "good.mp4"), 4, SIZE, "auto")
    assert video.backend == "pyav" and video.frames.shape == (4, SIZE, SIZE, 3)


def test_auto_reports_both_decoders_when_both_fail(video_dir):
    with pytest.raises(BadVideoError, match="decord.*; PyAV"):
        read_frames(os.path.join(video_dir, "not_a_video.mp4"), 4, SIZE, "auto")


def test_frame_cache_serves_the_second_read(video_dir, tmp_path):
    cache = FrameCache(str(tmp_path / "cache"))
    path = os.path.join(video_dir, "good.mp4")
    first = read_frames(path, 8, SIZE, cache=cache)
    second = read_frames(path, 8, SIZE, cache=cache)
    assert (first.backend, second.backend) == ("decord", "cache") and len(cache) == 1
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.indices, second.indices)
    assert first.fingerprint == second.fingerprint
    assert read_frames(path, 4, SIZE, cache=cache).backend == "decord"  # other sampling: a miss


def test_frame_cache_misses_when_the_file_changes(tmp_path):
    path, cache = str(tmp_path / "v.mp4"), FrameCache(str(tmp_path / "cache"))
    write_faststart_mp4(path, ramp_frames(20))
    old = read_frames(path, 4, SIZE, cache=cache)
    write_faststart_mp4(path, ramp_frames(20)[::-1].copy())
    os.utime(path, ns=(1, 10**9))  # a different mtime, as any rewrite gives
    new = read_frames(path, 4, SIZE, cache=cache)
    assert new.backend != "cache" and not np.array_equal(old.frames, new.frames)


def test_unreadable_cache_entry_decodes_again(video_dir, tmp_path):
    cache = FrameCache(str(tmp_path / "cache"))
    path = os.path.join(video_dir, "good.mp4")
    read_frames(path, 4, SIZE, cache=cache)
    with open(cache.path_of(cache.key(path, 4, SIZE)), "wb") as f:
        f.write(b"garbage")
    assert read_frames(path, 4, SIZE, cache=cache).backend == "decord"


def test_bad_video_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(BadVideoError("x.mp4", "is empty (0 bytes)", "line 3 of a")))
    assert str(error) == "video 'x.mp4' is empty (0 bytes) (line 3 of a)"

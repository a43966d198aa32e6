"""Clip windows, frame sampling inside them, and decoding real generated videos."""

import os

import numpy as np
import pytest

from lvr_jax.data.video import BadVideoError
from lvr_jax.datagen.clips import VideoInfo, clip_windows, iter_clips, probe, window_indices
from tests.datagen.helpers import FPS, SECONDS


def test_windows_cover_the_video_in_order():
    assert clip_windows(24.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 24.0)]
    assert clip_windows(30.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    assert clip_windows(4.0, 10.0) == [(0.0, 4.0)]


def test_short_tail_joins_the_clip_before_it():
    assert clip_windows(21.0, 10.0, min_clip_seconds=2.0) == [(0.0, 10.0), (10.0, 21.0)]
    assert clip_windows(1.0, 10.0, min_clip_seconds=2.0) == [(0.0, 1.0)]


def test_window_needs_a_positive_length():
    with pytest.raises(ValueError, match="clip_seconds"):
        clip_windows(10.0, 0.0)


def test_frames_sit_at_the_centres_of_equal_parts_of_the_window():
    # 10 s at 4 fps, 4 frames: centres 1.25, 3.75, 6.25, 8.75 s -> frames 5, 15, 25, 35
    assert window_indices(0.0, 10.0, 4.0, 96, 4).tolist() == [5, 15, 25, 35]
    assert window_indices(20.0, 24.0, 4.0, 96, 2).tolist() == [84, 92]
    assert window_indices(0.0, 10.0, 4.0, 30, 4).max() == 29  # clipped to the last frame


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_clips_of_a_generated_video(generated_videos, backend):
    path = os.path.join(generated_videos, sorted(os.listdir(generated_videos))[0])
    info = probe(path)
    assert info.total_frames == SECONDS * FPS and info.fps == pytest.approx(FPS)
    info = VideoInfo(info.total_frames, info.fps, backend)
    clips = list(iter_clips(path, info, 10.0, frames_per_clip=3, size=32))
    assert [(c.index, c.start, c.end) for c in clips] == [(0, 0.0, 10.0), (1, 10.0, 20.0),
                                                         (2, 20.0, 24.0)]
    assert all(c.frames.shape == (3, 32, 32, 3) and c.frames.dtype == np.uint8 for c in clips)


def test_decord_and_pyav_sample_the_same_frames(generated_videos):
    path = os.path.join(generated_videos, sorted(os.listdir(generated_videos))[1])
    info = probe(path)
    frames = {b: np.stack([c.frames for c in iter_clips(
        path, VideoInfo(info.total_frames, info.fps, b), 10.0, 2, 32)]) for b in ("decord", "pyav")}
    assert np.abs(frames["decord"].astype(int) - frames["pyav"].astype(int)).mean() < 2.0


def test_missing_and_broken_files_are_bad_videos(tmp_path):
    with pytest.raises(BadVideoError, match="does not exist"):
        probe(str(tmp_path / "nope.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(BadVideoError, match="broken.mp4"):
        probe(str(broken))

"""The page's video pieces: nearest-neighbour upscale, chunk grouping into >= 1 s segments, H.264 .ts segments."""

from __future__ import annotations

import numpy as np
import pytest
from _serve_helpers import decode_video

from serve.segments import Segmenter, upscale, write_ts
from serve.validation import display_scale_for


def test_upscale_is_nearest_neighbour_blocks():
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    big = upscale(frames, 4)
    assert big.shape == (3, 16, 20, 3)
    for y, x in ((0, 0), (3, 4), (2, 1)):  # every 4 x 4 block is one source pixel
        assert (big[:, 4 * y:4 * y + 4, 4 * x:4 * x + 4] == frames[:, y:y + 1, x:x + 1]).all()
    assert upscale(frames, 1) is frames
    with pytest.raises(ValueError, match="scale must be an integer >= 1"):
        upscale(frames, 0)


def test_display_scale_brings_small_clips_to_256():
    assert display_scale_for(16, 16) == 16 and display_scale_for(32, 48) == 8 and display_scale_for(100, 120) == 3
    assert display_scale_for(128, 128) == 1 and display_scale_for(480, 832) == 1
    assert display_scale_for(16, 16, 2) == 2
    with pytest.raises(ValueError, match="display_scale must be an integer in"):
        display_scale_for(16, 16, 0)


def test_segments_group_whole_chunks_of_at_least_a_second():
    seg = Segmenter(fps=8, min_seconds=1.0)  # 8 frames
    chunk = np.zeros((3, 2, 2, 3), np.uint8)
    out = [len(s) for i in range(7) for s in seg.add(chunk + i)]
    assert out == [9, 9]  # chunks of 3 frames: 3 chunks (9 frames) per segment
    assert len(seg.flush()) == 3 and seg.flush() is None  # the last chunk, shorter, at the end
    assert [len(s) for s in Segmenter(fps=8).add(np.zeros((10, 2, 2, 3), np.uint8))] == [10]  # long chunk: alone


def test_ts_segment_is_h264_with_the_frames(tmp_path):
    frames = np.zeros((8, 64, 64, 3), np.uint8)
    frames[:, 16:48, 16:48] = (220, 30, 30)  # a red square
    path = write_ts(tmp_path / "seg.ts", frames, fps=8)
    video = decode_video(path)
    assert video.shape == frames.shape
    assert np.abs(video[:, 32, 32].astype(int) - (220, 30, 30)).max() <= 8
    assert video[:, 2, 2].max() <= 8
    with pytest.raises(ValueError, match="even frame size"):
        write_ts(tmp_path / "odd.ts", frames[:, :63], fps=8)

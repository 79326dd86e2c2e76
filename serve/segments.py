"""Video pieces for the page: nearest-neighbour upscaling of small clips, and H.264 MPEG-TS segments for streaming.

    big = upscale(frames, 16)                       # (T, 16, 16, 3) -> (T, 256, 256, 3), every pixel a 16 x 16 block
    seg = Segmenter(fps=8, min_seconds=1.0)
    for frames in chunks:                           # a causal model's chunks, as they are made
        for piece in seg.add(frames):               # groups of whole chunks lasting >= 1 s
            write_ts(path, piece, fps=8)
    last = seg.flush()                              # what is left when the stream ends (may be shorter)

Gradio's streaming video output plays `.ts` segments back to back (HLS); segments shorter than about a second
stall the player, so short chunks are grouped. Segments are written directly as H.264 in MPEG-TS with PyAV (no
re-encode by Gradio).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, H * scale, W * scale, 3), nearest neighbour (each pixel a scale x scale block)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if scale == 1:
        return frames
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def write_ts(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """uint8 (T, H, W, 3) -> an H.264 MPEG-TS segment (yuv420p; H and W must be even)."""
    import av

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 (T >= 1, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 4:2:0 needs an even frame size, got {frames.shape[1]} x {frames.shape[2]}")
    path = Path(path)
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


class Segmenter:
    """Groups chunks of frames into segments of at least `min_seconds` (whole chunks, in order)."""

    def __init__(self, fps: int, min_seconds: float = 1.0):
        if fps < 1 or min_seconds < 0:
            raise ValueError(f"fps must be >= 1 and min_seconds >= 0, got {fps}, {min_seconds}")
        self.min_frames = max(1, round(fps * min_seconds))
        self._pending: list[np.ndarray] = []

    @property
    def pending_frames(self) -> int:
        return sum(len(f) for f in self._pending)

    def add(self, frames: np.ndarray) -> list[np.ndarray]:
        """Add one chunk; returns the segments now complete (zero or one)."""
        self._pending.append(frames)
        if self.pending_frames < self.min_frames:
            return []
        return [self.flush()]

    def flush(self) -> np.ndarray | None:
        """The frames not yet in a segment (None if there are none)."""
        if not self._pending:
            return None
        out, self._pending = np.concatenate(self._pending), []
        return out

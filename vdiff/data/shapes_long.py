"""Long ShapesWorld clips: the object wraps around the frame (`boundary="wrap"`), so "moving right" stays true
for any number of frames, and it may change direction at segment boundaries (one caption per segment).

The rules are the short clips' (vdiff.data.shapes) with two changes:
- Motion is a fixed number of pixels per frame, `speed * extent / (REFERENCE_FRAMES - 1)` along the motion axis
  (the speed of a default 16-frame clip), whatever the length.
- Along the motion axis the position is taken modulo the frame: an object leaving one edge re-enters at the opposite
  one, drawn on both edges while it crosses. Across the motion axis it stays fully inside, as in short clips.
At a turn, `turn="carry"` (the default) places a segment's first frame by the previous segment's motion (the move
into it is still the old direction), `turn="crisp"` by its own (every move into a segment's frames is its direction,
so a chunk captioned "moving up" only ever moves up). Clips that do not turn are the same either way.
Deterministic by seed: the same arguments give the same bytes.

    frames = render_long_clip("red", "circle", ["right"] * 4 + ["up"] * 4, segment_frames=2, seed=0)  # [16, H, W, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vdiff.data.shapes import (
    COLOURS,
    DIRECTION_VECTORS,
    MIN_SIDE_PX,
    TURNS,
    _check_combination,
    _check_int,
    caption,
    checked_geometry,
    shape_coverage,
)

REFERENCE_FRAMES = 16  # a wrap clip moves as fast per frame as a default 16-frame clip


def render_long_clip(colour: str, shape: str, directions: Sequence[str], *, segment_frames: int, height: int = 16,
                     width: int = 16, seed: int = 0, size: float | None = None, speed: float | None = None,
                     position_jitter: float | None = None, motion_jitter: float | None = None,
                     turn: str = "carry") -> np.ndarray:
    """A wrap-around clip of len(directions) segments of `segment_frames` frames each, segment k moving
    directions[k] -> np.uint8 [len(directions) * segment_frames, H, W, 3].

    position_jitter: how far from the centre the start is drawn, as a fraction of the room on each axis (default 1);
    motion_jitter (default: position_jitter) replaces it along the first segment's motion axis, which wraps: 1 spreads
    starts over the whole axis (clips cross the edge) while the other axis stays near the centre. turn: "carry" or
    "crisp" (see the module docstring)."""
    if turn not in TURNS:
        raise ValueError(f"turn must be one of {list(TURNS)}, got {turn!r}")
    if not directions:
        raise ValueError("directions must name at least one segment's direction")
    for d in directions:
        _check_combination(colour, shape, d)
    _check_int("segment_frames", segment_frames, 1, 4096)
    size, speed, jitter = checked_geometry(height, width, seed, size, speed, position_jitter)
    side = size * min(height, width)
    if side < MIN_SIDE_PX:
        raise ValueError(f"size={size} gives a {side:.1f}-pixel object in a {height}x{width} frame; shapes need at "
                         f"least {MIN_SIDE_PX} pixels")
    if motion_jitter is not None and not 0.0 <= motion_jitter <= 1.0:
        raise ValueError(f"motion_jitter must be in [0, 1], got {motion_jitter}")
    rng = np.random.default_rng([seed, 0x10C6])
    half = side / 2
    # Start anywhere along the motion axes (they wrap), inside across them; jitter narrows around the centre.
    horizontal = DIRECTION_VECTORS[directions[0]][0] != 0
    jx, jy = (jitter, jitter) if motion_jitter is None else \
        ((motion_jitter, jitter) if horizontal else (jitter, motion_jitter))
    cx = width / 2 + (rng.uniform(-1, 1) * jx) * (width / 2 - half)
    cy = height / 2 + (rng.uniform(-1, 1) * jy) * (height / 2 - half)
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)
    frames = np.empty((len(directions) * segment_frames, height, width, 3), dtype=np.uint8)
    t = 0
    for direction in directions:
        dx, dy = DIRECTION_VECTORS[direction]
        step = speed * (width if dx else height) / (REFERENCE_FRAMES - 1)
        for _ in range(segment_frames):
            if turn == "crisp" and t > 0:  # the move into this frame is this segment's
                cx, cy = cx + dx * step, cy + dy * step
            cov = np.zeros((height, width), dtype=np.float32)
            for ox in (-width, 0, width):  # copies across a wrapped edge (after a turn too)
                for oy in (-height, 0, height):
                    cov = np.maximum(cov, shape_coverage(shape, cx % width + ox, cy % height + oy, side, height,
                                                         width))
            frames[t] = np.clip(np.rint(rgb * cov[..., None]), 0, 255).astype(np.uint8)
            if turn == "carry":  # the move out of this frame is this segment's
                cx, cy = cx + dx * step, cy + dy * step
            t += 1
    return frames


def segment_captions(colour: str, shape: str, directions: Sequence[str]) -> list[str]:
    """One caption per segment: "a {colour} {shape} moving {direction}"."""
    return [caption(colour, shape, d) for d in directions]

"""Data: ShapesWorld, the synthetic captioned-video world with known answers (`vdiff.data.shapes`)."""

from vdiff.data.shapes import (
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    ShapesWorld,
    all_combinations,
    caption,
    clip_to_video,
    parse_caption,
    render_clip,
    train_combinations,
    video_to_clip,
)

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "HELD_OUT",
    "SHAPES",
    "ShapesWorld",
    "all_combinations",
    "caption",
    "clip_to_video",
    "parse_caption",
    "render_clip",
    "train_combinations",
    "video_to_clip",
]

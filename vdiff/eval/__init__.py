"""Evaluation: reading ShapesWorld attributes back out of generated clips (`vdiff.eval.shapes_eval`)."""

from vdiff.eval.shapes_eval import ClipReading, ClipScore, evaluate_clip, evaluate_clips, read_clip

__all__ = ["ClipReading", "ClipScore", "evaluate_clip", "evaluate_clips", "read_clip"]

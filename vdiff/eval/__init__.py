"""Evaluation: reading ShapesWorld attributes back out of generated clips (`vdiff.eval.shapes_eval`), the eval job
that generates and scores clips over the grammar (`vdiff.eval.run`) and its command line (`python -m vdiff.eval`,
`vdiff.eval.cli`)."""

from vdiff.eval.shapes_eval import ClipReading, ClipScore, evaluate_clip, evaluate_clips, read_clip

__all__ = ["ClipReading", "ClipScore", "evaluate_clip", "evaluate_clips", "read_clip"]

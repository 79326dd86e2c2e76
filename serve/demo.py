"""The demo checkpoint used when the bundled model (checkpoints/shapes-tiny) is not in the checkout."""

from __future__ import annotations

from pathlib import Path


def make_random_pipeline(path: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny-preset VideoPipeline with RANDOM (untrained) weights to `path`: it runs the whole app end to end,
    but its videos are noise. Same seed, same weights."""
    from vdiff import VideoPipeline
    from vdiff.config import model_preset

    pipe = VideoPipeline.from_model_config(model_preset("tiny", num_layers=num_layers), seed=seed)
    return pipe.save_pretrained(path)

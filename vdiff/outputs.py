"""What a pipeline call returns: the videos and what it cost (`VideoOutput`, `PipelineStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vdiff.attention import AttentionStats
from vdiff.pipeline_io import write_video


@dataclass
class PipelineStats:
    total_s: float = 0.0
    text_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    attention: AttentionStats = field(default_factory=AttentionStats)
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # per cache: hits / misses (step: computed/skipped)
    tokens: int = 0  # transformer tokens per video
    grid: tuple[int, int, int] = (0, 0, 0)
    parallel: dict[str, Any] = field(default_factory=dict)  # several processes: degrees, this rank, notes

    @property
    def step_mean_s(self) -> float:
        return sum(self.step_s) / len(self.step_s) if self.step_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s, "text_s": self.text_s, "denoise_s": self.denoise_s, "decode_s": self.decode_s,
            "step_mean_s": self.step_mean_s, "steps": len(self.step_s), "tokens": self.tokens, "grid": list(self.grid),
            "attention_density": self.attention.density, "attention_calls": self.attention.calls,
            "attention_backends": dict(self.attention.by_backend),
            "attention_impls": dict(self.attention.by_impl), "cache": self.cache,
            **({"parallel": self.parallel} if self.parallel else {}),
        }


@dataclass
class VideoOutput:
    videos: np.ndarray  # (B, T, H, W, 3) uint8
    prompts: list[str]
    seed: int
    fps: int
    stats: PipelineStats

    @property
    def frames(self) -> np.ndarray:
        """The first (or only) video: uint8 (T, H, W, 3)."""
        return self.videos[0]

    def save(self, path: str | Path, index: int = 0, fps: int | None = None) -> Path:
        """Write video `index` to `path` (.mp4, .gif or .webm, by extension)."""
        return write_video(path, self.videos[index], fps or self.fps)

"""Latent spaces. `PixelPatchVAE`: pixels <-> non-overlapping space-time patches stacked on channels (no weights),
the latent space of the tiny models. (Wan's AutoencoderKLWan is wrapped beside it for real checkpoints.)

Video tensors are (B, 3, F, H, W) in [-1, 1]; latents are (B, C, F', H', W').
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn


class PixelPatchVAE(nn.Module):
    """Space-to-depth: a (st, sh, sw) patch of RGB pixels becomes 3*st*sh*sw latent channels. Exact inverse."""

    config_name = "vae_config.json"

    def __init__(self, stride: tuple[int, int, int] = (1, 4, 4), channels: int = 3):
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.channels = channels
        self.latent_channels = channels * math.prod(self.stride)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        st, sh, sw = self.stride
        return num_frames // st, height // sh, width // sw

    def check_size(self, num_frames: int, height: int, width: int) -> str | None:
        """None if (frames, height, width) fit the strides, else a message saying which values would."""
        for name, value, s in (("num_frames", num_frames, self.stride[0]), ("height", height, self.stride[1]),
                               ("width", width, self.stride[2])):
            if value < s or value % s:
                return f"{name}={value} must be a positive multiple of {s} (e.g. {max(s, value // s * s)})"
        return None

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        st, sh, sw = self.stride
        msg = self.check_size(f, h, w)
        if msg:
            raise ValueError(msg)
        x = video.reshape(b, c, f // st, st, h // sh, sh, w // sw, sw)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, c, st, sh, sw, F', H', W')
        return x.reshape(b, c * st * sh * sw, f // st, h // sh, w // sw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = latents.shape
        st, sh, sw = self.stride
        x = latents.reshape(b, self.channels, st, sh, sw, f, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, c, F', st, H', sh, W', sw)
        return x.reshape(b, self.channels, f * st, h * sh, w * sw)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.config_name).write_text(json.dumps({"type": "pixel_patch", "stride": list(self.stride),
                                                         "channels": self.channels}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PixelPatchVAE:
        cfg = json.loads((Path(path) / cls.config_name).read_text())
        return cls(tuple(cfg["stride"]), cfg.get("channels", 3))

"""Latent spaces. `PixelPatchVAE`: pixels <-> non-overlapping space-time patches stacked on channels (no weights),
the latent space of the tiny models. `WanVAE`: diffusers' AutoencoderKLWan (Wan2.1's causal 3D VAE) from a local
folder, with Wan's latent normalisation. `load_vae(folder)` picks the right one from the saved config. Each says
which frame counts it encodes (`frame_rule`); `vdiff.limits` combines that with the transformer's patch size.

Video tensors are (B, 3, F, H, W) in [-1, 1]; latents are (B, C, F', H', W').
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from vdiff.limits import FrameRule


class PixelPatchVAE(nn.Module):
    """Space-to-depth: a (st, sh, sw) patch of RGB pixels becomes 3*st*sh*sw latent channels. Exact inverse."""

    config_name = "vae_config.json"

    def __init__(self, stride: tuple[int, int, int] = (1, 4, 4), channels: int = 3):
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.channels = channels
        self.latent_channels = channels * math.prod(self.stride)

    @classmethod
    def for_channels(cls, latent_channels: int, channels: int = 3) -> PixelPatchVAE:
        """The (1, k, k) patch VAE whose latents have `latent_channels` = channels * k * k; ValueError if none does."""
        k = math.isqrt(latent_channels // channels)
        if k < 1 or channels * k * k != latent_channels:
            raise ValueError(f"no (1, k, k) pixel patch gives {latent_channels} latent channels (needs {channels}*k*k)")
        return cls((1, k, k), channels)

    @property
    def frame_rule(self) -> FrameRule:
        """Whole temporal patches only: a multiple of the temporal stride."""
        return FrameRule(self.stride[0])

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


class WanVAE(nn.Module):
    """diffusers `AutoencoderKLWan` with Wan's latent normalisation: z_norm = (z - latents_mean) / latents_std.

    Stride (4, 8, 8) for Wan2.1: frames must be 4k+1 (the first frame is encoded on its own), so 81 frames at
    480 x 832 become latents (21, 60, 104) with 16 channels.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        st = getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample)
        ss = getattr(cfg, "scale_factor_spatial", None) or 2 ** len(cfg.temperal_downsample)
        self.stride = (int(st), int(ss), int(ss))
        self.latent_channels = int(cfg.z_dim)
        if len(cfg.latents_mean) != self.latent_channels or len(cfg.latents_std) != self.latent_channels:
            raise ValueError(f"AutoencoderKLWan config: latents_mean/latents_std need z_dim={self.latent_channels} "
                             "values")
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def frame_rule(self) -> FrameRule:
        """The causal VAE encodes the first frame alone, then groups of `stride[0]`: stride[0] * k + 1 frames."""
        return FrameRule(self.stride[0], 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        st, sh, sw = self.stride
        return (num_frames - 1) // st + 1, height // sh, width // sw

    def check_size(self, num_frames: int, height: int, width: int) -> str | None:
        """None if (frames, height, width) fit the VAE, else a message saying which values would."""
        st, sh, sw = self.stride
        if num_frames < 1 or (num_frames - 1) % st:
            lo = max(1, (num_frames - 1) // st * st + 1)
            return f"num_frames={num_frames} must be {st}k+1 for this VAE (e.g. {lo} or {lo + st})"
        for name, value, s in (("height", height, sh), ("width", width, sw)):
            if value < s or value % s:
                return f"{name}={value} must be a positive multiple of {s} (e.g. {max(s, value // s * s)})"
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F', H', W')."""
        msg = self.check_size(*video.shape[2:])
        if msg:
            raise ValueError(msg)
        dist = self.vae.encode(video.to(self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, F', H', W') -> video (B, 3, F, H, W) in [-1, 1]."""
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(self.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype = torch.float32) -> WanVAE:
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True))


def load_vae(path: str | Path, torch_dtype: torch.dtype = torch.float32) -> PixelPatchVAE | WanVAE:
    """The VAE saved in `path`: a PixelPatchVAE (vae_config.json) or a diffusers AutoencoderKLWan (config.json)."""
    path = Path(path)
    if (path / PixelPatchVAE.config_name).is_file():
        return PixelPatchVAE.from_pretrained(path)
    if (path / "config.json").is_file():
        cls_name = json.loads((path / "config.json").read_text()).get("_class_name")
        if cls_name == "AutoencoderKLWan":
            return WanVAE.from_pretrained(path, torch_dtype)
        raise ValueError(f"{path}: unsupported VAE class {cls_name!r} (supported: AutoencoderKLWan, pixel_patch)")
    raise FileNotFoundError(f"no VAE in {path}: expected {PixelPatchVAE.config_name} or a diffusers config.json")

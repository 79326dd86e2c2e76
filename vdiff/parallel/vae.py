"""The VAE decode split over the latent height (`ParallelConfig(vae=k)`): k ranks of a video each decode a band of
latent rows plus `halo` rows of context on each side, keep their band's pixel rows, and all_gather the bands, so
every rank holds the whole video, equal to the one-rank decode.

A VAE says how many rows of context an exact split needs (`split_halo`): 0 for the pixel VAE (each latent row is
its own pixels). A VAE whose decode mixes a whole frame cannot be split exactly with any halo and is refused with the
reason before its weights load: diffusers' AutoencoderKLWan has a self-attention over every position of a frame in
its decoder's middle block, so a band decoded alone differs from the band of the whole decode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WAN_REASON = ("AutoencoderKLWan's decoder runs a self-attention over every position of a frame (its middle block), "
              "so a band of latent rows decoded with any number of halo rows differs from the whole decode")


def split_halo(vae: Any) -> int:
    """Latent rows of context each side that make a band's decode equal to the whole decode; ValueError (with the
    reason) for a VAE that cannot be split."""
    from vdiff.models.vae import PixelPatchVAE

    if isinstance(vae, PixelPatchVAE):
        return 0
    reason = WAN_REASON if type(vae).__name__ == "WanVAE" else f"{type(vae).__name__} declares no exact height split"
    raise ValueError(f"parallel.vae > 1: this VAE cannot be split over the latent height ({reason}); valid values: 1")


def check_vae_folder(folder: Path, degree: int) -> None:
    """The `split_halo` check from a VAE folder's config, before any weight is read."""
    if degree == 1:
        return
    if (folder / "config.json").is_file():
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
        reason = WAN_REASON if name == "AutoencoderKLWan" else f"{name} declares no exact height split"
        raise ValueError(f"parallel.vae={degree}: this VAE cannot be split over the latent height ({reason}); "
                         "valid values: 1")


def bands(rows: int, parts: int) -> list[tuple[int, int]]:
    """`rows` latent rows in `parts` contiguous bands whose sizes differ by at most one (the first ones larger)."""
    if rows < parts:
        raise ValueError(f"parallel.vae={parts}: the latents have {rows} rows, fewer than the ranks that would split "
                         f"them; use parallel.vae <= {rows} or a taller video")
    base, extra = divmod(rows, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append((start, stop))
        start = stop
    return out


class SplitDecode:
    """One rank's part of a height-split decode over `group` (this rank is `index` of `size` there)."""

    def __init__(self, group: Any, index: int, size: int):
        self.group, self.index, self.size = group, index, size

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F', H', W') latents -> (B, 3, F, H, W) video on every rank of the group."""
        halo = split_halo(vae)
        parts = bands(latents.shape[-2], self.size)
        lo, hi = parts[self.index]
        a, b = max(0, lo - halo), min(latents.shape[-2], hi + halo)
        band = vae.decode(latents[..., a:b, :].contiguous())
        scale = band.shape[-2] // (b - a)  # pixel rows per latent row
        band = band[..., (lo - a) * scale:(hi - a) * scale, :]
        tallest = max(stop - start for start, stop in parts) * scale
        if band.shape[-2] < tallest:  # all_gather needs equal shapes: pad, then trim each band to its rows
            band = torch.cat([band, band.new_zeros(*band.shape[:-2], tallest - band.shape[-2], band.shape[-1])], -2)
        gathered = [torch.empty_like(band) for _ in range(self.size)]
        dist.all_gather(gathered, band.contiguous(), group=self.group)
        return torch.cat([g[..., : (stop - start) * scale, :] for g, (start, stop) in zip(gathered, parts)], dim=-2)

"""Shared primitives of the video DiT: 3D rotary position embedding, sinusoidal timestep embedding, fp32 LayerNorm, and
the small MLPs of the conditioning and the blocks (keys as in diffusers' Wan modules)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------------
# 3D RoPE: the head dim is split into (t, h, w) parts; each part rotates channel pairs by position * frequency.
# Wan's split: h and w get 2 * (D // 6) channels each, t gets the rest.
# --------------------------------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


class RotaryPosEmbed3D(nn.Module):
    """cos/sin tables for a (T, H, W) token grid, frame-major, one entry per channel pair: [L, 1, D/2] each."""

    def __init__(self, head_dim: int, max_seq_len: int = 1024, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.axis_dims = rope_axis_dims(head_dim)
        pos = torch.arange(max_seq_len, dtype=torch.float64)
        angles = []
        for dim in self.axis_dims:
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
            angles.append(torch.outer(pos, freqs))  # (S, dim/2), float64 like Wan, rounded to fp32 once
        angles = torch.cat(angles, dim=1)  # (S, D/2)
        self.register_buffer("freqs_cos", angles.cos().float(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin().float(), persistent=False)

    def forward(self, grid: tuple[int, int, int],
                frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the grid's tokens; `frames` (LongTensor [T]) gives each frame's temporal position (default
        0..T-1: a causal model places chunks at absolute or window positions)."""
        t, h, w = grid
        if max(grid) > self.max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.max_seq_len} along an axis")
        if frames is not None and (frames.numel() != t or int(frames.max()) >= self.max_seq_len):
            raise ValueError(f"RoPE frame positions up to {int(frames.max())} for {t} frames: must be {t} positions "
                             f"below rope_max_seq_len={self.max_seq_len}")
        parts = [d // 2 for d in self.axis_dims]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            tt, hh, ww = table.split(parts, dim=1)
            tt = tt[:t] if frames is None else tt[frames.to(tt.device)]
            full = torch.cat(
                [
                    tt.view(t, 1, 1, -1).expand(t, h, w, -1),
                    hh[:h].view(1, h, 1, -1).expand(t, h, w, -1),
                    ww[:w].view(1, 1, w, -1).expand(t, h, w, -1),
                ],
                dim=-1,
            )  # (T, H, W, D/2)
            out.append(full.reshape(t * h * w, 1, -1))  # (L, 1, D/2)
        return out[0], out[1]


@functools.lru_cache(maxsize=32)
def _absolute_position_table(grid: tuple[int, int, int], dim: int, device: torch.device) -> torch.Tensor:
    parts = rope_axis_dims(dim)  # (t, h, w) channel counts, each even
    axes = []
    for n, size, view in zip(parts, grid, ((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, n, 2, dtype=torch.float64) / n))  # (n/2,)
        angles = torch.outer(torch.arange(size, dtype=torch.float64), freqs)  # (size, n/2)
        table = torch.cat([angles.sin(), angles.cos()], dim=1).view(*view, n)  # broadcastable over (T, H, W)
        axes.append(table.expand(*grid, n))
    return torch.cat(axes, dim=-1).reshape(-1, dim).float().to(device)  # (L, D), frame-major


def absolute_position_table(grid: tuple[int, int, int], dim: int, device: torch.device | str) -> torch.Tensor:
    """Fixed sin-cos embedding of each token's absolute (t, h, w) index, [L, dim] frame-major (VideoDiT's optional
    `abs_pos_embed`; the channel split per axis is RoPE's). Cached per (grid, dim, device); do not modify in place."""
    return _absolute_position_table(tuple(int(g) for g in grid), int(dim), torch.device(device))


def apply_rope(x_BLHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x [B, L, H, D] by the angles in cos/sin [L, 1, D/2]."""
    x1, x2 = x_BLHD.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, L, H, D/2, 2)
    return out.flatten(-2).type_as(x_BLHD)


# --------------------------------------------------------------------------------------------------------------------
# Timestep embedding (sinusoidal, [cos, sin] order, as Wan).
# --------------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: (N,) float timesteps in [0, 1000] -> (N, dim) float32 features [cos(t f), sin(t f)]."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (adaLN statistics are sensitive in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# MLPs: timestep embedding, text projection, feed-forward, image embedding (Wan I2V)
# --------------------------------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class GELUProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, keyed `net.0.proj`, `net.2` as in diffusers."""

    def __init__(self, dim: int, inner_dim: int, out_dim: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, inner_dim, approximate), nn.Dropout(0.0), nn.Linear(inner_dim, out_dim or dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> hidden size (Wan I2V)."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, in_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            b, s, c = x.shape
            x = x.view(-1, 2 * s, c) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))

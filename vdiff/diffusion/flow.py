"""Flow matching (rectified flow), Wan convention. The one place the time convention is written down:

    x_s = (1 - s) * x0 + s * noise,    s in [0, 1]   (s = 0: data, s = 1: pure noise)
    v   = d x_s / d s = noise - x0                    (what the model predicts)
    timestep = 1000 * s                               (what the model is conditioned on)

so one Euler step from s to s' is x_{s'} = x_s + (s' - s) * v, and x0 = x_s - s * v. diffusers'
FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler(use_flow_sigmas=True) use the same convention
(their `sigmas` are s).

Training draws s per sample: `uniform`, or `logit_normal` (s = sigmoid(N(mean, std)), SD3), then applies the
timestep shift s' = shift * s / (1 + (shift - 1) * s) (shift > 1 spends more steps at high noise, as Wan's
sampler does at 480p/720p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vdiff.config import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class FlowConfig:
    """Timestep sampling for training. `shift` = 1 means no shift."""

    sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ConfigError(f"flow.shift must be > 0, got {self.shift}")
        if self.logit_std <= 0:
            raise ConfigError(f"flow.logit_std must be > 0, got {self.logit_std}")


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = shift * s / (1 + (shift - 1) * s): the map of diffusers' FlowMatchEulerDiscreteScheduler(shift=...)."""
    if shift == 1.0:
        return s
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(batch: int, config: FlowConfig, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch,) noise levels s in (0, 1), drawn as `config` says, then shifted."""
    if config.sampling == "uniform":
        s = torch.rand(batch, generator=generator, device=device)
    elif config.sampling == "logit_normal":
        s = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"flow.sampling must be 'uniform' or 'logit_normal', got {config.sampling!r}")
    return shift_sigmas(s, config.shift)


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s noise; s: (B,), x0/noise: (B, ...)."""
    s = _expand(s, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0, the model's regression target."""
    return noise - x0


def timesteps_of(s: torch.Tensor) -> torch.Tensor:
    """Model conditioning: timestep = 1000 * s."""
    return s * NUM_TRAIN_TIMESTEPS


def predict_x0(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Invert the path with a predicted velocity: x0 = x_s - s * v."""
    return x_s - _expand(s, x_s) * v


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between predicted and true velocity, in fp32 (a scalar). `weight` (broadcast to the
    error, e.g. (B, 1, F, 1, 1) per latent frame) scales each element's squared error; the mean stays over all."""
    err = (v_pred.float() - velocity_target(x0, noise).float()) ** 2
    return (err if weight is None else weight * err).mean()

"""Sampling: the denoising loop over diffusers' flow-matching schedulers, with classifier-free guidance.

Convention (Wan, rectified flow): x_s = (1 - s) * x0 + s * noise for s in [0, 1]; the model predicts
v = noise - x0 at timestep t = 1000 * s. Both schedulers below use exactly this convention:

    euler   FlowMatchEulerDiscreteScheduler(shift=shift)
    unipc   UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
            (Wan2.1's recipe: 50 steps, shift 3.0 at 480p, 5.0 at 720p)

`shift` > 1 spends more steps at high noise: s' = shift * s / (1 + (shift - 1) * s).

A scheduler keeps per-call state (step index, multistep history), so every sampling call gets a fresh one built from
a template's config (`fresh_scheduler`): a pipeline shared by concurrent requests never shares scheduler state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLERS = ("unipc", "euler")


class Cancelled(RuntimeError):
    """Sampling stopped before its last step: the callback returned False. The server raises the same class when a
    client cancels or goes away (`serve.worker`), so one `except Cancelled` covers both."""


def make_scheduler(sampler: str = "unipc", shift: float = 3.0, num_train_timesteps: int = 1000) -> Any:
    """A diffusers flow-matching scheduler: `unipc` (Wan's default) or `euler`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if sampler == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=float(shift),
                                       num_train_timesteps=num_train_timesteps)
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=float(shift), num_train_timesteps=num_train_timesteps)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")


def sampler_name(scheduler: Any) -> str:
    """'unipc' or 'euler' for a scheduler `make_scheduler` understands; raises for anything else."""
    name = type(scheduler).__name__
    if name == "UniPCMultistepScheduler":
        if not (scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"):
            raise ValueError("UniPCMultistepScheduler must use flow sigmas (use_flow_sigmas=True, "
                             "prediction_type='flow_prediction') to sample a flow-matching model")
        return "unipc"
    if name == "FlowMatchEulerDiscreteScheduler":
        return "euler"
    raise ValueError(f"unsupported scheduler {name}; use one of {list(SAMPLERS)} (make_scheduler)")


def scheduler_shift(scheduler: Any) -> float:
    return float(scheduler.config.flow_shift if sampler_name(scheduler) == "unipc" else scheduler.config.shift)


def fresh_scheduler(template: Any, sampler: str | None = None, shift: float | None = None) -> Any:
    """A new scheduler with the template's settings, optionally another sampler and/or shift. Never shares state."""
    if sampler is None and shift is None:
        sampler_name(template)  # validate
        return type(template).from_config(template.config)
    return make_scheduler(sampler or sampler_name(template), shift if shift is not None else scheduler_shift(template),
                          template.config.num_train_timesteps)


@dataclass
class DenoiseResult:
    latents: torch.Tensor  # (B, C, F, H, W), float32
    step_s: list[float] = field(default_factory=list)  # wall time of each step


@torch.no_grad()
def denoise(
    model: Callable[..., Any],
    latents: torch.Tensor,  # (B, C, F, H, W) initial noise, float32
    cond: torch.Tensor,  # (B, S, text_dim) prompt embeddings
    uncond: torch.Tensor | None,  # (B, S, text_dim) negative-prompt embeddings; None = no guidance
    scheduler: Any,
    num_inference_steps: int,
    guidance_scale: float,
    attention_kwargs: dict[str, Any] | None = None,
    callback: Callable[[int, int, torch.Tensor], Any] | None = None,
    progress: Callable[[], None] | None = None,
    cfg_parallel: Any = None,
) -> DenoiseResult:
    """Run the flow-matching ODE from noise to data with `scheduler`.

    With guidance (`uncond` given and guidance_scale > 1), conditional and unconditional branches run as ONE batch
    of 2B: v = v_uncond + g * (v_cond - v_uncond). `attention_kwargs` are passed to the model with `step` and
    `timestep` filled in per step. `callback(step_index, num_steps, latents)` runs after each step; returning False
    raises `Cancelled`. The model runs in its own dtype; the scheduler state stays float32.

    `cfg_parallel` (vdiff.parallel.inference.CfgExchange): this rank runs one branch of B and gathers the other's v
    (one all_gather per step); every rank then combines and steps the same values, so all ranks stay identical.
    """
    dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else latents.dtype
    cfg = uncond is not None and guidance_scale > 1.0
    split = cfg and cfg_parallel is not None  # CFG parallel: one branch here, the other on the paired rank
    if split:
        context = cfg_parallel.branch(cond, uncond)  # (B, S, text_dim)
    else:
        context = torch.cat([cond, uncond]) if cfg else cond  # (2B or B, S, text_dim), built once for all steps
    context = context.to(latents.device, dtype)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents.float()
    result = DenoiseResult(latents)
    for i, t in enumerate(scheduler.timesteps):
        t0 = time.perf_counter()
        x_in = torch.cat([latents, latents]) if cfg and not split else latents  # (2B or B, C, F, H, W)
        t_in = t.expand(x_in.shape[0]).to(latents.device)
        kwargs = dict(attention_kwargs or {}, step=i, timestep=t_in)
        v = model(x_in.to(dtype), t_in, context, return_dict=False, attention_kwargs=kwargs)[0].float()
        if split:
            v = cfg_parallel.gather(v)  # (2B, C, F, H, W) = [v_cond; v_uncond] on both ranks
        if cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        if latents.is_cuda:
            torch.cuda.synchronize(latents.device)
        result.step_s.append(time.perf_counter() - t0)
        if progress is not None:
            progress()
        if callback is not None and callback(i, num_inference_steps, latents) is False:
            raise Cancelled(f"sampling cancelled by the callback after step {i + 1}/{num_inference_steps}")
    result.latents = latents
    return result

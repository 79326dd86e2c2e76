"""Diffusion: the flow-matching path and training objective (`flow`); sampling loops live beside it."""

from vdiff.diffusion.flow import (
    NUM_TRAIN_TIMESTEPS,
    FlowConfig,
    add_noise,
    flow_loss,
    predict_x0,
    sample_sigmas,
    shift_sigmas,
    timesteps_of,
    velocity_target,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "FlowConfig",
    "add_noise",
    "flow_loss",
    "predict_x0",
    "sample_sigmas",
    "shift_sigmas",
    "timesteps_of",
    "velocity_target",
]

"""Flow-matching path (Wan convention) against its definition and diffusers' scheduler."""

import pytest
import torch

from vdiff.config import ConfigError
from vdiff.diffusion.flow import (
    FlowConfig,
    add_noise,
    flow_loss,
    predict_x0,
    sample_sigmas,
    shift_sigmas,
    timesteps_of,
    velocity_target,
)


def test_path_endpoints_velocity_and_inverse():
    x0, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    s = torch.tensor([0.0, 0.3, 1.0])
    x_s = add_noise(x0, noise, s)
    torch.testing.assert_close(x_s[0], x0[0])  # s = 0: data
    torch.testing.assert_close(x_s[2], noise[2])  # s = 1: noise
    torch.testing.assert_close(x_s[1], 0.7 * x0[1] + 0.3 * noise[1])
    v = velocity_target(x0, noise)
    # v is the derivative of the path in s (finite difference, exact for a straight line)
    eps = 1e-3
    fd = (add_noise(x0, noise, s + eps) - add_noise(x0, noise, s)) / eps
    torch.testing.assert_close(fd, v, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(predict_x0(x_s, v, s), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(timesteps_of(s), torch.tensor([0.0, 300.0, 1000.0]))
    assert flow_loss(v, x0, noise).item() == 0.0
    assert flow_loss(torch.zeros_like(v), x0, noise).item() == pytest.approx(v.pow(2).mean().item(), rel=1e-6)
    w = torch.tensor([2.0, 0.0, 1.0]).view(3, *[1] * (v.dim() - 1))  # per sample: the mean stays over all
    want = (w * v.pow(2)).mean().item()
    assert flow_loss(torch.zeros_like(v), x0, noise, w).item() == pytest.approx(want, rel=1e-6)


def test_shift_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)
    # its training sigmas are the shifted grid t / 1000, t = 1000 ... 1
    base = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(shift_sigmas(base, 3.0).float(), sched.sigmas.float(), atol=1e-6, rtol=1e-6)
    sched.set_timesteps(10)
    # an Euler step of the scheduler moves x along v exactly as the convention says
    x, v = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    out = sched.step(v, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(out, x + (sched.sigmas[1] - sched.sigmas[0]) * v)


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_sigmas(20000, FlowConfig(sampling="uniform"), generator=g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = sample_sigmas(20000, FlowConfig(sampling="logit_normal", logit_mean=0.0, logit_std=1.0), generator=g)
    assert abs(ln.median().item() - 0.5) < 0.02 and ln.std() < u.std()  # concentrated in the middle
    shifted = sample_sigmas(20000, FlowConfig(sampling="uniform", shift=3.0), generator=g)
    assert abs(shifted.median().item() - shift_sigmas(torch.tensor(0.5), 3.0).item()) < 0.02  # = 0.75
    with pytest.raises(ConfigError, match="flow.shift"):
        FlowConfig(shift=0.0)

"""bench parallel's arguments: --shape wan480 (the GPU target shape) refuses what it cannot run, with the reason,
before any process starts; --shape tiny keeps its defaults."""

from __future__ import annotations

import pytest

from bench import parallel


def test_wan480_needs_one_cuda_device_per_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(parallel, "_launch", lambda *a: pytest.fail("started processes"))
    with pytest.raises(SystemExit, match=r"needs 8 CUDA devices for --splits cfg2 cfg2xulysses4 \(one per rank\); "
                                         r"this machine has 4"):
        parallel.main(["--shape", "wan480", "--splits", "cfg2", "cfg2xulysses4"])


@pytest.mark.parametrize("flag", ["--frames", "--size", "--layers"])
def test_wan480_refuses_the_tiny_shape_flags(flag, capsys):
    with pytest.raises(SystemExit) as err:
        parallel.main(["--shape", "wan480", flag, "3"])
    assert err.value.code == 2
    assert f"{flag} is for --shape tiny; wan480 is wan2.1-1.3b (30 layers) at 81 x 480 x 832" in capsys.readouterr().err


def test_tiny_defaults_and_bad_values(monkeypatch, capsys):
    seen = {}

    def stop(folder, args):
        seen.update(vars(args))
        raise SystemExit(0)

    monkeypatch.setattr(parallel, "_save_pipeline", stop)
    with pytest.raises(SystemExit):
        parallel.main([])
    assert (seen["frames"], seen["size"], seen["steps"], seen["layers"]) == (8, 32, 4, 4)
    with pytest.raises(SystemExit) as err:
        parallel.main(["--steps", "0"])
    assert err.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err

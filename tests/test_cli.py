"""The product's command lines: `python -m vdiff.sample`, `python -m vdiff.eval`, their `[project.scripts]` entry
points, and what ./launch.sh does before it hands over (the recipe check ahead of torchrun).

The CLIs are run as a user runs them (a child `python -m ...`, or ./launch.sh) where the point is the launch itself,
and called in-process where the point is what they write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from vdiff.config import model_preset
from vdiff.pipeline import PipelineConfig, VideoPipeline

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"vdiff-sample": "vdiff.sample:main", "vdiff-eval": "vdiff.eval.cli:main",
                "vdiff-serve": "serve.__main__:main", "vdiff-train": "train.__main__:main"}


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    cfg = PipelineConfig(num_frames=4, height=16, width=16, num_inference_steps=3, text_max_length=16)
    return VideoPipeline.from_model_config(model_preset("tiny", num_layers=2), config=cfg, seed=0)


def python_m(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root, with the root on the path as ./launch.sh sets it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """./launch.sh with this interpreter's venv (so no setup runs) and stdout + stderr as one text."""
    env = {**os.environ, "VDIFF_VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------------------------
# ./launch.sh sample (python -m vdiff.sample)
# --------------------------------------------------------------------------------------------------------------------


def test_sample_cli_writes_the_video_and_stats(pipe, tmp_path, capsys):
    import imageio.v3 as iio

    from vdiff import sample as cli

    pipe.save_pretrained(tmp_path / "p")
    out, stats = tmp_path / "clip.gif", tmp_path / "stats.json"
    rc = cli.main(["--checkpoint", str(tmp_path / "p"), "--prompt", "a red circle", "--out", str(out), "--stats",
                   str(stats), "num_inference_steps=2", "seed=5", "cache=[text_kv,step]", "step.threshold=0.0"])
    assert rc == 0 and iio.imread(out, index=None).shape[0] == 4
    record = json.loads(stats.read_text())
    assert record["seed"] == 5 and record["steps"] == 2 and record["cache"]["step"]["computed"] == 2
    assert cli.main(["--checkpoint", str(tmp_path / "p"), "--prompt", "x", "--out", str(out), "height=30"]) == 2
    assert "height=30 is not allowed" in capsys.readouterr().err


def test_sample_runs_as_a_module(pipe, tmp_path):
    """The module form that launch.sh calls: a video and its summary line on success, exit 2 naming a bad setting."""
    import imageio.v3 as iio

    pipe.save_pretrained(tmp_path / "p")
    out = tmp_path / "clip.gif"
    done = python_m("vdiff.sample", "--checkpoint", str(tmp_path / "p"), "--prompt", "a red circle", "--out", str(out),
                    "num_inference_steps=2", "seed=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout and "seed 5;" in done.stdout
    assert iio.imread(out, index=None).shape[0] == 4
    bad = python_m("vdiff.sample", "--checkpoint", str(tmp_path / "p"), "--prompt", "x", "--out", str(out),
                   "height=30")
    assert bad.returncode == 2 and "height=30 is not allowed" in bad.stderr


def test_launcher_help_comes_from_the_modules():
    for command, expected in (("sample", "key=value settings (YAML values)"), ("eval", "num_clips=144")):
        done = launch(command, "--help", timeout=120)
        assert done.returncode == 0, done.stdout[-3000:]
        assert f"usage: ./launch.sh {command}" in done.stdout and expected in done.stdout


# --------------------------------------------------------------------------------------------------------------------
# [project.scripts]
# --------------------------------------------------------------------------------------------------------------------


def test_entry_points_name_each_commands_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == ENTRY_POINTS
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), target


def test_installed_entry_point_runs():
    """Where vdiff is installed into this interpreter's environment, `vdiff-sample` is the same command."""
    exe = Path(sys.executable).parent / "vdiff-sample"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e . makes it)")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "key=value settings (YAML values)" in done.stdout


# --------------------------------------------------------------------------------------------------------------------
# ./launch.sh train: the recipe is checked before torchrun starts
# --------------------------------------------------------------------------------------------------------------------


def _train_has_check() -> bool:
    return "--check" in python_m("train", "--help", timeout=120).stdout


@pytest.mark.parametrize("override, field", [("train.max_stepz=3", "max_stepz"),
                                             ("train.checkpoint_every=0", "checkpoint_every")])
def test_launcher_rejects_a_bad_recipe_before_torchrun(override, field):
    if not _train_has_check():
        pytest.skip("python -m train --check is not there yet")
    done = launch("train", "--config", "configs/train/tiny.yaml", "--nproc", "1", override, timeout=180)
    assert done.returncode == 2, done.stdout[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error:") and field in lines[0], done.stdout[-3000:]
    assert "torch.distributed" not in done.stdout and "ChildFailedError" not in done.stdout

"""`python -m train` subcommands: `--check` (what ./launch.sh runs before torchrun) and `export` of a checkpoint
(real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "train" / "tiny.yaml"
SMALL = ["model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=16", "model.ffn_dim=64",
         "data.num_frames=8", "data.height=16", "data.width=16", "validation.at_end=false"]


def python_m_train(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_check_is_silent_for_a_valid_recipe():
    proc = python_m_train(["--check", "--config", str(TINY), "train.max_steps=3", "model.attention.backend=radial"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("override, names", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.deepspeed=nowhere.json", "train.deepspeed: config file not found"),
])
def test_check_prints_one_line_and_exits_2(override, names, capsys):
    assert train_main(["--check", "--config", str(TINY), override]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("config error: ") and names in err, err


@pytest.mark.slow
def test_export_of_the_last_checkpoint_is_the_runs_own_export(tmp_path):
    """`python -m train export` restores a checkpoint as a resume would, so exporting the last one of a finished run
    gives the pipeline the run exported itself (EMA weights, byte for byte); an earlier one gives other weights."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    common = [*SMALL, "data.num_samples=8", "train.batch_size=4", "train.ema_decay=0.5", "optim.lr=1e-3"]
    proc = python_m_train(["--config", str(TINY), *common, f"output_dir={run}", "train.max_steps=2",
                           "train.checkpoint_every=1", "train.export=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    own = load_file(run / "pipeline" / weights)
    for checkpoint, same in ((run, True), (run / "checkpoints" / "step-00000001", False)):
        out = tmp_path / f"snap-{same}"
        proc = python_m_train(["export", "--config", str(TINY), "--checkpoint", str(checkpoint), "--out", str(out),
                               *common])
        assert proc.returncode == 0, proc.stderr[-3000:]
        step = 2 if same else 1
        assert f"(step {step}) -> {out}" in proc.stdout
        assert sorted(p.name for p in out.iterdir()) == ["SNAPSHOT.txt", "scheduler", "transformer", "vae",
                                                         "vdiff.json"]
        snap = load_file(out / weights)
        assert snap.keys() == own.keys()
        assert all(torch.equal(snap[k], own[k]) for k in own) == same

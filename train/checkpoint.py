"""Checkpoints of a run (for resume) and the initial weights of a fine-tune.

    output_dir/checkpoints/step-00000050/   accelerate.save_state (model, optimizer, LR schedule, EMA, progress, RNG)
                                            + trainer_state.json {"step", "recipe"}
    output_dir/checkpoints/.tmp-step-N/     a checkpoint being written: never `latest`, never resumed from

A checkpoint is written into its temporary folder and renamed into place once every file is there, so a run killed
mid-write leaves the previous checkpoint as `latest`; the oldest are deleted beyond train.keep_checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("vdiff.train")

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")

# Called with (temporary folder, step) after a checkpoint's files are written and before it is published. Tests use
# it to kill a run at the worst moment.
BeforePublish = Callable[[Path, int], None]


class Progress:
    """What the loop has done (saved with every checkpoint)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The published checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


class CheckpointManager:
    """Saves, lists and restores the checkpoints of one run through an Accelerator (every rank calls every method;
    only the main process touches the folder structure)."""

    def __init__(self, run_dir: str | Path, accelerator: Any, keep: int, before_publish: BeforePublish | None = None):
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.accelerator, self.keep, self.before_publish = accelerator, keep, before_publish

    def list(self) -> list[Path]:
        return list_checkpoints(self.run_dir)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """accelerate.save_state into checkpoints/.tmp-step-N, trainer_state.json beside it, then an atomic rename to
        checkpoints/step-N and the oldest beyond `keep` removed."""
        acc, is_main = self.accelerator, self.accelerator.is_main_process
        final, tmp = self.root / f"step-{step:08d}", self.root / f".tmp-step-{step:08d}"
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            if self.before_publish is not None:
                self.before_publish(tmp, step)
            if final.exists():  # re-reaching a step after resuming from an earlier checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def resume(self, want: str | Path | None) -> Path | None:
        """Restore `want` (train.resume: None, "latest" or a checkpoint folder) into everything registered with the
        accelerator. Returns the folder restored, or None for a fresh start ("latest" with no checkpoint yet is one,
        so a job can be resubmitted with the same command)."""
        if want is None:
            return None
        if want == "latest":
            path = self.latest()
            if path is None:
                if self.accelerator.is_main_process:
                    logger.warning("train.resume=latest: no checkpoint under %s, starting at step 0", self.root)
                return None
        else:
            path = Path(want)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume: checkpoint folder not found: {path}")
        self.accelerator.load_state(str(path))
        return path


# --------------------------------------------------------------------------------------------------------------------
# Initial weights (train.init_from): fine-tuning starts from a saved transformer
# --------------------------------------------------------------------------------------------------------------------


# vdiff's own additions to Wan's VideoDiT (no Wan checkpoint has them): allowed to be missing from initial weights,
# they keep their fresh initialisation (a key, or a module prefix ending in ".")
OPTIONAL_KEYS = ("pos_embed_gain",)


def _optional(key: str) -> bool:
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in OPTIONAL_KEYS)


def load_initial_weights(model: torch.nn.Module, source: str | Path) -> None:
    """`train.init_from`: copy weights into a freshly built model. Every key must match in name and shape, except
    vdiff's own additions (OPTIONAL_KEYS, e.g. abs_pos_embed's gain when a Wan checkpoint is fine-tuned with
    abs_pos_embed=true), which keep their fresh initialisation."""
    from safetensors.torch import load_file

    path = Path(source)
    for candidate in (path / "transformer" / "diffusion_pytorch_model.safetensors",
                      path / "diffusion_pytorch_model.safetensors", path):
        if candidate.is_file():
            break
    else:
        raise FileNotFoundError(f"train.init_from: no transformer weights at {source} (a pipeline folder, a "
                                "transformer folder or a .safetensors file)")
    state = load_file(str(candidate))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not _optional(k))
    if wrong or unexpected or missing:
        raise ValueError(f"train.init_from={source}: weights do not fit this model config: shape mismatches "
                         f"{wrong[:5]}, unexpected keys {unexpected[:5]}, missing keys {missing[:5]}")
    model.load_state_dict(state, strict=False)
    logger.info("initial weights from %s (%d tensors)", candidate, len(state))

"""Parallelism applied from outside the model: Ulysses sequence parallel (`SequenceParallel`, its hooks and groups);
at inference `ParallelConfig` (config.py), the device mesh (mesh.py) and the per-call protocol (inference.py).

The sequence-parallel names are imported on first use: they need diffusers' hook registry (and with it peft and
transformers, ~8 s), which `python -m train --check` and the other light entry points never touch."""

from __future__ import annotations

import importlib
from typing import Any

from vdiff.parallel.config import ParallelConfig

_SEQUENCE = ("SequenceParallel", "apply_sequence_parallel", "remove_sequence_parallel", "sequence_parallel_groups")

__all__ = ["ParallelConfig", *_SEQUENCE]


def __getattr__(name: str) -> Any:
    if name in _SEQUENCE:
        return getattr(importlib.import_module("vdiff.parallel.sequence"), name)
    raise AttributeError(f"module 'vdiff.parallel' has no attribute {name!r}")

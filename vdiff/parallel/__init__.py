"""Parallelism applied from outside the model: Ulysses sequence parallel (`SequenceParallel`, its hooks and groups);
at inference `ParallelConfig` (config.py), the device mesh (mesh.py) and the per-call protocol (inference.py)."""

from vdiff.parallel.config import ParallelConfig
from vdiff.parallel.sequence import (
    SequenceParallel,
    apply_sequence_parallel,
    remove_sequence_parallel,
    sequence_parallel_groups,
)

__all__ = ["ParallelConfig", "SequenceParallel", "apply_sequence_parallel", "remove_sequence_parallel",
           "sequence_parallel_groups"]

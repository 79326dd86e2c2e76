"""Parallelism applied from outside the model: Ulysses sequence parallel (`SequenceParallel`, its hooks and groups)."""

from vdiff.parallel.sequence import (
    SequenceParallel,
    apply_sequence_parallel,
    remove_sequence_parallel,
    sequence_parallel_groups,
)

__all__ = ["SequenceParallel", "apply_sequence_parallel", "remove_sequence_parallel", "sequence_parallel_groups"]

"""Parallelism helpers: Ulysses sequence parallel (`SequenceParallel`) and its process groups."""

from vdiff.parallel.sequence import SequenceParallel, sequence_parallel_groups

__all__ = ["SequenceParallel", "sequence_parallel_groups"]

"""`sparse_pattern(method, grid, ...)`: what a sparse method computes, as an object with `.density` and `.mask()`.

Each sparse method module registers a builder with `register_pattern(name, builder)`; the builder takes
`(grid, *, q=None, k=None, layer=0, **options)` and returns a `SparsePattern`. Density is the fraction of
(query, key) token pairs the fast path computes over frame-major video tokens (per-head methods average over heads);
`.mask()` is that set as a BoolTensor [L, L] (or [H, L, L] for per-head methods), frame-major, for small grids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SparsePattern:
    method: str
    grid: tuple[int, int, int]
    density: float
    _mask_fn: Callable[[], torch.Tensor]
    info: dict[str, Any] | None = None

    def mask(self) -> torch.Tensor:
        """BoolTensor [L, L] (or [H, L, L]) over frame-major tokens: True where the fast path computes the pair."""
        return self._mask_fn()


_PATTERNS: dict[str, Callable[..., SparsePattern]] = {}


def register_pattern(name: str, builder: Callable[..., SparsePattern]) -> None:
    _PATTERNS[name] = builder


def sparse_pattern(method: str, grid: tuple[int, int, int], *, q: torch.Tensor | None = None,
                   k: torch.Tensor | None = None, layer: int = 0, **options: Any) -> SparsePattern:
    from vdiff.attention.registry import _load_builtin_backends

    _load_builtin_backends()
    if method not in _PATTERNS:
        raise ValueError(f"sparse_pattern: unknown method {method!r}; known: {sorted(_PATTERNS)}")
    return _PATTERNS[method](tuple(grid), q=q, k=k, layer=layer, **options)

"""Attention: one seam (`dispatch`), dense kernels and sparse video attention behind it.

    from vdiff.attention import available
    for status in available().values():
        print(status)
"""

from vdiff.attention.patterns import SparsePattern, register_pattern, sparse_pattern
from vdiff.attention.registry import (
    DEFAULT_MASK_CACHE,
    DENSE_KERNELS,
    AttentionBackend,
    AttentionContext,
    AttentionStats,
    BackendStatus,
    BackendUnavailable,
    MaskCache,
    available,
    check_config,
    dispatch,
    get_backend,
    register_backend,
    resolve,
    token_order,
)

__all__ = [
    "DEFAULT_MASK_CACHE",
    "DENSE_KERNELS",
    "AttentionBackend",
    "AttentionContext",
    "AttentionStats",
    "BackendStatus",
    "BackendUnavailable",
    "MaskCache",
    "available",
    "check_config",
    "dispatch",
    "get_backend",
    "register_backend",
    "register_pattern",
    "resolve",
    "SparsePattern",
    "sparse_pattern",
    "token_order",
]

"""Attention: one seam (`dispatch`), dense kernels and sparse video attention behind it.

    from vdiff.attention import available
    for status in available().values():
        print(status)

Files: registry (the seam: backends, dispatch, contexts, stats, mask cache), policy (which implementation a sparse
method runs), dense (sdpa / flex / xformers / flash kernels), flex (FlexAttention helpers), gather (the gather kernel),
blocksparse (the static block-sparse backend base), radial, sliding_tile, vmoba, patterns (`sparse_pattern`).
"""

from vdiff.attention.patterns import SparsePattern, register_pattern, sparse_pattern
from vdiff.attention.registry import (
    DENSE_KERNELS,
    AttentionBackend,
    AttentionContext,
    AttentionStats,
    BackendStatus,
    BackendUnavailable,
    CallInfo,
    MaskCache,
    available,
    backend_names,
    check_config,
    clear_capability_cache,
    dispatch,
    get_backend,
    register_backend,
    resolve,
    token_order,
    unregister_backend,
)

__all__ = [
    "DENSE_KERNELS",
    "AttentionBackend",
    "AttentionContext",
    "AttentionStats",
    "BackendStatus",
    "BackendUnavailable",
    "CallInfo",
    "MaskCache",
    "SparsePattern",
    "available",
    "backend_names",
    "check_config",
    "clear_capability_cache",
    "dispatch",
    "get_backend",
    "register_backend",
    "register_pattern",
    "resolve",
    "sparse_pattern",
    "token_order",
    "unregister_backend",
]

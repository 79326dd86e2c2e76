"""Per-call cache state. Hooks are installed once on a (shared) model; what they remember lives in a `CacheCall`.

A sampling call opens `cache_context(...)`; hooks read `current_call()` (a ContextVar, so concurrent calls in other
threads or tasks each see their own state and never share text K/V or step residuals). The context also says which
installed hooks are active for this call and with which config:

    with cache_context(enabled={"text_kv", "step"}, configs={"step": StepCacheConfig(threshold=0.05)}) as call:
        ... run the denoising loop ...
    call.stats  # {"text_kv": {"hits": 42, "misses": 6}, "step": {...}}

Outside any context, call-scoped hooks (text_kv, step) pass through unchanged; cross-call hooks (mask, prompt)
stay active.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

_CURRENT: ContextVar[CacheCall | None] = ContextVar("vdiff_cache_call", default=None)


@dataclass
class CacheCall:
    enabled: frozenset[str] | None = None  # names of the caches active in this call; None = every installed one
    configs: dict[str, Any] = field(default_factory=dict)  # per-call config overrides, by cache name
    data: dict[Any, Any] = field(default_factory=dict)  # hook-private state, keyed by the hook object
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Under parallel generation: (new, old) -> mean|new - old| / mean|old| over every rank's share of the video
    # (ParallelRuntime.relative_change), so caches that decide from it (the step cache) decide alike on all ranks.
    # None: one process.
    relative_change: Any = None

    def active(self, name: str) -> bool:
        return self.enabled is None or name in self.enabled

    def config(self, name: str, default: Any) -> Any:
        return self.configs.get(name, default)

    def count(self, name: str, key: str, n: int = 1) -> None:
        slot = self.stats.setdefault(name, {})
        slot[key] = slot.get(key, 0) + n


def current_call() -> CacheCall | None:
    """The cache state of the sampling call running in this thread / task, or None outside one."""
    return _CURRENT.get()


@contextmanager
def cache_context(enabled: set[str] | frozenset[str] | list[str] | None = None,
                  configs: dict[str, Any] | None = None, *, call: CacheCall | None = None,
                  keep: bool = False) -> Iterator[CacheCall]:
    """Scope one sampling call: hooks keep their per-call state here and drop it when the block ends.

    `call` re-enters an existing call's state and `keep` leaves it in place at the end: a stream opens the context
    around each chunk's work (never across a `yield`, where the caller's code would run inside it) yet keeps one
    call's state, e.g. the text K/V, from the first chunk to the last."""
    if call is None:
        call = CacheCall(frozenset(enabled) if enabled is not None else None, dict(configs or {}))
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)
        if not keep:
            call.data.clear()

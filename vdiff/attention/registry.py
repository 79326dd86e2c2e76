"""The attention seam: a registry of backends and the one function blocks call, `dispatch(q, k, v, ctx)`.

Layout everywhere is Wan's: q, k, v and the output are `[B, L, H, D]`. A backend registers once with a capability
check that says *why* it cannot run (no silent fallback: asking for one that cannot run raises with that reason).
Capability answers are cached per (backend, device type), so a call does not re-ask them.

Which backend runs a call is decided from the context only:
    ctx.config.backend            dense | radial | vmoba | sliding_tile
    ctx.config.kernel             the dense kernel: sdpa | flex | xformers | flash
    ctx.config.dense_layers       layers that run the dense kernel even under a sparse backend
    ctx.config.dense_steps        denoising steps (from 0) that run dense: warm-up
Sparse backends may reorder tokens once per forward (`token_order`); the model applies that permutation after
patch embedding and restores frame-major order before unpatchify, so dense layers see the same tokens permuted,
which dense attention does not notice.

Backends keep no per-call state: what a call computed (its density, the implementation that ran) is returned by
`AttentionBackend.attend` and recorded by `dispatch` in the call's `AttentionStats`, so concurrent calls on one
shared backend object (server workers) never read each other's numbers.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from vdiff.config import AttentionConfig, ConfigError
from vdiff.runtime import default_device

DENSE_KERNELS = ("sdpa", "flex", "xformers", "flash")


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# Mask cache: static masks / block indices keyed by (method, grid, options, device), shared across layers, steps and
# requests. Thread-safe, LRU-bounded.
# --------------------------------------------------------------------------------------------------------------------


class MaskCache:
    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._store: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                self.hits += 1
                return self._store[key]
        value = build()  # built outside the lock: block masks can take seconds
        with self._lock:
            self.misses += 1
            self._store[key] = value
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __bool__(self) -> bool:  # an empty cache is still a cache (`cache or default` must keep it)
        return True


@dataclass
class AttentionStats:
    """Accumulates what attention computed during a forward or a whole sampling call."""

    calls: int = 0
    density_sum: float = 0.0
    by_backend: dict[str, int] = field(default_factory=dict)
    by_impl: dict[str, int] = field(default_factory=dict)  # "radial:gather" -> calls: the path each call ran

    def record(self, backend: str, density: float, impl: str | None = None) -> None:
        self.calls += 1
        self.density_sum += density
        self.by_backend[backend] = self.by_backend.get(backend, 0) + 1
        key = f"{backend}:{impl or backend}"
        self.by_impl[key] = self.by_impl.get(key, 0) + 1

    @property
    def density(self) -> float:
        """Mean fraction of (query, key) pairs computed per self-attention call (1.0 = dense)."""
        return self.density_sum / self.calls if self.calls else 1.0


@dataclass(frozen=True)
class CallInfo:
    """What one backend call computed: the fraction of (query, key) pairs and the implementation that ran."""

    density: float
    impl: str


@dataclass
class AttentionContext:
    """What a backend may know about a self-attention call besides q, k, v.

    grid: the token grid (T, H, W) after patching; L == T * H * W (frame-major unless the backend reordered).
    layer / step / timestep: position in the network and in the denoising loop (step None = training / unknown).
    mask_cache: where static masks live; a fresh one per context unless the caller passes a longer-lived one (the
    `mask` cache hook does), so one forward builds each mask once and nothing is kept behind the caller's back.
    """

    grid: tuple[int, int, int]
    config: AttentionConfig = field(default_factory=AttentionConfig)
    layer: int = 0
    step: int | None = None
    timestep: torch.Tensor | None = None
    mask_cache: MaskCache = field(default_factory=MaskCache)
    stats: AttentionStats | None = None
    # Sequence parallel: an object with `gather(q, k, v) -> (q, k, v)` (full sequence, fewer heads) and
    # `scatter(out) -> out` (back to the local sequence shard); set by vdiff.parallel's hook, never by the model.
    sequence_parallel: Any = None
    # Causal models (long video): the chunk layout of this forward (vdiff.models.causal.CausalLayout) and the
    # per-call KV state the causal_kv cache hook reads (None: no cache, the plain block-causal attention).
    causal: Any = None
    kv_cache: Any = None
    # A block-causal call (one chunk's queries over several chunks' keys): the keys span `key_frames` token frames of
    # the grid's (H, W), frame-major, the query chunk (`grid`) last. None: queries and keys are the grid's tokens.
    key_frames: int | None = None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def for_layer(self, layer: int) -> AttentionContext:
        return dataclasses.replace(self, layer=layer)


# --------------------------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------------------------


class AttentionBackend:
    """Base class. Subclasses set `name`, implement `forward` (or `attend`, to report a per-call density), and say why
    they cannot run in `unavailable_reason`."""

    name: str = ""
    description: str = ""
    sparse: bool = False

    def unavailable_reason(self, device: torch.device | str | None = None) -> str | None:
        """None if this backend can run on `device` (default: the best device here), else the reason."""
        return None

    def backward_reason(self, device: torch.device | str | None = None) -> str | None:
        """None if backward works on `device`, else why not (e.g. compiled FlexAttention on CPU)."""
        return None

    def implementation_note(self, device: torch.device) -> str | None:
        """Which implementation impl=auto runs on `device` and why (sparse backends), for `available()`."""
        return None

    def token_order(self, grid: tuple[int, int, int], config: AttentionConfig) -> torch.Tensor | None:
        """Permutation `perm` (LongTensor [L]) such that tokens_reordered = tokens_frame_major[:, perm];
        None = identity."""
        return None

    def density(self, ctx: AttentionContext) -> float:
        """Fraction of (query, key) pairs this backend computes for `ctx` (1.0 for dense; NaN where it depends on
        q and k: read the call's `CallInfo` instead)."""
        return 1.0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ctx: AttentionContext) -> tuple[torch.Tensor, CallInfo]:
        """The output [B, L, H, D] and what this call computed."""
        return self.forward(q, k, v, ctx), CallInfo(self.density(ctx), self.name)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attention backend {self.name}>"


_REGISTRY: dict[str, AttentionBackend] = {}
_CAPABILITY: dict[tuple[str, str], str | None] = {}  # (backend, device type) -> unavailable reason
_CAPABILITY_LOCK = threading.Lock()


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    if not backend.name:
        raise ValueError("an attention backend needs a name")
    _REGISTRY[backend.name] = backend
    clear_capability_cache()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (tests remove what they register)."""
    if _REGISTRY.pop(name, None) is None:
        raise KeyError(f"no attention backend named {name!r}; registered: {sorted(_REGISTRY)}")
    clear_capability_cache()


def clear_capability_cache() -> None:
    """Forget cached capability answers (after installing a package, or in tests that change what a device can do)."""
    with _CAPABILITY_LOCK:
        _CAPABILITY.clear()


def _unavailable(backend: AttentionBackend, device: torch.device) -> str | None:
    key = (backend.name, device.type)
    with _CAPABILITY_LOCK:
        if key in _CAPABILITY:
            return _CAPABILITY[key]
    reason = backend.unavailable_reason(device)
    with _CAPABILITY_LOCK:
        _CAPABILITY[key] = reason
    return reason


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str | None
    backward: bool
    backward_reason: str | None
    sparse: bool
    description: str
    implementation: str | None = None  # sparse backends: what impl=auto runs on this device, and why

    def __str__(self) -> str:
        state = "yes" if self.available else f"no ({self.reason})"
        bwd = "yes" if self.backward else f"no ({self.backward_reason})"
        impl = f"; {self.implementation}" if self.implementation else ""
        return f"{self.name:13s} runs: {state}; backward: {bwd}{impl}"


def available(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Every registered backend with whether it can run on `device` here (forward and backward), why not, and for
    the sparse ones which implementation impl=auto uses there."""
    _load_builtin_backends()
    device = torch.device(device) if device is not None else default_device()
    out = {}
    for name, backend in _REGISTRY.items():
        reason = _unavailable(backend, device)
        bwd_reason = reason or backend.backward_reason(device)
        out[name] = BackendStatus(
            name=name, available=reason is None, reason=reason, backward=bwd_reason is None,
            backward_reason=bwd_reason, sparse=backend.sparse, description=backend.description,
            implementation=backend.implementation_note(device) if reason is None else None,
        )
    return out


def backend_names() -> list[str]:
    """Names a config may use for `attention.backend`: dense and every registered backend that is not one of the
    dense kernels (those are chosen with `attention.kernel`)."""
    _load_builtin_backends()
    return sorted({"dense", *(name for name in _REGISTRY if name not in DENSE_KERNELS)})


def check_names(config: AttentionConfig) -> None:
    """Raise ConfigError if `config` names a backend or dense kernel that is not registered (config build time)."""
    if config.kernel not in DENSE_KERNELS:
        raise ConfigError(f"attention.kernel must be one of {list(DENSE_KERNELS)}, got {config.kernel!r}")
    names = backend_names()
    if config.backend not in names:
        raise ConfigError(f"attention.backend must be one of {names}, got {config.backend!r}")


def get_backend(name: str, device: torch.device | str | None = None) -> AttentionBackend:
    """The backend called `name`; raises `BackendUnavailable` with the reason if it cannot run on `device`."""
    _load_builtin_backends()
    if name == "dense":
        name = "sdpa"
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown attention backend {name!r}; registered: {sorted(_REGISTRY)}")
    backend = _REGISTRY[name]
    reason = _unavailable(backend, torch.device(device) if device is not None else default_device())
    if reason is not None:
        raise BackendUnavailable(f"attention backend {name!r} cannot run here: {reason}")
    return backend


def check_config(config: AttentionConfig, device: torch.device | str | None = None) -> None:
    """Raise now (not mid-forward) if `config` asks for something that cannot run on `device`: `ConfigError` for a
    name that is not registered (a config changed after it was built), `BackendUnavailable` with the reason."""
    check_names(config)
    get_backend(config.kernel, device)
    if config.backend != "dense":
        get_backend(config.backend, device)


def resolve(ctx: AttentionContext) -> str:
    """Name of the backend that runs this call: the sparse backend, or the dense kernel for dense layers/steps."""
    cfg = ctx.config
    if cfg.backend == "dense":
        return cfg.kernel
    if ctx.layer in cfg.dense_layers:
        return cfg.kernel
    if ctx.step is not None and ctx.step < cfg.dense_steps:
        return cfg.kernel
    return cfg.backend


def token_order(config: AttentionConfig, grid: tuple[int, int, int], device: torch.device | str,
                mask_cache: MaskCache) -> torch.Tensor | None:
    """The token permutation the configured backend wants for `grid` (None = keep frame-major), cached."""
    if config.backend == "dense":
        return None
    backend = get_backend(config.backend, device)
    key = ("token_order", config.backend, tuple(grid), options_key(config), str(torch.device(device)))

    def build() -> torch.Tensor | None:
        perm = backend.token_order(tuple(grid), config)
        return None if perm is None else perm.to(device)

    return mask_cache.get_or_build(key, build)


def options_key(config: AttentionConfig) -> Hashable:
    """A hashable key of the configured sparse method's options (for caches)."""
    opts = getattr(config, config.backend, None)
    return dataclasses.astuple(opts) if dataclasses.is_dataclass(opts) else None


def dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Self-attention through the configured backend. q, k, v: [B, L, H, D] -> [B, L, H, D]."""
    name = resolve(ctx)
    backend = get_backend(name, q.device)
    sp = ctx.sequence_parallel
    if sp is not None:
        q, k, v = sp.gather(q, k, v)  # [B, L_local, H, D] -> [B, L, H/N, D]
    out, info = backend.attend(q, k, v, ctx)
    if sp is not None:
        out = sp.scatter(out)  # [B, L, H/N, D] -> [B, L_local, H, D]
    if ctx.stats is not None:
        ctx.stats.record(name, info.density, info.impl)
    return out


_BUILTINS_LOADED = False


def _load_builtin_backends() -> None:
    """Import the modules that register the built-in backends (lazily, to keep `import vdiff` light)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in ("dense", "radial", "vmoba", "sliding_tile"):
        importlib.import_module(f"vdiff.attention.{module}")

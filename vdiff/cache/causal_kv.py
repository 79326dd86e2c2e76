"""Causal KV cache (long video): each chunk attends to stored keys/values of earlier chunks instead of recomputing them.

Installed as a hook on every block's self-attention (`attn1`); the state of one generation is a `CausalKVState`
passed to the model per forward (`attention_kwargs["kv_cache"]`), so one installed hook serves concurrent streams.
Per layer the state holds one preallocated buffer of `sink_chunks + window_chunks` chunk slots (K and V, batch =
the 2B rows of conditional + unconditional branches, so the two branches never mix): sinks in the first slots,
kept forever; window chunks in a ring after them, the oldest overwritten first (eviction never touches the sink
bytes). With `window_chunks=None` the buffer grows (doubling) and nothing is evicted.

A forward of the current chunk c computes its q, k, v, and attends to [stored keys of the chunks c sees | its own
keys] (attention is order-free over keys, so the ring needs no reordering). Keys are stored post-RoPE for
rope="absolute" (each at its absolute position) and raw for rope="window" (re-rotated at every forward, at the slot
positions chunk c sees them in). When `state.store` is set, the forward also writes chunk c's K/V into its slot:
the sampler sets it for the commit forward ("clean": the denoised chunk at t = context_noise, Self-Forcing's
convention) or for the chunk's last denoising step ("last_step": cheaper, approximate). Without the hook, the
sampler recomputes the whole history every step (`vdiff.models.causal.causal_attention`): the reference this cache
equals. Under Ulysses (`ctx.sequence_parallel`) the hook gathers the chunk's tokens and scatters the heads first, as
`causal_attention` does, so each rank's buffers hold its head group's K/V for every token of the chunks it keeps.

`external` (FlashBlock's block-external attention): the current chunk's attention is split into the part over the
stored keys ("external") and the part over its own keys, each with its log-sum-exp, merged exactly. "split" does
that at every step (equal to plain attention: tested); "reuse" computes the external part at the chunk's first
denoising step and reuses it (output and log-sum-exp) at its later steps, so those steps attend only within the
chunk: approximate (the queries move between steps), reported with its error against plain causal_kv.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
from diffusers.hooks import ModelHook

from vdiff.attention import dispatch
from vdiff.cache import hooks
from vdiff.models.layers import apply_rope

HOOK_NAME = "vdiff.causal_kv"
COMMITS = ("clean", "last_step")
EXTERNAL = ("off", "split", "reuse")


@dataclass
class CausalKVCacheConfig:
    """Reuse earlier chunks' K/V (exact for commit="clean"; "last_step" stores the last denoising step's K/V)."""

    name: ClassVar[str] = "causal_kv"
    target: ClassVar[str] = "transformer"
    commit: str = "clean"
    external: str = "off"  # block-external attention: off | split (exact) | reuse (approximate)

    def __post_init__(self) -> None:
        if self.commit not in COMMITS:
            raise ValueError(f"CausalKVCacheConfig.commit must be one of {list(COMMITS)}, got {self.commit!r}")
        if self.external not in EXTERNAL:
            raise ValueError(f"CausalKVCacheConfig.external must be one of {list(EXTERNAL)}, got {self.external!r}")


class _LayerBuffer:
    """K/V slots of one layer: `slots[i]` is the chunk index held in slot i (or -1)."""

    def __init__(self, like: torch.Tensor, chunk_tokens: int, sinks: int, window: int | None):
        self.n, self.sinks, self.window = chunk_tokens, sinks, window
        capacity = sinks + (window if window is not None else 4)
        b, _, heads, dim = like.shape
        self.k = like.new_empty(b, capacity * chunk_tokens, heads, dim)
        self.v = torch.empty_like(self.k)
        self.slots = [-1] * capacity

    def slot_for(self, chunk: int) -> int:
        if chunk in self.slots:
            return self.slots.index(chunk)  # recommitting a chunk (prompt switch) overwrites its own slot
        if chunk < self.sinks:
            return chunk
        if self.window is None:
            if -1 not in self.slots:
                self.k = torch.cat([self.k, torch.empty_like(self.k)], dim=1)
                self.v = torch.cat([self.v, torch.empty_like(self.v)], dim=1)
                self.slots += [-1] * len(self.slots)
            return self.slots.index(-1)
        if self.window == 0:
            return -1  # only sinks are kept
        return self.sinks + (chunk - self.sinks) % self.window  # the ring: the oldest window chunk is overwritten

    def write(self, chunk: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.slot_for(chunk)
        if slot < 0:
            return
        self.k[:, slot * self.n:(slot + 1) * self.n] = k
        self.v[:, slot * self.n:(slot + 1) * self.n] = v
        self.slots[slot] = chunk

    def copy(self) -> _LayerBuffer:
        twin = copy.copy(self)
        twin.k, twin.v, twin.slots = self.k.clone(), self.v.clone(), list(self.slots)
        return twin

    def held(self) -> list[tuple[int, int]]:
        """(slot, chunk) of the filled slots."""
        return [(i, c) for i, c in enumerate(self.slots) if c >= 0]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class CausalKVState:
    """The KV buffers of one generation (one stream), layer by layer. `store`: the next forward writes its chunk."""

    store: bool = False
    external: str = "off"  # see CausalKVCacheConfig.external
    layers: dict[int, _LayerBuffer] = field(default_factory=dict)
    reused: dict[int, tuple] = field(default_factory=dict)  # layer -> (chunk, external output, its log-sum-exp)
    attended_tokens: int = 0  # keys attended by the last forward's queries, per layer (for stats)

    @property
    def bytes(self) -> int:
        return sum(buf.bytes for buf in self.layers.values())

    def copy(self) -> CausalKVState:
        """An independent state holding the same K/V (a prompt switch keeps the old prompt's cache this way)."""
        out = CausalKVState(external=self.external)
        out.layers = {layer: buf.copy() for layer, buf in self.layers.items()}
        return out

    def chunks(self, layer: int = 0) -> list[int]:
        """Chunks held for `layer`, ascending."""
        buf = self.layers.get(layer)
        return sorted(c for _, c in buf.held()) if buf is not None else []


class _CausalKVHook(ModelHook):
    def new_forward(self, module: nn.Module, x: torch.Tensor, rope, ctx):
        state: CausalKVState | None = ctx.kv_cache
        layout = ctx.causal
        if state is None or layout is None:
            return self.fn_ref.original_forward(x, rope, ctx)
        if len(layout.entries) != 1:
            raise ValueError(f"causal_kv: a cached forward holds one chunk, got entries {layout.entries}")
        c = layout.entries[0][0]
        q, k, v = module.project(x)  # (B, n, N, Dh) raw
        like = q
        sp = ctx.sequence_parallel
        if sp is not None:  # Ulysses: the chunk's every token on this rank for its share of the heads, so the
            q, k, v = sp.gather(q, k, v)  # buffer holds (B, slots * n, N / world, Dh): this rank's head group
        buf = state.layers.get(ctx.layer)
        if buf is None:
            buf = state.layers[ctx.layer] = _LayerBuffer(k, layout.chunk_tokens, layout.config.sink_chunks,
                                                         layout.config.window_chunks)
        held = sorted((chunk, slot) for slot, chunk in buf.held() if chunk < c and layout.sees(c, chunk))
        chunks = [chunk for chunk, _ in held] + [c]
        cos, sin = layout.tables(c, chunks, q.device)
        n = layout.chunk_tokens
        absolute = layout.config.rope == "absolute"
        k_now = apply_rope(k, cos[-n:], sin[-n:])
        parts_k, parts_v = [], []
        for i, (_, slot) in enumerate(held):
            stored = buf.k[:, slot * n:(slot + 1) * n]
            parts_k.append(stored if absolute else apply_rope(stored, cos[i * n:(i + 1) * n], sin[i * n:(i + 1) * n]))
            parts_v.append(buf.v[:, slot * n:(slot + 1) * n])
        keys = torch.cat([*parts_k, k_now], dim=1)  # (B, (held + 1) * n, N, Dh)
        values = torch.cat([*parts_v, v], dim=1)
        q_now = apply_rope(q, cos[-n:], sin[-n:])
        if state.external != "off" and parts_k:
            if ctx.config.backend != "dense":
                raise ValueError(f"causal_kv external={state.external!r} splits dense attention by its log-sum-exp; "
                                 f"attention.backend={ctx.config.backend!r} is sparse: use external='off'")
            o = _split_attention(q_now, keys, values, n, state, ctx.layer, c, ctx.step)
        else:
            sub = dataclasses.replace(ctx, grid=(layout.frames, *layout.hw), causal=None, kv_cache=None,
                                      sequence_parallel=None, key_frames=len(chunks) * layout.frames)
            o = dispatch(q_now, keys, values, sub)
        state.attended_tokens = keys.shape[1]
        if state.store:
            buf.write(c, k_now if absolute else k, v)
        return module.out(sp.scatter(o) if sp is not None else o, like)


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention [B, n, N, Dh] over (k, v) and each query's log-sum-exp [B, N, n] (fp32 or wider)."""
    from vdiff.attention.gather import _attention_lse

    out, lse = _attention_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), lse


def _split_attention(q, keys, values, n, state: CausalKVState, layer: int, chunk: int, step: int | None):
    """The chunk's attention as [stored keys] + [own keys], merged by log-sum-exp; "reuse" keeps the stored-keys
    part from the chunk's first denoising step (step 0) for its later steps (commit forwards compute it afresh)."""
    memo = state.reused.get(layer)
    if state.external == "reuse" and step is not None and step > 0 and memo is not None and memo[0] == chunk:
        o_ext, l_ext = memo[1], memo[2]
    else:
        o_ext, l_ext = _attend_lse(q, keys[:, :-n], values[:, :-n])
        if step == 0:
            state.reused[layer] = (chunk, o_ext, l_ext)
    o_own, l_own = _attend_lse(q, keys[:, -n:], values[:, -n:])
    lse = torch.logaddexp(l_ext, l_own)  # [B, N, n]
    w_ext, w_own = ((part - lse).exp().transpose(1, 2)[..., None] for part in (l_ext, l_own))  # [B, n, N, 1]
    return (o_ext.float() * w_ext + o_own.float() * w_own).to(q.dtype)


def apply_causal_kv_cache(model: nn.Module, config: CausalKVCacheConfig | None = None) -> None:
    """Install the causal KV hook on every block's self-attention of a causal VideoDiT."""
    if getattr(model, "causal_config", None) is None:
        raise ValueError("causal_kv cache needs a causal model (model.causal set); this model is bidirectional")
    for block in model.blocks:
        hooks.register(block.attn1, _CausalKVHook(), HOOK_NAME)


def remove_causal_kv_cache(model: nn.Module) -> bool:
    return hooks.remove(model, HOOK_NAME)

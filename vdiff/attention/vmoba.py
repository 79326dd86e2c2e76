"""VMoBA: mixture-of-block attention for video (Wu et al., arXiv 2506.23858), implemented from the algorithm.

Every query picks a few key *chunks* by a cheap gate and attends only to the tokens of those chunks.

Partition (layer-wise recurrent, `layer % 3`), over the frame-major token grid (T, H, W):
    0 -> 1D: whole frames, `chunk_t` frames per chunk            chunk = t // ct
    1 -> 2D: a spatial patch across all frames, `chunk_hw` (h, w)  chunk = (h // ch, w // cw)
    2 -> 3D: a space-time cube, `chunk_thw` (t, h, w)            chunk = (t // ct, h // ch, w // cw)
Chunks at the grid's edges are partial (any grid works; nothing is padded into the attention).

Gate and selection (per batch element, head and query token; never differentiated, gradients flow through the
attention over the selected keys):
    gate[q, c]  = q . mean(K of chunk c)                              (raw dot product)
    share[q, c] = softmax_c(gate[q, c] / sqrt(D))                     (normalised gate; sums to 1 per query)
    priority: the query's own chunk first (always attended), then chunks by descending gate.
    select="topk":       the first `topk` chunks in priority order (the own chunk counts, as in MoBA / VMoBA);
                         topk >= number of chunks -> dense.
    select="threshold":  take chunks in priority order while the share taken *before* a chunk is < `threshold`
                         (so the cumulative share reaches `threshold`); threshold >= 1 -> every chunk.
    global_select=True:  the paper's global block selection. For each (batch element, head) the L x C
                         (query, chunk) pairs are pooled and ranked together (own-chunk pairs first, then by gate),
                         with a budget for the whole head instead of per query: topk -> the best `topk * L` pairs;
                         threshold -> pairs while the pooled share taken so far is < `threshold * L` (every query's
                         shares sum to 1, so the head's total is L). Salient queries get many chunks, others only
                         their own; the head's average cost matches the per-query variant.
Selection is exact **per query** (not per query block): the reference mask, the fast path and
`sparse_pattern("vmoba", ...).mask()` all compute the same set of (query, key) pairs.

Implementations (`attention.impl`); all three compute exactly the same (query, key) pairs:
    reference  explicit BoolTensor [B, H, L, L] (mask[q, k] = selected[q, chunk(k)]) + SDPA; any device; O(L^2).
    gather     pure-PyTorch varlen gather (the MoBA scheme): the selected (query, chunk) pairs are grouped by
               (batch, head, chunk) and cut into tiles of up to 16..256 queries (about the mean group size); each
               tile attends its chunk's keys (gathered by index, padded to the largest chunk and masked) with one
               batched matmul, and the
               per-chunk partial results are merged per query through their log-sum-exp. Any device, forward and
               backward (autograd through gather / matmul / index_add), no compile. Cost: the computed pairs plus
               padding (< one tile per group, partial chunks padded to the full chunk size), and each query is
               copied once per selected chunk, so it pays off only at low density.
    fast       compiled FlexAttention (`flex.compiled_flex_attention`, one callable per process). Keys/values are
               permuted into this layer's chunk-major order (each chunk contiguous; edge chunks partial, nothing
               padded into the attention), queries into `query_order` (sorted by their selected chunk set, so a query
               block needs few chunks). A BlockMask is built directly (`BlockMask.from_kv_blocks`, no L x L mask_mod
               sweep) from a vectorised reduction of the selection: a (query block, key block) is visited if some query
               of the block selected a chunk overlapping the key block, and *full* (no mask_mod) if every query
               selected every such chunk; partial blocks evaluate mask_mod(b, h, q, kv) = sel[b, h, q, chunk(kv)],
               so the computed set is exact per query. Blocks: 128 tokens on GPU, 64 on CPU. The selection is padded
               to the largest chunk count over the three partitions, so one compiled graph serves every layer.
               Per call (the partition changes every layer, so the permutation lives inside the call, not in a global
               `token_order`): 4 x B*L*H*D copies (q, k, v in; output back), stable sorts of [B, H, L], and a
               [B, H, L, C_max] bool selection. GPU: forward and backward. CPU: forward only (compiled Flex has no
               CPU backward) and, measured, not faster than gather or dense SDPA (see policy.AUTO_FAST_ON_CPU).
    auto       GPU: fast (forward and backward). CPU: gather (training and inference). The choice is
               `vdiff.attention.policy.choose_impl`, shared with radial and sliding tile.
`sparse_pattern("vmoba", ...).info` also reports the flex path's block density for q's device (`block_density`:
fraction of kernel blocks visited; `block_pair_density`: token pairs inside visited blocks).
The density a call computed (mean over batch and heads of the selected pair fraction) and the path it ran are
returned with its output (`attend`) and land in the call's AttentionStats; the backend object keeps no per-call state.
`sparse_pattern("vmoba", grid, q=..., k=..., layer=..., **options)` gives the same set for given q/k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from vdiff.attention.blocksparse import method_options
from vdiff.attention.patterns import SparsePattern, register_pattern
from vdiff.attention.policy import auto_note, choose_impl, needs_grad
from vdiff.attention.registry import (
    AttentionBackend,
    AttentionContext,
    CallInfo,
    MaskCache,
    register_backend,
)
from vdiff.config import VMoBAConfig

PARTITIONS = ("1d", "2d", "3d")
_MIN_QUERY_TILE, _MAX_QUERY_TILE = 16, 256  # queries per tile in the fast path (chosen per call, a power of 2)
_TILE_BATCH_ELEMENTS = 1 << 25  # score elements per batched matmul (bounds the forward's peak memory)

# Why VMoBA refuses block-causal calls (a causal model's chunk-by-chunk attention).
VMOBA_CAUSAL = ("attention.backend='vmoba' does not run a causal model (model.causal): its 1D/2D/3D block partitions "
                "and its top-k / threshold selection are defined over one square grid whose queries are its keys, "
                "while a block-causal call has one chunk's queries over the keys of several chunks (from a KV cache "
                "when sampling); a causal model runs attention.backend=dense, radial or sliding_tile")


# --------------------------------------------------------------------------------------------------------------------
# Options and partition geometry
# --------------------------------------------------------------------------------------------------------------------


def partition_for_layer(layer: int) -> str:
    """The layer-wise recurrent partition: layer 0, 3, ... -> 1d; 1, 4, ... -> 2d; 2, 5, ... -> 3d."""
    return PARTITIONS[layer % 3]


def chunk_shape(cfg: VMoBAConfig, partition: str, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Chunk extent (ct, ch, cw) in tokens for `partition` on `grid` (a 1D chunk spans whole frames, etc.)."""
    T, H, W = grid
    if partition == "1d":
        return (cfg.chunk_t, H, W)
    if partition == "2d":
        return (T, cfg.chunk_hw[0], cfg.chunk_hw[1])
    if partition == "3d":
        return tuple(cfg.chunk_thw)  # type: ignore[return-value]
    raise ValueError(f"vmoba partition must be one of {PARTITIONS}, got {partition!r}")


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How frame-major tokens fall into chunks for one (grid, partition, chunk size)."""

    chunk_of: torch.Tensor  # LongTensor [L]: chunk index of each frame-major token
    tokens: torch.Tensor  # LongTensor [C, S]: frame-major token indices of each chunk, padded with 0
    valid: torch.Tensor  # BoolTensor [C, S]: False on padding
    sizes: torch.Tensor  # LongTensor [C]: tokens per chunk

    @property
    def num_chunks(self) -> int:
        return self.tokens.shape[0]


def chunk_layout(grid: tuple[int, int, int], chunk: tuple[int, int, int], device: torch.device | str) -> ChunkLayout:
    """Chunks of extent `chunk` over the frame-major grid; edge chunks are partial."""
    T, H, W = grid
    ct, ch, cw = (min(c, g) for c, g in zip(chunk, grid))
    nh, nw = -(-H // ch), -(-W // cw)
    t = torch.arange(T).view(T, 1, 1)
    h = torch.arange(H).view(1, H, 1)
    w = torch.arange(W).view(1, 1, W)
    chunk_of = ((t // ct) * nh + h // ch) * nw + w // cw  # [T, H, W]
    chunk_of = chunk_of.reshape(-1)  # [L]
    order = torch.argsort(chunk_of, stable=True)  # chunk-major, frame-major inside a chunk
    sizes = torch.bincount(chunk_of)  # [C]
    C, S = sizes.numel(), int(sizes.max())
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(S).view(1, S)
    valid = slot < sizes.view(C, 1)  # [C, S]
    pos = (starts.view(C, 1) + slot).clamp(max=chunk_of.numel() - 1)
    tokens = torch.where(valid, order[pos], torch.zeros_like(pos))  # [C, S]
    device = torch.device(device)
    return ChunkLayout(chunk_of.to(device), tokens.to(device), valid.to(device), sizes.to(device))


def _layout_for(grid, cfg: VMoBAConfig, layer: int, device, cache: MaskCache | None) -> ChunkLayout:
    partition = partition_for_layer(layer)
    chunk = chunk_shape(cfg, partition, grid)
    key = ("vmoba-layout", tuple(grid), tuple(chunk), str(torch.device(device)))
    build = lambda: chunk_layout(grid, chunk, device)  # noqa: E731
    return cache.get_or_build(key, build) if cache is not None else build()


# --------------------------------------------------------------------------------------------------------------------
# Gate and selection
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def select_chunks(q: torch.Tensor, k: torch.Tensor, layout: ChunkLayout, cfg: VMoBAConfig) -> torch.Tensor:
    """BoolTensor [B, H, L, C]: which chunks each query attends (own chunk always). q, k: [B, L, H, D]."""
    B, L, Hh, D = q.shape
    C = layout.num_chunks
    q_BHLD = q.detach().float().transpose(1, 2)
    k_BHLD = k.detach().float().transpose(1, 2)
    ksum_BHCD = torch.zeros(B, Hh, C, D, device=q.device).index_add_(2, layout.chunk_of, k_BHLD)
    kmean_BHCD = ksum_BHCD / layout.sizes.view(1, 1, C, 1).float()
    gate_BHLC = q_BHLD @ kmean_BHCD.transpose(-1, -2)  # [B, H, L, C]
    own_LC = F.one_hot(layout.chunk_of, C).bool()  # [L, C]
    own_BHLC = own_LC.expand_as(gate_BHLC)
    priority = gate_BHLC.masked_fill(own_BHLC, float("inf"))  # own chunk first, then by gate

    if cfg.select == "topk":
        if cfg.global_select:
            budget = min(cfg.topk * L, L * C)
            idx = priority.reshape(B, Hh, L * C).topk(budget, dim=-1).indices
            sel = torch.zeros(B, Hh, L * C, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
            return sel.view(B, Hh, L, C)
        idx = priority.topk(min(cfg.topk, C), dim=-1).indices
        return torch.zeros_like(own_BHLC).scatter_(-1, idx, True)

    # threshold
    if cfg.threshold >= 1.0:
        return torch.ones_like(own_BHLC)
    share_BHLC = torch.softmax(gate_BHLC / math.sqrt(D), dim=-1)
    if cfg.global_select:
        prio, share, target = priority.reshape(B, Hh, L * C), share_BHLC.reshape(B, Hh, L * C), cfg.threshold * L
    else:
        prio, share, target = priority, share_BHLC, cfg.threshold
    order = prio.argsort(dim=-1, descending=True, stable=True)
    share_sorted = share.gather(-1, order).double()
    taken_before = share_sorted.cumsum(-1) - share_sorted  # share accumulated before each candidate
    keep_sorted = taken_before < target
    sel = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return sel.view(B, Hh, L, C) | own_BHLC


def selection_density(sel_BHLC: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Fraction of (query, key) pairs selected, per (batch, head): [B, H]."""
    L = layout.chunk_of.numel()
    keys_per_query = (sel_BHLC.float() * layout.sizes.float()).sum(-1)  # [B, H, L]
    return keys_per_query.sum(-1) / (L * L)


def token_mask(sel_BHLC: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """BoolTensor [B, H, L, L]: mask[b, h, q, key] = sel[b, h, q, chunk(key)]."""
    return sel_BHLC[..., layout.chunk_of]


# --------------------------------------------------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------------------------------------------------


def vmoba_reference(q, k, v, sel_BHLC: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Explicit [B, H, L, L] mask + SDPA. q, k, v: [B, L, H, D] -> [B, L, H, D]."""
    mask_BHLL = token_mask(sel_BHLC, layout)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_BHLL)
    return out.transpose(1, 2)


def vmoba_gather(q, k, v, sel_BHLC: torch.Tensor, layout: ChunkLayout, query_tile: int | None = None) -> torch.Tensor:
    """Varlen gather attention over exactly the selected (query, chunk) pairs. q, k, v: [B, L, H, D] -> [B, L, H, D]."""
    B, L, Hh, D = q.shape
    C, S = layout.tokens.shape
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D)

    # Selected pairs sorted by group g = (b, h, c), queries ascending inside a group.
    bh, c, qi = sel_BHLC.reshape(B * Hh, L, C).transpose(1, 2).nonzero(as_tuple=True)  # each [P]
    group = bh * C + c
    counts = torch.bincount(group, minlength=B * Hh * C)  # [G]
    if query_tile is None:  # ~ the mean group size (little padding), at most _MAX_QUERY_TILE (bounded K/V copies)
        mean = max(1, group.numel() // max(1, int((counts > 0).sum())))
        query_tile = min(_MAX_QUERY_TILE, max(_MIN_QUERY_TILE, 1 << (mean.bit_length() - 1)))
    rank = torch.arange(group.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
    tiles_per_group = (counts + query_tile - 1) // query_tile
    tile_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    tile = tile_start[group] + rank // query_tile  # [P]
    slot = rank % query_tile  # [P]
    tile_group = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), tiles_per_group)  # [NT]
    tile_bh, tile_c = tile_group // C, tile_group % C
    NT = tile_group.numel()

    qidx = torch.zeros(NT, query_tile, dtype=torch.long, device=dev)
    qidx[tile, slot] = qi  # [NT, Tq] (unused slots point at token 0 and are never read back)

    # flat rows (b*H + h)*L + token; index_select on rows is much faster than advanced indexing on CPU
    q_rows = q.transpose(1, 2).reshape(B * Hh * L, D)
    k_rows = k.transpose(1, 2).reshape(B * Hh * L, D)
    v_rows = v.transpose(1, 2).reshape(B * Hh * L, D)

    key_bias = torch.zeros(C, S, dtype=q.dtype, device=dev).masked_fill(~layout.valid, float("-inf"))  # [C, S]
    lse_parts, out_parts = [], []
    per_tile = max(1, _TILE_BATCH_ELEMENTS // (query_tile * S))
    for lo in range(0, NT, per_tile):
        sl = slice(lo, min(NT, lo + per_tile))
        tbh, tc = tile_bh[sl], tile_c[sl]
        n = tbh.numel()
        q_tile = q_rows.index_select(0, (tbh[:, None] * L + qidx[sl]).view(-1)).view(n, query_tile, D)
        kv_index = (tbh[:, None] * L + layout.tokens[tc]).view(-1)  # [n * S]
        k_tile = k_rows.index_select(0, kv_index).view(n, S, D)
        v_tile = v_rows.index_select(0, kv_index).view(n, S, D)
        bias = key_bias.index_select(0, tc)[:, None, :]  # [n, 1, S]: 0 on keys, -inf on padding
        scores = torch.baddbmm(bias, q_tile, k_tile.transpose(1, 2), alpha=scale).to(acc)  # [n, Tq, S]
        probs = torch.softmax(scores, dim=-1)
        # log-sum-exp from the softmax: p_max = exp(s_max - lse) >= 1/S never underflows; d lse / d s = probs
        lse = scores.amax(-1) - torch.log(probs.amax(-1))  # [n, Tq]
        out_parts.append(probs.to(v.dtype) @ v_tile)  # [n, Tq, D]
        lse_parts.append(lse)
    lse_t = torch.cat(lse_parts) if len(lse_parts) > 1 else lse_parts[0]  # [NT, Tq]
    out_t = torch.cat(out_parts) if len(out_parts) > 1 else out_parts[0]  # [NT, Tq, D]

    # Merge the per-chunk partial softmaxes of each query through their log-sum-exp.
    pair = tile * query_tile + slot  # [P]
    lse_p = lse_t.reshape(-1).index_select(0, pair)  # [P]
    out_p = out_t.reshape(-1, D).index_select(0, pair).to(acc)  # [P, D]
    row = bh * L + qi  # [P]
    m = torch.full((B * Hh * L,), float("-inf"), dtype=acc, device=dev)
    m = m.scatter_reduce(0, row, lse_p.detach(), "amax")  # stabiliser only: no gradient needed
    w = torch.exp(lse_p - m[row])  # [P]
    total = torch.zeros(B * Hh * L, dtype=acc, device=dev).index_add(0, row, w)
    out = torch.zeros(B * Hh * L, D, dtype=acc, device=dev).index_add(0, row, (w / total[row])[:, None] * out_p)
    return out.view(B, Hh, L, D).transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Backend and pattern
# --------------------------------------------------------------------------------------------------------------------


class VMoBABackend(AttentionBackend):
    name = "vmoba"
    description = (
        "VMoBA block-mixture attention (dynamic per-query chunk selection). impl=auto: fast (compiled FlexAttention, "
        "chunk-major keys, block mask from the selection) on GPU, forward+backward; gather (pure PyTorch varlen, "
        "autograd) on CPU, training and inference. impl=fast: GPU, or CPU forward without grad (compiled Flex "
        "has no CPU backward: raises); impl=gather / reference force those paths (any device, with backward)."
    )
    sparse = True

    def unavailable_reason(self, device=None):
        return None  # gather and reference are plain PyTorch and run everywhere; fast is chosen per call

    def backward_reason(self, device=None):
        return None  # impl=auto trains everywhere: fast on GPU, gather on CPU (compiled Flex has no CPU backward)

    def implementation_note(self, device: torch.device) -> str:
        return auto_note(device)

    def implementation(self, impl: str, device: torch.device | str = "cpu", needs_grad: bool = False) -> str:
        """The path a call runs: 'fast', 'gather' or 'reference' (vdiff.attention.policy)."""
        return choose_impl("vmoba", impl, device, needs_grad)

    def density(self, ctx: AttentionContext) -> float:
        """NaN: the density depends on q and k; each call reports its own (`attend`, AttentionStats)."""
        return float("nan")

    def attend(self, q, k, v, ctx):
        if ctx.key_frames is not None:
            raise ValueError(VMOBA_CAUSAL)
        cfg = ctx.config.vmoba
        T, H, W = ctx.grid
        if q.shape[1] != T * H * W:
            raise ValueError(f"vmoba: q has {q.shape[1]} tokens but grid {ctx.grid} has {T * H * W}")
        impl = self.implementation(ctx.config.impl, q.device, needs_grad(q, k, v))
        layout = _layout_for(ctx.grid, cfg, ctx.layer, q.device, ctx.mask_cache)
        sel = select_chunks(q, k, layout, cfg)
        if impl == "fast":
            from vdiff.attention.vmoba_flex import _flex_layout_for, vmoba_flex

            out = vmoba_flex(q, k, v, sel, _flex_layout_for(ctx.grid, cfg, ctx.layer, q.device, ctx.mask_cache))
        elif impl == "gather":
            out = vmoba_gather(q, k, v, sel, layout)
        else:
            out = vmoba_reference(q, k, v, sel, layout)
        return out, CallInfo(float(selection_density(sel, layout).mean()), impl)

    def forward(self, q, k, v, ctx):
        return self.attend(q, k, v, ctx)[0]


def vmoba_options(config: VMoBAConfig | None = None, **options: Any) -> VMoBAConfig:
    """A VMoBAConfig from a config and/or keyword options (its field names); checked by VMoBAConfig."""
    return method_options(VMoBAConfig, "vmoba", config, **options)


def vmoba_pattern(grid, *, q: torch.Tensor | None = None, k: torch.Tensor | None = None, layer: int = 0,
                  **options: Any) -> SparsePattern:
    """What VMoBA computes for these q, k ([B, L, H, D]) at `layer`. Describes batch element 0: `.mask()` is
    [H, L, L] and `.density` the mean over its heads (`info['density_batch']` averages the whole batch)."""
    if q is None or k is None:
        raise ValueError("sparse_pattern('vmoba') is dynamic: pass q and k ([B, L, H, D])")
    cfg = vmoba_options(**options)
    grid = tuple(int(g) for g in grid)
    if q.shape[1] != math.prod(grid) or k.shape != q.shape:
        raise ValueError(f"sparse_pattern('vmoba'): q {tuple(q.shape)} / k {tuple(k.shape)} do not match grid {grid}")
    layout = _layout_for(grid, cfg, layer, q.device, None)
    sel = select_chunks(q, k, layout, cfg)
    dens = selection_density(sel, layout)  # [B, H]
    info = {
        "partition": partition_for_layer(layer),
        "chunk": chunk_shape(cfg, partition_for_layer(layer), grid),
        "num_chunks": layout.num_chunks,
        "chunks_per_query": float(sel[0].float().sum(-1).mean()),
        "density_per_head": dens[0].tolist(),
        "density_batch": float(dens.mean()),
    }
    from vdiff.attention.vmoba_flex import (
        block_stats,
        flex_block_grid,
        flex_block_size,
        flex_layout,
        flex_selection,
        max_chunks,
        query_order,
    )

    flex = flex_layout(layout, flex_block_size(q.device), max_chunks(grid, cfg))
    visited, _ = flex_block_grid(flex_selection(sel[:1], flex, query_order(sel[:1])), flex, layout.chunk_of.numel())
    blocks = block_stats(visited, flex, layout.chunk_of.numel())
    info.update({
        "flex_block_size": flex.block_size,  # 128 on GPU, 64 on CPU (the device of q)
        "block_density": float(blocks["block_density"][0].mean()),  # kernel blocks the flex path visits
        "block_pair_density": float(blocks["block_pair_density"][0].mean()),  # token pairs inside visited blocks
    })
    return SparsePattern("vmoba", grid, float(dens[0].mean()), lambda: token_mask(sel[0], layout), info)


register_backend(VMoBABackend())
register_pattern("vmoba", vmoba_pattern)

__all__ = [
    "ChunkLayout", "VMoBABackend", "chunk_layout", "chunk_shape", "partition_for_layer", "select_chunks",
    "selection_density", "token_mask", "vmoba_gather", "vmoba_options", "vmoba_pattern", "vmoba_reference",
]

"""VMoBA's FlexAttention path (impl=fast): chunk-major keys, selection-sorted queries, a BlockMask built directly
from the per-query chunk selection, and an exact per-query mask_mod on partial blocks (see vdiff.attention.vmoba's
docstring for the whole scheme and when it runs)."""

from __future__ import annotations

import dataclasses
import math

import torch

from vdiff.attention.flex import compiled_flex_attention, flex_backward_reason
from vdiff.attention.registry import BackendUnavailable, MaskCache
from vdiff.attention.vmoba import PARTITIONS, ChunkLayout, _layout_for, chunk_shape, partition_for_layer
from vdiff.config import VMoBAConfig

# --------------------------------------------------------------------------------------------------------------------
# FlexAttention path: chunk-major tokens, a BlockMask from the selection, an exact per-query mask_mod
# --------------------------------------------------------------------------------------------------------------------


def flex_block_size(device: torch.device | str) -> int:
    """Kernel block (query and key tokens) of the Flex path: 128 on GPU (Triton tiles), 64 on CPU."""
    return 128 if torch.device(device).type == "cuda" else 64


def max_chunks(grid: tuple[int, int, int], cfg: VMoBAConfig) -> int:
    """Largest chunk count over the three partitions: the Flex path pads its selection to it, so every layer (any
    partition) hands the compiled kernel tensors of the same shape and one compiled graph serves them all."""
    return max(math.prod(-(-g // min(c, g)) for g, c in zip(grid, chunk_shape(cfg, p, grid))) for p in PARTITIONS)


@dataclasses.dataclass(frozen=True)
class FlexLayout:
    """Chunk-major token order and kernel-block geometry for one (grid, partition, block size, padded chunk count)."""

    order: torch.Tensor  # LongTensor [L]: chunk-major position -> frame-major token (chunks contiguous)
    inverse: torch.Tensor  # LongTensor [L]: frame-major token -> chunk-major position
    kv_chunk: torch.Tensor  # LongTensor [N * bs]: chunk of each chunk-major key, padding -> chunk 0
    block_lo: torch.Tensor  # LongTensor [N]: first chunk overlapping each key block
    block_hi: torch.Tensor  # LongTensor [N]: last chunk overlapping each key block (chunks are contiguous)
    block_size: int
    num_chunks_pad: int

    @property
    def num_blocks(self) -> int:
        return self.block_lo.numel()


def flex_layout(layout: ChunkLayout, block_size: int, num_chunks_pad: int) -> FlexLayout:
    """The chunk-major order of `layout` cut into kernel blocks of `block_size` tokens (the last one may be partial)."""
    L, dev = layout.chunk_of.numel(), layout.chunk_of.device
    order = layout.tokens[layout.valid]  # [L]: chunk by chunk, frame-major inside a chunk
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(L, device=dev))
    chunk_sorted = layout.chunk_of[order]  # [L], non-decreasing
    n = -(-L // block_size)
    kv_chunk = torch.zeros(n * block_size, dtype=torch.long, device=dev)
    kv_chunk[:L] = chunk_sorted
    starts = torch.arange(n, device=dev) * block_size
    lo, hi = chunk_sorted[starts], chunk_sorted[(starts + block_size - 1).clamp(max=L - 1)]
    return FlexLayout(order, inverse, kv_chunk, lo, hi, block_size, max(num_chunks_pad, layout.num_chunks))


def _flex_layout_for(grid, cfg: VMoBAConfig, layer: int, device, cache: MaskCache | None) -> FlexLayout:
    block_size = flex_block_size(device)
    key = ("vmoba-flex-layout", tuple(grid), tuple(chunk_shape(cfg, partition_for_layer(layer), grid)),
           max_chunks(grid, cfg), block_size, str(torch.device(device)))
    build = lambda: flex_layout(_layout_for(grid, cfg, layer, device, cache), block_size, max_chunks(grid, cfg))  # noqa: E731
    return cache.get_or_build(key, build) if cache is not None else build()


@torch.no_grad()
def query_order(sel_BHLC: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, H, L]: queries sorted by their selected chunk set (lexicographic on the bits, chunk 0 first).

    Flex's query order is free (only keys must be chunk-contiguous), so queries that chose the same chunks are put
    next to each other: a query block then needs few key chunks and is often full. On random inputs this halves the
    visited blocks against chunk-major queries (e.g. 1D partition, topk 3 of 8: 1.0 -> 0.44, ideal 0.375)."""
    B, Hh, L, C = sel_BHLC.shape
    order = torch.arange(L, device=sel_BHLC.device).expand(B, Hh, L)
    for lo in reversed(range(0, C, 60)):  # LSD radix: least significant 60-chunk word first, stable sorts
        bits = sel_BHLC[..., lo:lo + 60].long()
        word = (bits << torch.arange(bits.shape[-1] - 1, -1, -1, device=bits.device)).sum(-1)  # [B, H, L]
        order = order.gather(-1, torch.argsort(word.gather(-1, order), dim=-1, stable=True))
    return order


@torch.no_grad()
def flex_selection(sel_BHLC: torch.Tensor, flex: FlexLayout, q_order: torch.Tensor) -> torch.Tensor:
    """The selection with queries in `q_order` ([B, H, L]), padded: BoolTensor [B, H, N * bs, C_pad] (padding False)."""
    B, Hh, L, C = sel_BHLC.shape
    sel_p = sel_BHLC.new_zeros(B, Hh, flex.num_blocks * flex.block_size, flex.num_chunks_pad)
    sel_p[:, :, :L, :C] = sel_BHLC.gather(2, q_order[..., None].expand(B, Hh, L, C))
    return sel_p


@torch.no_grad()
def flex_block_grid(sel_p: torch.Tensor, flex: FlexLayout, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visited, full) BoolTensors [B, H, N, N] over (query block, key block) of the chunk-major order.

    visited: some query of the block selected some chunk overlapping the key block (the kernel visits the block);
    full:    every query of the block selected every chunk overlapping it (the kernel skips the mask_mod there).
    A vectorised reduction (two cumulative sums over chunks), never an L x L mask.
    """
    B, Hh, _, Cp = sel_p.shape
    bs, n = flex.block_size, flex.num_blocks
    any_q = sel_p.view(B, Hh, n, bs, Cp).any(3)  # [B, H, N, Cp]; padding rows are False
    last = sel_p[:, :, (n - 1) * bs:length].all(2, keepdim=True)  # the last block's real rows only
    all_q = torch.cat([sel_p[:, :, :(n - 1) * bs].view(B, Hh, n - 1, bs, Cp).all(3), last], dim=2)  # [B, H, N, Cp]
    zero = sel_p.new_zeros(B, Hh, n, 1, dtype=torch.int32)
    any_cum = torch.cat([zero, any_q.cumsum(-1, dtype=torch.int32)], dim=-1)  # [B, H, N, Cp + 1]
    all_cum = torch.cat([zero, all_q.cumsum(-1, dtype=torch.int32)], dim=-1)
    lo, hi1 = flex.block_lo, flex.block_hi + 1  # key block j overlaps chunks lo[j] .. hi[j]
    visited = (any_cum.index_select(-1, hi1) - any_cum.index_select(-1, lo)) > 0  # [B, H, N, N]
    full = (all_cum.index_select(-1, hi1) - all_cum.index_select(-1, lo)) == (hi1 - lo).to(torch.int32)
    return visited, full


def _kv_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, Nq, Nk] bool -> (counts [B, H, Nq] int32, indices [B, H, Nq, Nk] int32, selected blocks first)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


@torch.no_grad()
def vmoba_block_mask(sel_BHLC: torch.Tensor, flex: FlexLayout, q_order: torch.Tensor, *, backward: bool = True):
    """FlexAttention BlockMask computing exactly the selected (query, key) pairs, queries in `q_order` ([B, H, L]),
    keys chunk-major (`flex.order`).

    Full blocks run unmasked; the other visited blocks evaluate mask_mod(b, h, q, kv) = sel[b, h, q, chunk(kv)] (the
    padded, reordered selection, captured by the closure). `backward=False` skips the transposed (query-block)
    lists that only the backward pass reads."""
    from torch.nn.attention.flex_attention import BlockMask

    length = flex.order.numel()
    sel_p = flex_selection(sel_BHLC, flex, q_order)  # [B, H, Lp, Cp]
    visited, full = flex_block_grid(sel_p, flex, length)
    counts, indices = _kv_lists(visited & ~full)
    full_counts, full_indices = _kv_lists(full)
    kv_chunk = flex.kv_chunk

    def mask_mod(b, h, q_idx, kv_idx):
        return sel_p[b, h, q_idx, kv_chunk[kv_idx]]

    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=flex.block_size,
                                    mask_mod=mask_mod, seq_lengths=(length, length), compute_q_blocks=backward)


def block_stats(visited: torch.Tensor, flex: FlexLayout, length: int) -> dict[str, torch.Tensor]:
    """Per (batch, head) [B, H]: fraction of kernel blocks visited, and of token pairs inside visited blocks."""
    sizes = torch.full((flex.num_blocks,), float(flex.block_size), dtype=torch.float64, device=visited.device)
    sizes[-1] = length - (flex.num_blocks - 1) * flex.block_size
    pairs = torch.einsum("bhij,i,j->bh", visited.double(), sizes, sizes) / length**2
    return {"block_density": visited.double().mean((-1, -2)), "block_pair_density": pairs}


def vmoba_flex(q, k, v, sel_BHLC: torch.Tensor, flex: FlexLayout) -> torch.Tensor:
    """Compiled FlexAttention over the chunk-major order. q, k, v: [B, L, H, D] frame-major -> [B, L, H, D].

    Keys and values are gathered into this layer's chunk-major order, queries into `query_order` (sorted by their
    selected chunk set, per batch element and head), all as contiguous [B, H, L, D] (the CPU kernel is ~1.4x slower
    on strided inputs); the output is gathered back. Per call that is 4 x B*L*H*D copies, a few stable sorts of
    [B, H, L] and the [B, H, L, C_pad] bool selection with its block reduction; the kernel then visits only the
    blocks some query of the block selected."""
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reason = flex_backward_reason(q.device) if backward else None
    if reason is not None:
        raise BackendUnavailable(f"vmoba flex: {reason}")
    if not torch.is_grad_enabled():  # inference on leaves that require grad: the CPU kernel refuses those
        q, k, v = q.detach(), k.detach(), v.detach()
    B, L, Hh, D = q.shape
    q_order = query_order(sel_BHLC)  # [B, H, L]
    block_mask = vmoba_block_mask(sel_BHLC, flex, q_order, backward=backward)
    q_p = q.transpose(1, 2).gather(2, q_order[..., None].expand(B, Hh, L, D))  # [B, H, L, D] selection-sorted
    k_p, v_p = (t.transpose(1, 2).index_select(2, flex.order) for t in (k, v))  # [B, H, L, D] chunk-major
    out_p = compiled_flex_attention()(q_p, k_p, v_p, block_mask=block_mask)  # [B, H, L, D] in q_order
    q_back = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(L, device=q.device).expand(B, Hh, L))
    return out_p.gather(2, q_back[..., None].expand(B, Hh, L, D)).transpose(1, 2)  # [B, L, H, D] frame-major

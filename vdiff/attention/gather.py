"""The gather kernel: block-sparse attention as batched dense SDPA over gathered key/value blocks (impl=gather).

Query blocks with the same set of kept key blocks form a group; each group's queries and the tokens of its key blocks
are gathered (index_select) and groups with equal (query, key) counts run as one batched SDPA call without a mask (the
CPU flash kernel). Optionally (`share_tokens`) a key set is split in two: the keys a run of consecutive query blocks
has in common, gathered once for the run, and each block's rest; the two partial softmaxes are merged exactly by their
log-sum-exp. Partial blocks (a grid that is not a multiple of the block or tile) only make other counts, hence their
own bucket: nothing is padded and no mask is evaluated, so exactly the block pattern's pairs are computed. It is
differentiable on any device (a custom backward per chunk, see `_GatherAttention`).

Used by radial and sliding tile (static plans, built once per (grid, options, device) and cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GATHER_CHUNK_BYTES = 8 << 20  # gathered K per SDPA call (see gather_attention)


@dataclass(frozen=True)
class GatherBucket:
    """`groups` query groups of `q_len` queries, each attending its own `kv_len` keys: one SDPA call per chunk of
    groups, no mask. q_index [groups * q_len / unit] / kv_index [groups * kv_len / unit]: indices of `unit`-token runs,
    group after group. `part` 0 holds every query once (its whole key set, or the part it shares with its neighbours);
    `part` 1 the rest of some queries' key sets, merged with part 0 by log-sum-exp."""

    groups: int
    q_len: int
    kv_len: int
    q_index: torch.Tensor
    kv_index: torch.Tensor
    part: int = 0


@dataclass(frozen=True)
class GatherPlan:
    """Index tensors of the gather path. Tokens move in runs of `unit` (the gcd of every block start and size), so a
    gather copies unit * H * D contiguous values per index. Every query is in exactly one part-0 group and at most
    one part-1 group; a query's key sets in the two parts are disjoint. `length` counts the keys, `q_length` the
    queries (the same tokens unless the plan was built with other query blocks, e.g. one chunk's queries over the
    keys of several: `q_length` < `length`)."""

    buckets: tuple[GatherBucket, ...]
    length: int
    unit: int
    q_length: int | None = None  # None: the queries are the keys' tokens

    @property
    def num_queries(self) -> int:
        return self.length if self.q_length is None else self.q_length

    @property
    def num_pairs(self) -> int:
        """(query, key) pairs computed: the pattern's pairs exactly (no padding)."""
        return sum(b.groups * b.q_len * b.kv_len for b in self.buckets)

    @property
    def split(self) -> bool:
        """Whether some key sets are split in two parts (the forward then merges partial softmaxes)."""
        return any(b.part for b in self.buckets)


def token_ranges(starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Concatenated token ranges [start, start + size) of blocks, in the given order: LongTensor [sum(sizes)]."""
    offsets = torch.cumsum(sizes, 0) - sizes  # where each block's run begins in the output
    return torch.arange(int(sizes.sum())) + torch.repeat_interleave(starts - offsets, sizes)


def shared_key_sets(kept: torch.Tensor, query_sizes: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Per query block, the key blocks it shares with the consecutive query blocks of its group: BoolTensor [Nq, Nk].

    Groups are runs of consecutive query blocks (at most `max_tokens` queries), grown greedily while sharing lowers
    the number of key blocks gathered in all; each member's shared set is the intersection of the group's rows (never
    empty: it starts as the first member's row)."""
    shared = torch.zeros_like(kept)
    n, r = kept.shape[0], 0
    while r < n:
        common, tokens, e = kept[r].clone(), int(query_sizes[r]), r + 1
        while e < n and tokens + int(query_sizes[e]) <= max_tokens:
            both = common & kept[e]
            members = e - r
            # Joining saves gathering `both` for the newcomer but makes the members gather what `common` loses:
            # worth it while members * |both| >= (members - 1) * |common| (counted in key blocks).
            shared_blocks = int(both.sum())
            if shared_blocks == 0 or members * shared_blocks < (members - 1) * int(common.sum()):
                break
            common, tokens, e = both, tokens + int(query_sizes[e]), e + 1
        shared[r:e] = common
        r = e
    return shared


def gather_plan(starts: torch.Tensor, sizes: torch.Tensor, kept: torch.Tensor, device: torch.device | str,
                query_starts: torch.Tensor | None = None, query_sizes: torch.Tensor | None = None,
                share_tokens: int = 0) -> GatherPlan:
    """Index tensors for `gather_attention`, from a block-level pattern over contiguous token blocks.

    starts, sizes: LongTensor [Nk], the token range [start, start + size) of each key block (blocks cover [0, L) with
    no overlap; sizes may differ, e.g. a partial last block or partial tiles). Query blocks are the same blocks unless
    query_starts / query_sizes [Nq] are given. kept: BoolTensor [Nq, Nk], query block -> key blocks it attends (whole
    blocks); query blocks may cover fewer tokens than the keys (a plan for queries that are a part of the keys'
    sequence, indexed from 0). Query blocks with the same row of `kept` are merged into one group (fewer, larger
    gathers); groups with the same (queries, keys) counts share one bucket, so no bucket needs a mask or padding.

    share_tokens > 0 splits each key set in two (`shared_key_sets`): the part a run of up to `share_tokens`
    consecutive queries has in common runs as one large SDPA per run (part 0), each query block's remaining keys
    as a smaller one (part 1); the forward merges the two partial softmaxes exactly. This suits patterns where
    neighbouring query blocks share most keys but rarely all (radial's bands): fewer, larger gathers and calls.
    """
    query_starts = starts if query_starts is None else query_starts
    query_sizes = sizes if query_sizes is None else query_sizes
    if kept.shape != (query_starts.numel(), starts.numel()):
        raise ValueError(f"gather_plan: kept is {tuple(kept.shape)}, expected ({query_starts.numel()}, "
                         f"{starts.numel()})")
    length, q_length = int(sizes.sum()), int(query_sizes.sum())
    empty = ~kept.any(1)
    if empty.any():
        raise ValueError(f"gather_plan: query block(s) {empty.nonzero().flatten().tolist()[:8]} attend no key block")
    unit = math.gcd(*torch.cat([starts, sizes, query_starts, query_sizes]).tolist())
    shared = shared_key_sets(kept, query_sizes, share_tokens) if share_tokens > 0 else kept
    assert shared.any(1).all(), "gather_plan: every query block needs keys in part 0"  # its output buffer is empty()
    groups: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part, part_rows in enumerate((shared, kept & ~shared)):
        has_keys = part_rows.any(1).nonzero().flatten()
        if has_keys.numel() == 0:
            continue
        rows, group_of = torch.unique(part_rows[has_keys], dim=0, return_inverse=True)  # (G, Nk) distinct key sets
        for g in range(rows.shape[0]):
            members = has_keys[group_of == g]
            kb = rows[g].nonzero().flatten()
            q_units = token_ranges(query_starts[members] // unit, query_sizes[members] // unit)
            kv_units = token_ranges(starts[kb] // unit, sizes[kb] // unit)
            groups.setdefault((part, q_units.numel() * unit, kv_units.numel() * unit), []).append((q_units, kv_units))
    buckets = [GatherBucket(len(members), q_len, kv_len, torch.cat([m[0] for m in members]).to(device),
                            torch.cat([m[1] for m in members]).to(device), part)
               for (part, q_len, kv_len), members in sorted(groups.items())]
    return GatherPlan(tuple(buckets), length, unit, None if q_length == length else q_length)


def _chunks(plan: GatherPlan, batch: int, token_bytes: int, chunk_bytes: int, device: torch.device):
    """Yield (q_rows, kv_rows, sdpa_batch, q_len, kv_len, part) per SDPA call: row indices into [B * L / unit, ...]
    views (batch-major), a few groups of one bucket at a time so that the gathered K stays under `chunk_bytes`."""
    u = plan.unit

    def rows(index: torch.Tensor, length: int) -> torch.Tensor:  # [B * len(index)]: batch element b at b * length
        if batch == 1:
            return index
        return (torch.arange(0, batch * length // u, length // u, device=device)[:, None] + index).flatten()

    for b in plan.buckets:
        per = max(1, min(b.groups, chunk_bytes // (token_bytes * b.kv_len)))  # groups per SDPA call
        for q_idx, kv_idx in zip(b.q_index.split(per * b.q_len // u), b.kv_index.split(per * b.kv_len // u)):
            yield (rows(q_idx, plan.num_queries), rows(kv_idx, plan.length), batch * (q_idx.numel() * u // b.q_len),
                   b.q_len, b.kv_len, b.part)


def _as_sdpa(rows: torch.Tensor, sdpa_batch: int, length: int, heads: int) -> torch.Tensor:
    """Gathered rows [sdpa_batch * length / u, u * H * D] -> [sdpa_batch, H, length, D] (a view)."""
    return rows.view(sdpa_batch, length, heads, -1).transpose(1, 2)


def _from_sdpa(out: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[sdpa_batch, H, length, D] -> rows [sdpa_batch * length / u, u * H * D] (`shape`)."""
    return out.transpose(1, 2).reshape(shape)


def _lse_to_rows(lse: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Log-sum-exp [sdpa_batch, H, length] -> rows [sdpa_batch * length / u, u * H]."""
    return lse.transpose(1, 2).reshape(num_rows, -1)


def _lse_from_rows(rows: torch.Tensor, sdpa_batch: int, length: int, heads: int) -> torch.Tensor:
    """Rows [sdpa_batch * length / u, u * H] -> log-sum-exp [sdpa_batch, H, length] (contiguous, as the kernels
    take)."""
    return rows.view(sdpa_batch, length, heads).transpose(1, 2).contiguous()


def _cpu_flash(q: torch.Tensor) -> bool:
    """Use the CPU flash kernel's own forward (which returns the log-sum-exp) and backward ops. Elsewhere the same
    two steps run as plain matmuls (`_attention_lse`, `_attention_lse_backward`)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention [b, H, n, D] that also returns the log-sum-exp of each query's scores [b, H, n] (fp32 or
    wider), so that attention over disjoint key sets can be merged exactly."""
    wide = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return ((s - lse[..., None]).exp() @ v.to(wide)).to(q.dtype), lse


def _attention_lse_backward(grad_out, q, k, v, out, lse):
    """Gradients of the attention of q over (k, v) whose softmax is normalised by `lse` (the query's log-sum-exp over
    ALL its keys) and whose output over all keys is `out`: the exact share of this key set in the full gradient."""
    wide = torch.promote_types(q.dtype, torch.float32)
    go, q_, k_, v_, o_ = (t.to(wide) for t in (grad_out, q, k, v, out))
    scale = q.shape[-1] ** -0.5
    p = ((q_ @ k_.transpose(-1, -2)) * scale - lse[..., None]).exp()  # [b, H, n, m]
    ds = p * (go @ v_.transpose(-1, -2) - (go * o_).sum(-1, keepdim=True))
    return ((ds @ k_) * scale).to(q.dtype), ((ds.transpose(-1, -2) @ q_) * scale).to(q.dtype), \
        (p.transpose(-1, -2) @ go).to(q.dtype)


class _GatherAttention(torch.autograd.Function):
    """Forward: per chunk, gather rows, attention with its log-sum-exp, write the output rows (a plan with two parts
    merges each query's two partial softmaxes by their log-sum-exp). Backward: per chunk, gather again and run the
    attention backward against the final output and log-sum-exp (exact for a part of the key set too), adding the row
    gradients into one dq / dk / dv. CPU: the flash kernel's own forward and backward ops; elsewhere plain matmuls.
    Plain autograd through index_select would allocate a zero gradient the size of K for every chunk and sum them
    (measured: as slow as the reference path); this also keeps no gathered K/V alive between forward and backward
    (memory O(L))."""

    @staticmethod
    def forward(ctx, q, k, v, plan: GatherPlan, chunk_bytes: int):
        B, L, Hh, D = q.shape
        u = plan.unit
        q_, k_, v_ = (t.reshape(-1, u * Hh * D) for t in (q, k, v))  # one index moves a run of u tokens
        flash = _cpu_flash(q)
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        outs = [torch.empty_like(q_)] + ([torch.zeros_like(q_)] if plan.split else [])
        lses = [torch.empty(B * L // u, u * Hh, dtype=lse_dtype, device=q.device)]
        if plan.split:
            lses.append(torch.full_like(lses[0], -math.inf))  # queries without a second part: weight 0
        for q_rows, kv_rows, sb, q_len, kv_len, part in _chunks(plan, B, Hh * D * k.element_size(), chunk_bytes,
                                                                q.device):
            qc = _as_sdpa(q_.index_select(0, q_rows), sb, q_len, Hh)
            kc = _as_sdpa(k_.index_select(0, kv_rows), sb, kv_len, Hh)
            vc = _as_sdpa(v_.index_select(0, kv_rows), sb, kv_len, Hh)
            if flash:
                o, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qc, kc, vc)
            else:
                o, lse_c = _attention_lse(qc, kc, vc)
            outs[part].index_copy_(0, q_rows, _from_sdpa(o, (q_rows.numel(), q_.shape[1])))
            lses[part].index_copy_(0, q_rows, _lse_to_rows(lse_c, q_rows.numel()).to(lse_dtype))
        if plan.split:
            lse = torch.logaddexp(lses[0], lses[1])  # [rows, u * H]
            weights = [(part_lse - lse).exp()[..., None] for part_lse in lses]
            out = sum(o.view(-1, u * Hh, D) * w for o, w in zip(outs, weights)).to(q.dtype)
        else:
            out, lse = outs[0], lses[0]
        out = out.reshape(B, L, Hh, D)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.chunk_bytes = plan, chunk_bytes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, L, Hh, D = q.shape
        u = ctx.plan.unit
        q_, k_, v_, o_, go_ = (t.reshape(-1, u * Hh * D) for t in (q, k, v, out, grad_out))
        dq, dk, dv = (torch.zeros_like(t) for t in (q_, k_, v_))
        flash = _cpu_flash(q)
        for q_rows, kv_rows, sb, q_len, kv_len, _ in _chunks(ctx.plan, B, Hh * D * k.element_size(), ctx.chunk_bytes,
                                                              q.device):
            qc = _as_sdpa(q_.index_select(0, q_rows), sb, q_len, Hh)
            kc = _as_sdpa(k_.index_select(0, kv_rows), sb, kv_len, Hh)
            vc = _as_sdpa(v_.index_select(0, kv_rows), sb, kv_len, Hh)
            goc = _as_sdpa(go_.index_select(0, q_rows), sb, q_len, Hh)
            oc = _as_sdpa(o_.index_select(0, q_rows), sb, q_len, Hh)
            lse_c = _lse_from_rows(lse.index_select(0, q_rows), sb, q_len, Hh)
            if flash:
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    goc, qc, kc, vc, oc, lse_c, 0.0, False)
            else:
                gq, gk, gv = _attention_lse_backward(goc, qc, kc, vc, oc, lse_c)
            dq.index_add_(0, q_rows, _from_sdpa(gq, (q_rows.numel(), dq.shape[1])))
            dk.index_add_(0, kv_rows, _from_sdpa(gk, (kv_rows.numel(), dk.shape[1])))
            dv.index_add_(0, kv_rows, _from_sdpa(gv, (kv_rows.numel(), dv.shape[1])))
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), None, None


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: GatherPlan,
                     chunk_bytes: int = GATHER_CHUNK_BYTES) -> torch.Tensor:
    """Block-sparse attention: per bucket, gather its groups' queries and keys/values and run dense SDPA (no mask, so
    the CPU flash kernel), then write the outputs back in token order. q, k, v: [B, L, H, D] -> [B, L, H, D].

    A bucket runs a few groups at a time so that each gathered K (and V) stays under `chunk_bytes`: buffers that size
    are reused from the allocator's heap and stay in cache, while one big gather per bucket spends most of its time
    faulting in fresh pages (measured 3-4x slower on CPU). Differentiable (q, k, v) on any device (see
    `_GatherAttention`); no double backward.
    """
    if (q.shape[1], k.shape[1]) != (plan.num_queries, plan.length):
        raise ValueError(f"gather_attention: q has {q.shape[1]} tokens and k {k.shape[1]}, the plan was built for "
                         f"{plan.num_queries} and {plan.length}")
    return _GatherAttention.apply(q, k, v, plan, chunk_bytes)


"""Block-causal self-attention for long video: which chunks a chunk attends, at which RoPE positions.

A causal VideoDiT (`ModelConfig.causal`, a `CausalConfig`) cuts the token frames into chunks of `chunk_frames`
(latent frames / temporal patch). A forward holds a sequence of *entries*, each one chunk's tokens, tagged with the
chunk's index in the whole video and whether it is a context copy (a clean / context-noised chunk whose keys later
chunks read) or a chunk being denoised:

    sampling, no KV cache   [ctx 0 | ctx 1 | ... | ctx c-1 | noisy c]   (the reference the cache must equal)
    sampling with the cache [noisy c]  (earlier chunks' K/V come from the causal_kv hook's buffers)
    teacher forcing         [ctx 0 | ... | ctx n-1 | noisy 0 | ... | noisy n-1]
    diffusion forcing       [noisy 0 | ... | noisy n-1]   (each chunk at its own noise level)

Query entry (c, kind) attends: for every earlier chunk j it is allowed to see (j < sink_chunks, or c - j <=
window_chunks, or window_chunks None), that chunk's context copy if the forward has one, else its only entry; and
itself. Attention within a chunk is bidirectional.

RoPE: "absolute" rotates every entry at its chunk's absolute frame positions (chunk * frames + local frame);
"window" gives, per query chunk, consecutive slots to the chunks it attends in order (sinks first, the query's own
chunk last), so the positions a chunk sees depend only on how many chunks it attends, never on its index: chunk 500
with the same window content computes what chunk 5 would. Both copies of a chunk (teacher forcing) get the same
positions. `causal_attention` is the plain implementation (one dense attention per query entry over its keys, any
device); the causal_kv cache hook computes the same thing from stored keys. Sparse backends (radial, sliding tile)
see each call as the last chunk of a clip made of the chunks it attends, in that order (`AttentionContext.key_frames`,
vdiff.attention.blocksparse `attend_tail`); VMoBA refuses a causal model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vdiff.attention import AttentionContext, dispatch
from vdiff.config import CausalConfig
from vdiff.models.layers import RotaryPosEmbed3D, apply_rope

Entry = tuple[int, bool]  # (chunk index in the video, is a context copy)


@dataclass(frozen=True)
class CausalLayout:
    """The chunks of one forward and the rule of what each attends (see the module docstring)."""

    config: CausalConfig
    frames: int  # token frames per chunk
    hw: tuple[int, int]  # token grid (H, W)
    entries: tuple[Entry, ...]
    rope: RotaryPosEmbed3D
    # RoPE tables per (query chunk, attended chunks, device), built once per forward and shared by every layer
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def chunk_tokens(self) -> int:
        return self.frames * self.hw[0] * self.hw[1]

    def sees(self, c: int, j: int) -> bool:
        """Whether chunk c attends chunk j (j <= c)."""
        cfg = self.config
        return j == c or (j < c and (j < cfg.sink_chunks or cfg.window_chunks is None or c - j <= cfg.window_chunks))

    def attended_chunks(self, c: int, available: list[int] | None = None) -> list[int]:
        """Chunks c attends, ascending, among `available` (default: every chunk index before it, and c)."""
        pool = range(c + 1) if available is None else available
        return sorted(j for j in set(pool) | {c} if self.sees(c, j))

    def key_entries(self, qi: int) -> list[int]:
        """Indices of the entries query entry `qi` attends, ascending by chunk (its own entry last)."""
        c, _ = self.entries[qi]
        context = {j: i for i, (j, is_ctx) in enumerate(self.entries) if is_ctx}
        only = {j: i for i, (j, _) in enumerate(self.entries)}
        keys = [context.get(j, only[j]) for j in self.attended_chunks(c, [j for j, _ in self.entries]) if j != c]
        return keys + [qi]

    def frame_positions(self, c: int, chunks: list[int]) -> list[torch.Tensor]:
        """Temporal RoPE positions of each chunk in `chunks` (ascending; the query chunk c last) as seen from c."""
        local = torch.arange(self.frames)
        if self.config.rope == "absolute":
            return [j * self.frames + local for j in chunks]
        return [slot * self.frames + local for slot in range(len(chunks))]

    def tables(self, c: int, chunks: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [len(chunks) * chunk tokens, 1, D/2] of the tokens of `chunks` (ascending, c last) at the
        positions chunk c sees them at; the same for every layer of a forward, so built once per forward."""
        key = (c, tuple(chunks), str(device))
        if key not in self._tables:
            frames = torch.cat(self.frame_positions(c, chunks))
            cos, sin = self.rope((frames.numel(), *self.hw), frames=frames)
            self._tables[key] = (cos.to(device), sin.to(device))
        return self._tables[key]

    def check_length(self) -> None:
        """Absolute RoPE runs out at rope_max_seq_len frames: say so before a forward would read past the table."""
        if self.config.rope != "absolute":
            return
        last = max(j for j, _ in self.entries)
        frames = (last + 1) * self.frames
        if frames > self.rope.max_seq_len:
            raise ValueError(f"causal model with rope='absolute': chunk {last} reaches token frame {frames}, past "
                             f"rope_max_seq_len={self.rope.max_seq_len}; generate fewer chunks or use "
                             "model.causal.rope='window' (unbounded length)")


def layout_for(config: CausalConfig, grid: tuple[int, int, int], patch_t: int, rope: RotaryPosEmbed3D,
               entries: list[Entry] | None) -> CausalLayout:
    """The layout of a forward over `grid`; entries None = chunks 0..n-1, all being denoised (training / a clip)."""
    frames = config.chunk_frames // patch_t
    t, h, w = grid
    if t % frames:
        raise ValueError(f"causal model: {t} token frames do not divide into chunks of {frames} "
                         f"(model.causal.chunk_frames={config.chunk_frames}, temporal patch {patch_t})")
    n = t // frames
    if entries is None:
        entries = [(j, False) for j in range(n)]
    entries = tuple((int(j), bool(ctx)) for j, ctx in entries)
    if len(entries) != n:
        raise ValueError(f"causal model: {len(entries)} chunk entries for {n} chunks of input")
    if len(set(entries)) != len(entries):
        raise ValueError(f"causal model: repeated chunk entries {entries}")
    layout = CausalLayout(config, frames, (h, w), entries, rope)
    layout.check_length()
    return layout


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Block-causal self-attention over raw (un-rotated) q, k, v [B, L, N, Dh] of `ctx.causal`'s entries: per query
    entry, its keys rotated at the positions it sees them, one dense attention each -> [B, L, N, Dh]."""
    layout: CausalLayout = ctx.causal
    sp = ctx.sequence_parallel
    if sp is not None:  # Ulysses: every chunk's tokens on this rank, for a share of the heads
        q, k, v = sp.gather(q, k, v)  # (B, L, N/world, Dh)
    n = layout.chunk_tokens
    sub = dataclasses.replace(ctx, grid=(layout.frames, *layout.hw), causal=None, sequence_parallel=None)
    out = torch.empty_like(q)
    for qi, (c, _) in enumerate(layout.entries):
        keys = layout.key_entries(qi)
        call = dataclasses.replace(sub, key_frames=len(keys) * layout.frames)  # the attended chunks as a clip
        chunks = [layout.entries[i][0] for i in keys]
        cos, sin = layout.tables(c, chunks, q.device)  # (len(keys) * n, 1, Dh/2)
        k_sel = torch.cat([k[:, i * n:(i + 1) * n] for i in keys], dim=1)  # (B, len(keys) * n, N, Dh)
        v_sel = torch.cat([v[:, i * n:(i + 1) * n] for i in keys], dim=1)
        q_i = apply_rope(q[:, qi * n:(qi + 1) * n], cos[-n:], sin[-n:])  # the query chunk sits last
        out[:, qi * n:(qi + 1) * n] = dispatch(q_i, apply_rope(k_sel, cos, sin), v_sel, call)
    return sp.scatter(out) if sp is not None else out

"""Generation over several processes: what `VideoPipeline(..., parallel=ParallelConfig(...))` holds.

    torchrun --nproc-per-node 4 script.py     # script: VideoPipeline.from_pretrained(path, parallel=ParallelConfig(
                                              #     cfg=2, ulysses=2)); out = pipe(prompt, seed=0)
    if pipe.parallel.is_writer: out.save("clip.mp4")   # every rank returns the same frames; only rank 0 writes

Per call, in this order:
1. `agree`: every rank checks the request (VideoPipeline._resolve) and the ranks exchange the outcome and a
   fingerprint of the request (one all_gather over gloo). A rank that rejected it, or a request that differs (seed,
   size, prompt, ...), raises on EVERY rank before step 0, never a hang. A random seed is rank 0's.
2. `encode_text`: rank 0 encodes and broadcasts the embeddings ("rank0"), or every rank encodes ("replicate").
   `step_callback`: a callback returning False on any rank (a cancel) stops every rank after the same step.
3. CFG parallel (`CfgExchange`, used by `denoise`): the rank with cfg coordinate 0 runs the conditional branch, 1 the
   unconditional one; one all_gather of v per step; each rank steps its own scheduler on identical inputs.
4. Ulysses (`PaddedSequenceParallel`, the training hooks of vdiff.parallel.sequence): any token count. Entering the
   first block the sequence is zero-padded to a multiple of N; right after the all-to-all that gathers the sequence
   the padding is trimmed, so every attention backend sees exactly the L real tokens (the result equals one
   process); the padding is restored before the inverse all-to-all and trimmed again when the tokens are gathered
   for the output head. Padded rows only pass through per-token layers and are never attended to.
5. `decode`: with parallel.vae = k, k ranks split the decode over the latent height (vdiff.parallel.vae), else every
   rank decodes the whole video. The step cache decides from `relative_change`,
the same number on every rank, so all ranks skip the same steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vdiff.outputs import PipelineStats
from vdiff.parallel.config import ParallelConfig, divisors
from vdiff.parallel.mesh import ParallelMesh, init_distributed, parallel_device
from vdiff.parallel.sequence import SequenceParallel, apply_sequence_parallel
from vdiff.parallel.vae import SplitDecode, bands

__all__ = ["CfgExchange", "PaddedSequenceParallel", "ParallelConfig", "ParallelRuntime",
           "parallel_device"]


class PaddedSequenceParallel(SequenceParallel):
    """Ulysses for any token count L: pad to a multiple of N for the split, trim to L around attention (exact)."""

    length = 0  # tokens of the current forward (set by `check`, which the first block's hook calls)
    padded = 0

    def check(self, num_tokens: int, num_heads: int) -> None:
        if num_heads % self.size:
            valid = ", ".join(str(d) for d in divisors(num_heads))
            raise ValueError(f"parallel.ulysses={self.size} does not divide the model's {num_heads} attention heads; "
                             f"valid ulysses degrees: {valid}")
        self.length, self.padded = num_tokens, -(-num_tokens // self.size) * self.size

    def _pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.length or self.padded == self.length:
            return x
        shape = list(x.shape)
        shape[dim] = self.padded - self.length
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return super().split(self._pad(x, dim), dim)

    def gather(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return tuple(t[:, : self.length] for t in super().gather(q, k, v))  # (B, L, H/N, Dh): padding trimmed

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        return super().scatter(self._pad(out, 1))  # (B, L_pad / N, H, Dh)

    def all_gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return super().all_gather(x, dim).narrow(dim, 0, self.length)


class CfgExchange:
    """The CFG pair: this rank's branch (cfg coordinate 0 = conditional, 1 = unconditional) and the per-step
    exchange of the noise prediction."""

    def __init__(self, group: Any, index: int):
        self.group, self.index = group, index

    def branch(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return cond if self.index == 0 else uncond

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """(B, ...) of this branch -> (2B, ...) = [v_cond; v_uncond] on both ranks."""
        v = v.contiguous()
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v, group=self.group)
        return torch.cat(parts)


@dataclass
class ParallelRuntime:
    """One rank's share of a parallel pipeline: the mesh, the hooks on the transformer, the per-call protocol."""

    def __init__(self, config: ParallelConfig, transformer: torch.nn.Module, leader: Any = None):
        config.check_model(dict(transformer.config))
        self.leader = leader  # launch="spawn", rank 0: the follower processes (vdiff.parallel.spawn.Leader)
        self.owns_group = not dist.is_initialized()  # close() ends a process group only when this runtime began it
        init_distributed()
        self.config = config
        self.mesh = ParallelMesh(config, replicas=1)
        self.rank = dist.get_rank()
        self.cfg = CfgExchange(self.mesh.groups["cfg"], self.mesh.coords["cfg"]) if config.cfg > 1 else None
        self.sequence = None
        if config.ulysses > 1:
            self.sequence = PaddedSequenceParallel(self.mesh.groups["ulysses"])
            apply_sequence_parallel(transformer, self.sequence)
        self.split_decode = None
        if config.vae > 1:
            ranks = self.mesh.vae_ranks
            self.split_decode = SplitDecode(self.mesh.vae_group, ranks.index(self.rank), len(ranks))

    def __repr__(self) -> str:
        return f"ParallelRuntime({self.config}, {self.mesh})"

    @property
    def is_writer(self) -> bool:
        """True on the one rank that should write files (global rank 0)."""
        return self.rank == 0

    def close(self) -> None:
        """Wait for every rank of the video (rank 0 may still be writing it), then end the process group if this
        runtime started it. A rank that leaves with gloo's threads still running aborts ("terminate called without an
        active exception"), so a script under torchrun calls this before it exits."""
        if self.leader is not None:
            self.leader.close()  # the followers leave with it; the group ends
            return
        if not dist.is_initialized():
            return
        dist.barrier(group=self.mesh.control)
        if self.owns_group:
            dist.destroy_process_group()

    # ---------------------------------------------------------------------------------------------------------------
    # One call
    # ---------------------------------------------------------------------------------------------------------------

    def agree(self, resolve: Callable[[], Any], seed_given: bool, extra: dict[str, Any] | None = None) -> Any:
        """Run `resolve()` (the pipeline's argument checks) on every rank and make sure all ranks run the same request
        (its fields plus the JSON-able `extra`). Raises on every rank if any rank rejected it or the requests differ;
        a random seed becomes rank 0's."""
        error, fields, args = None, {}, None
        try:
            args = resolve()
            fields = {**request_fields(args, seed_given), **(extra or {})}
        except Exception as err:  # reported to every rank below, then re-raised here
            error = err
        mine = {"error": None if error is None else f"{type(error).__name__}: {error}", "fields": fields,
                "seed": None if args is None else args.seed}
        everyone: list[Any] = [None] * len(self.mesh.video_ranks)
        dist.all_gather_object(everyone, mine, group=self.mesh.control)
        if error is not None:
            raise error
        failed = [(r, m["error"]) for r, m in zip(self.mesh.video_ranks, everyone) if m["error"]]
        if failed:
            r, msg = failed[0]
            raise RuntimeError(f"parallel: rank {r} rejected the request ({msg}); no rank started it")
        differ = [f"{name}: " + ", ".join(f"rank {r} = {m['fields'][name]}" for r, m in zip(self.mesh.video_ranks,
                                                                                             everyone))
                  for name in fields if len({json.dumps(m["fields"][name]) for m in everyone}) > 1]
        if differ:
            raise ValueError("parallel: the request differs between ranks (every rank must make the same call): "
                             + "; ".join(differ))
        if not seed_given:
            args = dataclasses.replace(args, seed=everyone[0]["seed"])
        return args

    def leader_value(self, value: Any) -> Any:
        """Rank 0's `value` on every rank of the video (a pickled object over the control group)."""
        box = [value]
        dist.broadcast_object_list(box, src=self.mesh.video_ranks[0], group=self.mesh.control)
        return box[0]

    def relative_change(self, new: torch.Tensor, old: torch.Tensor) -> float:
        """mean|new - old| / mean|old| over the whole video: this rank's rows without Ulysses padding, summed over
        every rank of the video (one all_reduce of two numbers), so every rank gets the same value, the one a single
        process computes over its [cond | uncond] batch (up to summation order)."""
        if self.sequence is not None:  # (B, L_local, D): the real rows of this rank's shard
            local = new.shape[1]
            real = max(0, min(local, self.sequence.length - self.sequence.rank * local))
            new, old = new[:, :real], old[:, :real]
        sums = torch.stack([(new - old).abs().sum(), old.abs().sum()]).double().cpu()
        dist.all_reduce(sums, group=self.mesh.control)
        return float(sums[0] / sums[1].clamp_min(1e-12))

    def step_callback(self, callback: Callable[[int, int, torch.Tensor], Any] | None) -> Callable | None:
        """The denoising loop's callback on every rank of the video: each rank runs `callback`, then the ranks agree
        (one all_reduce over the control group per step) whether any asked to stop, so all stop after the same step.
        A rank that stopped alone would leave the others waiting in the next step's exchange."""
        if self.config.size == 1:
            return callback

        def step(index: int, num_steps: int, latents: torch.Tensor) -> bool | None:
            stop = torch.tensor([int(callback is not None and callback(index, num_steps, latents) is False)])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.mesh.control)
            return False if stop.item() else None

        return step

    def encode_text(self, encoder: Any, prompts: list[str]) -> Any:
        """The encoder's TextEmbeddings of `prompts`, computed once on rank 0 and broadcast ("rank0"), or here."""
        if self.config.text_encoder == "replicate":
            return encoder.encode(prompts)
        box = [encoder.encode(prompts) if self.rank == self.mesh.video_ranks[0] else None]
        if box[0] is not None:
            box[0] = dataclasses.replace(box[0], embeds=box[0].embeds.cpu(), mask=box[0].mask.cpu())
        dist.broadcast_object_list(box, src=self.mesh.video_ranks[0], group=self.mesh.control)
        device = encoder.device if hasattr(encoder, "device") else torch.device("cpu")
        return dataclasses.replace(box[0], embeds=box[0].embeds.to(device), mask=box[0].mask.to(device))

    def check_decode(self, args: Any, vae: Any) -> Any:
        """`args` (a resolved request) if its latent height can be split over the VAE ranks, else ValueError."""
        if self.split_decode is not None:
            bands(vae.latent_shape(args.num_frames, args.height, args.width)[1], self.split_decode.size)
        return args

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """The video of `latents` on every rank: split over the latent height (parallel.vae > 1) or whole."""
        return vae.decode(latents) if self.split_decode is None else self.split_decode.decode(vae, latents)

    def stats(self, guidance: float) -> PipelineStats:
        info: dict[str, Any] = {"cfg": self.config.cfg, "ulysses": self.config.ulysses, "vae": self.config.vae,
                                "text_encoder": self.config.text_encoder, "world_size": dist.get_world_size(),
                                "rank": self.rank, "coords": dict(self.mesh.coords), "notes": []}
        if self.cfg is not None and guidance <= 1.0:
            info["notes"].append(f"cfg parallel had no effect: guidance_scale={guidance:g} <= 1 runs no unconditional "
                                 "branch, so both cfg ranks computed the conditional one")
        return PipelineStats(parallel=info)


def request_fields(args: Any, seed_given: bool) -> dict[str, Any]:
    """What must be equal on every rank, as JSON-able values (long prompts as a hash)."""
    def digest(texts: list[str]) -> str:
        return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16] + f" ({len(texts)} prompts)"

    scheduler = args.scheduler
    return {
        "prompt": digest(args.prompts), "negative_prompt": digest(args.negatives),
        "num_frames": args.num_frames, "height": args.height, "width": args.width,
        "num_inference_steps": args.steps, "guidance_scale": args.guidance,
        "seed": args.seed if seed_given else "random (rank 0's)",
        "attention": repr(args.attention), "sampler": f"{type(scheduler).__name__} {dict(scheduler.config)}",
        "cache": sorted(args.caches), "cache_configs": {k: repr(v) for k, v in sorted(args.cache_configs.items())},
    }

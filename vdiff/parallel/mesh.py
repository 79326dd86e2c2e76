"""The inference device mesh (replica, cfg, ulysses), row-major: rank = (r * cfg + c) * ulysses + u.

Ulysses ranks are consecutive (they all-to-all twice per layer: keep them on one node), the CFG pair sits outside
them (one all_gather of v per step), replicas (independent requests, the server's groups) are outermost.

`MeshLayout` is pure arithmetic (group membership for any world size, testable without processes); `ParallelMesh`
creates the process groups of one job. Every rank must create every group, in the same order (torch.distributed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vdiff.parallel.config import ParallelConfig

AXES = ("replica", "cfg", "ulysses")


@dataclass(frozen=True)
class MeshLayout:
    replica: int
    cfg: int
    ulysses: int

    @classmethod
    def of(cls, config: ParallelConfig, world_size: int) -> MeshLayout:
        if world_size % config.size:
            raise ValueError(f"parallel: cfg={config.cfg} x ulysses={config.ulysses} = {config.size} ranks does not "
                             f"divide {world_size} processes")
        return cls(world_size // config.size, config.cfg, config.ulysses)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.replica, self.cfg, self.ulysses

    @property
    def world_size(self) -> int:
        return self.replica * self.cfg * self.ulysses

    def coords(self, rank: int) -> dict[str, int]:
        """{'replica': r, 'cfg': c, 'ulysses': u} of a global rank."""
        r, rest = divmod(rank, self.cfg * self.ulysses)
        c, u = divmod(rest, self.ulysses)
        return {"replica": r, "cfg": c, "ulysses": u}

    def rank(self, replica: int, cfg: int, ulysses: int) -> int:
        return (replica * self.cfg + cfg) * self.ulysses + ulysses

    def groups(self, axis: str) -> list[list[int]]:
        """All groups along `axis`: the ranks that differ only in that coordinate, in a fixed order."""
        if axis not in AXES:
            raise ValueError(f"mesh axis must be one of {list(AXES)}, got {axis!r}")
        sizes = dict(zip(AXES, self.shape))
        others = [a for a in AXES if a != axis]
        out = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                out.append([self.rank(**{**fixed, axis: k}) for k in range(sizes[axis])])
        return out

    def group_of(self, axis: str, rank: int) -> list[int]:
        return next(g for g in self.groups(axis) if rank in g)


def init_distributed() -> None:
    """Initialise the default process group from torchrun's environment if nobody has (NCCL on GPUs, else gloo)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"parallel: no process group and no torchrun environment ({', '.join(missing)} unset); "
                           "start the script with torchrun --nproc-per-node N")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def parallel_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class ParallelMesh:
    """The process groups of this rank along each axis, plus a gloo group over everyone for control messages
    (pickled request fingerprints, text embeddings) that must not go through NCCL."""

    def __init__(self, config: ParallelConfig, replicas: int | None = None):
        world, rank = dist.get_world_size(), dist.get_rank()
        if replicas is None:
            self.layout = MeshLayout.of(config, world)
        else:
            self.layout = MeshLayout(replicas, config.cfg, config.ulysses)
            config.check(config.ulysses, world, replicas)  # raises naming both numbers when they differ
        self.rank = rank
        self.coords = self.layout.coords(rank)
        self.ranks: dict[str, list[int]] = {}
        self.groups: dict[str, object] = {}
        for axis in AXES:
            for members in self.layout.groups(axis):
                group = dist.new_group(members)  # collective: every rank creates every group
                if rank in members:
                    self.ranks[axis], self.groups[axis] = members, group
        # the ranks of one video (this replica) for pickled control messages: gloo when the default is NCCL
        size, backend = config.size, "gloo" if dist.get_backend() == "nccl" else None
        for start in range(0, world, size):
            members = list(range(start, start + size))
            group = dist.new_group(members, backend=backend)
            if rank in members:
                self.video_ranks, self.control = members, group
        # the VAE split (parallel.vae = k): consecutive runs of k ranks inside each video
        self.vae_ranks, self.vae_group = [rank], None
        if config.vae > 1:
            for start in range(0, world, config.vae):
                members = list(range(start, start + config.vae))
                group = dist.new_group(members)
                if rank in members:
                    self.vae_ranks, self.vae_group = members, group

    def __repr__(self) -> str:
        return f"ParallelMesh(shape={self.layout.shape}, rank={self.rank}, coords={self.coords})"

"""ParallelConfig: how one video is split over several processes at inference, and every check that can be made
before a weight is read (degrees against the model's heads and against the number of processes).

    ParallelConfig(cfg=2, ulysses=4)   # 8 ranks: conditional / unconditional branch x 4-way sequence parallel

cfg       1 or 2: the two classifier-free-guidance branches on two ranks (one exchange of v per step)
ulysses   Ulysses sequence parallel degree; must divide the model's attention heads
vae       ranks that split the VAE decode over the latent height (a divisor of cfg x ulysses; vdiff.parallel.vae):
          exact for the pixel VAE; AutoencoderKLWan is refused with the reason
text_encoder  "rank0" (rank 0 encodes, the embeddings are broadcast) or "replicate" (every rank encodes)
ring      1 (ring attention is not implemented; refused with the reason)
launch    "torchrun" (every rank runs the script) or "spawn" (the caller is rank 0 and starts the others on loopback:
          vdiff.parallel.spawn)
devices   with launch="spawn": one device per rank ("cuda:0+cuda:1" or a sequence; default cuda:RANK, or the CPU)

The device mesh is (replica, cfg, ulysses) in row-major order (vdiff.parallel.mesh): Ulysses ranks consecutive (one
node, the most traffic), the CFG axis outside them, replicas outermost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

TEXT_ENCODER_MODES = ("rank0", "replicate")
LAUNCHERS = ("torchrun", "spawn")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def process_count() -> int:
    """Processes of this job: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ParallelConfig:
    cfg: int = 1
    ulysses: int = 1
    vae: int = 1
    text_encoder: str = "rank0"
    ring: int = 1
    launch: str = "torchrun"
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        devices = self.devices.split("+") if isinstance(self.devices, str) else self.devices
        if not isinstance(devices, (list, tuple)):
            raise ValueError(f"parallel.devices must be devices joined by '+' (cuda:0+cuda:1) or a list of them, "
                             f"got {self.devices!r}")
        object.__setattr__(self, "devices", tuple(str(d).strip() for d in devices if str(d).strip()))
        if self.ring != 1:
            raise ValueError(f"parallel.ring={self.ring!r}: ring attention is not implemented (it would split dense "
                             "attention's keys over ranks, and sparse backends cannot be ringed); valid values: 1. Use "
                             "parallel.ulysses (a divisor of the model's heads) for sequence parallelism, with "
                             "parallel.cfg=2 for the guidance branches")
        for name in ("cfg", "ulysses", "vae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be an int >= 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg must be 1 or 2 (the conditional and the unconditional branch), "
                             f"got {self.cfg}")
        if self.size % self.vae:
            valid = ", ".join(str(d) for d in divisors(self.size))
            raise ValueError(f"parallel.vae={self.vae} must divide the ranks of one video (cfg={self.cfg} x "
                             f"ulysses={self.ulysses} = {self.size}); valid values: {valid}")
        if self.launch not in LAUNCHERS:
            raise ValueError(f"parallel.launch must be one of {list(LAUNCHERS)}, got {self.launch!r}")
        if self.devices and self.launch != "spawn":
            raise ValueError("parallel.devices is for launch='spawn' (under torchrun each rank uses cuda:LOCAL_RANK)")
        if self.devices and len(self.devices) != self.size:
            raise ValueError(f"parallel.devices: {len(self.devices)} devices ({'+'.join(self.devices)}) for "
                             f"cfg={self.cfg} x ulysses={self.ulysses} = {self.size} ranks; give one per rank")
        if self.text_encoder not in TEXT_ENCODER_MODES:
            raise ValueError(f"parallel.text_encoder must be one of {list(TEXT_ENCODER_MODES)}, "
                             f"got {self.text_encoder!r}")

    @property
    def size(self) -> int:
        """Ranks one video runs on: cfg x ulysses."""
        return self.cfg * self.ulysses

    def check(self, num_heads: int, world_size: int | None = None, replicas: int = 1) -> None:
        """Raise ValueError naming the valid values if this split cannot run a model with `num_heads` heads on
        `world_size` processes (default: this job's) holding `replicas` copies of the group."""
        if num_heads % self.ulysses:
            valid = ", ".join(str(d) for d in divisors(num_heads))
            raise ValueError(f"parallel.ulysses={self.ulysses} does not divide the model's {num_heads} attention "
                             f"heads; valid ulysses degrees: {valid}{suggest_split(self.size, num_heads)}")
        world = process_count() if world_size is None else world_size
        if replicas * self.size != world:
            what = f"{replicas} replicas x " if replicas != 1 else ""
            raise ValueError(f"parallel: {what}cfg={self.cfg} x ulysses={self.ulysses} = {replicas * self.size} "
                             f"ranks, but {world} processes are running; start {replicas * self.size} processes "
                             f"(torchrun --nproc-per-node {replicas * self.size}) or change the degrees so their "
                             f"product is {world}")

    def check_model(self, model_config: dict[str, Any], world_size: int | None = None) -> None:
        """`check` against a transformer's config.json (read before its weights)."""
        self.check(int(model_config["num_attention_heads"]), world_size)


def suggest_split(ranks: int, num_heads: int) -> str:
    """'; for 8 ranks use cfg=2 ulysses=4' when such a split of `ranks` exists, else ''."""
    for cfg in (2, 1):
        if ranks % cfg == 0 and num_heads % (ranks // cfg) == 0:
            return f"; for {ranks} ranks use cfg={cfg} ulysses={ranks // cfg}"
    return ""

"""What a run tells its user: the start line, metrics.jsonl + TensorBoard, the closing summary, and (for the
distributed tests) a per-rank record of the data read and the final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """Rows of output_dir/metrics.jsonl, mirrored to TensorBoard under output_dir/logs. Main process only."""

    SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = SummaryWriter(str(Path(run_dir) / "logs"))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k in self.SCALARS:
            self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self.writer.close()


def start_line(trainer: Any, resumed_from: Path | None) -> str:
    """One line that says how the run is set up: processes, backend, precision, model, data, batch, start."""
    r, acc = trainer.recipe.train, trainer.accelerator
    n_params = sum(p.numel() for p in trainer.ema.parameters())
    start = (f"resumed from {resumed_from} at step {trainer.progress.step}" if resumed_from
             else f"fresh start from the weights of {r.init_from}" if r.init_from else "fresh start")
    return (f"[train] {acc.num_processes} process(es) ({acc.distributed_type.value}, deepspeed={r.deepspeed}, "
            f"sequence_parallel={r.sequence_parallel}), device {trainer.device}, precision {acc.mixed_precision}; "
            f"model {n_params / 1e6:.2f}M params, attention={trainer.recipe.model.attention.backend}; "
            f"{len(trainer.dataset)} samples x {trainer.tokens_per_sample} tokens; global batch "
            f"{r.batch_size * r.grad_accum * trainer.dp_world}; " + start)


def summary_text(s: dict[str, Any], run_dir: str | Path) -> str:
    """The closing block printed by the main process (the same facts as summary.json)."""
    first = f"{s['first_loss']:.4f}" if s["first_loss"] is not None else "-"
    run_dir = Path(run_dir)
    return "\n".join([
        "[train] done",
        f"  steps          {s['steps']} ({s['steps_this_run']} this run, {s['seconds']:.1f} s, "
        f"{s['tokens_per_s']:.0f} tokens/s)",
        f"  loss           {first} -> {s['final_loss']:.4f}",
        f"  processes      {s['processes']} (data parallel {s['data_parallel']}, sequence parallel "
        f"{s['sequence_parallel']}, deepspeed {s['deepspeed']})",
        f"  checkpoint     {s['checkpoint']}",
        f"  pipeline       {s['pipeline']}",
        f"  logs           {run_dir / 'logs'} (tensorboard), {run_dir / 'metrics.jsonl'}",
    ])


def write_rank_record(folder: str | Path, rank: int, dp_rank: int, num_processes: int, indices: list[int],
                      params: list[torch.nn.Parameter]) -> Path:
    """folder/rank{R}.json: the sample indices this rank read, in order, and a SHA-256 of its full parameters, so a
    test can check that ranks read disjoint shards and ended with identical weights."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, "dp_rank": dp_rank, "num_processes": num_processes,
                                "indices": indices, "param_sha256": digest.hexdigest()}))
    return path

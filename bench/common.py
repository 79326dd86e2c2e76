"""Shared benchmark plumbing: machine facts, timing, a printed table, and JSON under bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# VDIFF_BENCH_RESULTS redirects every benchmark's JSON (bench.gpu --dry-run / --out uses it)
RESULTS = Path(os.environ.get("VDIFF_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: host, CPU, GPU, library versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in ("diffusers", "accelerate", "deepspeed", "transformers", "gradio", "triton", "xformers"):
        info[name] = _version(name)
    return info


def machine_tag() -> str:
    """Short name for result files: the GPU model, or 'cpu<N>'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace("nvidia", "").strip().replace(" ", "-")
    return f"cpu{os.cpu_count()}"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, device: torch.device | str | None = None
) -> list[float]:
    """Seconds per call for `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_alternating(fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5,
                     device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Time several callables interleaved (a, b, a, b, ...) so drift on a shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """Print rows as an aligned text table (floats to 4 significant digits) and return it."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_result(name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                 launch: str | None = None, directory: Path | None = None) -> Path:
    """Write bench/results/<name>-<machine>.json (or under `directory`) with the rows, the machine, versions and the
    command line.

    `launch`: the command that reruns it, when it is not `./launch.sh bench <name> ARGS` (a driver under
    experiments/)."""
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{machine_tag()}.json"
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
        "launch": launch or f"./launch.sh bench {name} " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_commit": _git_commit(),
        "machine": machine_info(),
        "meta": meta or {},
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

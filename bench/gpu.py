"""One command for a GPU machine: every GPU check and benchmark in order, each within its own time budget.

    ./launch.sh bench gpu                      # on the GPU machine: ~8 minutes, JSON per part + a summary
    ./launch.sh bench gpu --dry-run            # the same sequence on CPU at tiny shapes (seconds; tested in CI)
    ./launch.sh bench gpu --prepare            # here: build .whl/ with what the GPU machine lacks (bench/_wheels.py)
    ./launch.sh bench gpu --out DIR --budget 420 --budgets attention=200,cache=0

Parts, in order (PARTS): `pytest -m gpu` over the test files holding GPU tests (pass / fail / skip counts),
`bench attention --shapes gpu`, `bench step --shape wan480`, `bench train --gpu`, `bench cache --shape wan480`
(short). Each part runs as its own process, killed when its budget is spent; a part whose budget is 0, or that would
start with less than MIN_START_S of the overall budget left, is skipped with a note. So the command always finishes
and writes what it got: each part's JSON (`<name>-<machine>.json`), one log of every part's output, and the summary
(`gpu-<machine>.json`, with `available()` for the device: which implementation each backend runs there and why).
Where diffusers, deepspeed, xformers, gradio or peft are missing and `.whl/` exists, its wheels are installed offline
first (`pip install --no-index --no-deps --target ...`, nothing on the machine is replaced).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from bench.common import machine_tag, print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "vdiff-site"  # where .whl/ is installed on the GPU machine
NEEDED = ("diffusers", "deepspeed", "xformers", "gradio", "peft")  # what the GPU machine lacks (ENVIRONMENT.md)
DEFAULT_BUDGET_S = 480.0  # the target: <= ~8 minutes on one H100 / H200
MIN_START_S = 10.0  # a part is not started with less than this left of the overall budget


@dataclass(frozen=True)
class Part:
    """One step of the sequence: `python -m <module> <args>` (or pytest), its JSON name and its budget."""

    name: str
    module: str
    gpu_args: tuple[str, ...]
    dry_args: tuple[str, ...]
    budget_s: float
    dry_budget_s: float
    result: str  # JSON written by the part: <result>-<machine>.json


PARTS = (
    Part("tests", "pytest", ("-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"),
         ("-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"), 60, 60, "gpu-tests"),
    Part("attention", "bench.attention", ("--shapes", "gpu", "--repeats", "5", "--warmup", "1"),
         ("--shapes", "cpu", "--grid", "2,8,8", "--methods", "radial", "sliding_tile", "--impls", "gather",
          "--kernels", "sdpa", "--repeats", "1", "--warmup", "0"), 170, 60, "attention"),
    Part("step", "bench.step", ("--shape", "wan480", "--repeats", "3", "--warmup", "1"),
         ("--shape", "tiny", "--repeats", "1", "--warmup", "0", "--layers", "1"), 60, 60, "step"),
    Part("train", "bench.train", ("--gpu", "--skip-recipe", "--gpu-steps", "3"),
         ("--gpu", "--skip-recipe", "--gpu-steps", "1", "--gpu-shape", "tiny", "--backends", "sliding_tile"),
         140, 60, "train"),
    Part("cache", "bench.cache", ("--shape", "wan480", "--steps", "10", "--repeats", "1", "--prompts", "1",
                                  "--thresholds", "0.1", "--indicators", "first_block",
                                  "--configs", "none,text_kv+mask+prompt,step@0.1"),
         ("--shape", "tiny", "--steps", "1", "--repeats", "1", "--prompts", "1", "--thresholds", "0.1",
          "--indicators", "first_block", "--configs", "none,step@0.1"), 90, 60, "cache"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same sequence on CPU at tiny shapes")
    p.add_argument("--prepare", action="store_true", help="build .whl/ for the GPU machine (needs a package index)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the JSON and the log go (default: bench/results; --dry-run: a temporary folder)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"overall seconds (default {DEFAULT_BUDGET_S:g}; --dry-run: the sum of the parts' budgets)")
    p.add_argument("--budgets", default="", help="per-part seconds, e.g. attention=200,cache=0 (0 skips the part)")
    p.add_argument("--parts", default=",".join(part.name for part in PARTS),
                   help="parts to run, comma-separated, in the fixed order")
    p.add_argument("--no-install", action="store_true", help="do not install .whl/ even where packages are missing")
    p.add_argument("--in-process", action="store_true",
                   help="with --dry-run: run the benchmark parts in this process (one import of torch and diffusers "
                        "for all; budgets are then checked only before a part starts). pytest stays a process")
    return p.parse_args(argv)


def _budgets(spec: str, dry_run: bool) -> dict[str, float]:
    budgets = {part.name: float(part.dry_budget_s if dry_run else part.budget_s) for part in PARTS}
    for item in filter(None, spec.split(",")):
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            raise SystemExit(f"--budgets: expected NAME=SECONDS with NAME in {list(budgets)}, got {item!r}")
        budgets[name] = float(seconds)
    return budgets


# --------------------------------------------------------------------------------------------------------------------
# Offline install of .whl/ (the GPU machine has no package index)
# --------------------------------------------------------------------------------------------------------------------


def _installed(name: str) -> bool:
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def install_wheels(wheels: Path = WHEELS, site: Path = SITE) -> dict:
    """Install the wheels of `wheels` whose distribution is not installed here into `site` (no index, no deps: the
    folder holds the whole missing closure), and put `site` on this process's and its children's path."""
    missing = [name for name in NEEDED if not _installed(name)]
    note: dict = {"missing_before": missing, "installed": []}
    if not missing:
        return note
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        note["note"] = f"{missing} missing and no wheels in {wheels} (./launch.sh bench gpu --prepare where pip works)"
        return note
    todo = [f for f in files if not _installed(f.name.split("-")[0])]
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        note.update(installed=[f.name for f in todo], install_s=time.perf_counter() - t0, rc=proc.returncode,
                    stderr=proc.stderr[-2000:])
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    import importlib.util

    importlib.invalidate_caches()
    note["missing_after"] = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    return note


# --------------------------------------------------------------------------------------------------------------------
# Running the parts
# --------------------------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files holding GPU tests (only those are collected: the others need packages a GPU machine may lack)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def run_logged(cmd: list[str], timeout: float, log, env: dict) -> tuple[int | None, float, str]:
    """Run `cmd` in its own process group, its output to stdout and `log` as it comes; kill the group at `timeout`.
    Returns (exit code, None if killed; seconds; the output)."""
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group, started above
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, time.perf_counter() - t0, "".join(lines)


TEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def test_counts(output: str) -> dict[str, int]:
    """pytest's summary line ('3 passed, 1 skipped, 80 deselected in 9.1s') -> {'passed': 3, ...}."""
    lines = [line for line in output.splitlines() if TEST_COUNTS.search(line) and " in " in line]
    counts = {key.rstrip("s") if key.startswith("error") else key: int(n)
              for n, key in TEST_COUNTS.findall(lines[-1])} if lines else {}
    return counts


def run_in_process(module: str, argv: list[str], out: Path) -> tuple[int, float, str]:
    """`python -m module argv` in this process (the dry run's --in-process): same module, same arguments."""
    import runpy

    import bench.common

    saved_argv, saved_results = sys.argv, bench.common.RESULTS
    sys.argv, bench.common.RESULTS = [module, *argv], out
    t0 = time.perf_counter()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        rc, note = 0, ""
    except SystemExit as err:
        rc, note = (err.code if isinstance(err.code, int) else 1), f"SystemExit: {err.code}"
    except Exception as err:  # a failing part is recorded; the sequence goes on
        rc, note = 1, f"{type(err).__name__}: {err}"
    finally:
        sys.argv, bench.common.RESULTS = saved_argv, saved_results
    return rc, time.perf_counter() - t0, note


def run_part(part: Part, args, budget: float, out: Path, log, env: dict) -> dict:
    row = {"part": part.name, "status": "", "seconds": 0.0, "budget_s": budget, "json": None, "note": ""}
    extra = part.dry_args if args.dry_run else part.gpu_args
    if part.module == "pytest":
        cmd = [sys.executable, "-m", "pytest", *extra, *gpu_test_files()]
    else:
        cmd = [sys.executable, "-m", part.module, *extra]
    in_process = args.in_process and part.module != "pytest"
    log.write(f"\n===== {part.name}: {' '.join(cmd)} (budget {budget:.0f} s{', in process' if in_process else ''})\n")
    log.flush()
    print(f"\n[bench gpu] {part.name}: {' '.join(cmd[2:])} (budget {budget:.0f} s)", flush=True)
    if in_process:
        rc, seconds, output = run_in_process(part.module, list(extra), out)
        log.write(output + "\n")
    else:
        rc, seconds, output = run_logged(cmd, budget, log, env)
    row["seconds"] = seconds
    result = out / f"{part.result}-{machine_tag()}.json"
    if part.module == "pytest":
        counts = test_counts(output)
        write_result(part.result, [dict(counts, rc=rc, seconds=seconds)],
                     {"files": gpu_test_files(), "command": cmd[2:], "dry_run": args.dry_run}, directory=out,
                     launch="./launch.sh bench gpu --parts tests")
        row["note"] = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
        ok = rc == 0 or (rc == 5 and args.dry_run)  # 5: nothing collected (a dry run deselects or skips all)
    else:
        ok = rc == 0
    fresh = result.is_file() and result.stat().st_mtime >= time.time() - seconds - 1
    row["json"] = result.name if fresh else None
    if in_process and output:
        row["note"] = output[:300]
    if rc is None:
        row["status"] = "timeout"
        row["note"] = (row["note"] + "; " if row["note"] else "") + f"killed at its {budget:.0f} s budget" + \
            (" (kept the JSON it wrote so far)" if fresh else "")
    else:
        row["status"] = "ok" if ok and fresh else "failed"
        if not ok:
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"exit code {rc} (see the log)"
        elif not fresh:
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"wrote no {result.name}"
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.prepare:
        from bench._wheels import prepare

        prepare(WHEELS)
        return []
    t_start = time.perf_counter()
    budgets = _budgets(args.budgets, args.dry_run)
    wanted = args.parts.split(",")
    unknown = sorted(set(wanted) - {part.name for part in PARTS})
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; parts: {[part.name for part in PARTS]}")
    if args.in_process and not args.dry_run:
        raise SystemExit("--in-process is for --dry-run only: on a GPU each part runs as its own process")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device (none found); --dry-run runs the same sequence on CPU")
    overall = args.budget if args.budget is not None else (
        sum(budgets.values()) + 30 if args.dry_run else DEFAULT_BUDGET_S)
    out = args.out or (Path(tempfile.gettempdir()) / "vdiff-bench-gpu-dry-run" if args.dry_run
                       else ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    install = {"skipped": "--dry-run or --no-install"} if args.dry_run or args.no_install else install_wheels()
    env = dict(os.environ, VDIFF_BENCH_RESULTS=str(out), PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, also on a machine with a GPU
        if args.in_process:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from vdiff.attention import available

    device = "cuda" if not args.dry_run else "cpu"
    backends = {name: str(status) for name, status in available(device).items()}
    print(f"[bench gpu] {'dry run on CPU' if args.dry_run else torch.cuda.get_device_name(0)}; overall budget "
          f"{overall:.0f} s; results in {out}", flush=True)
    for line in backends.values():
        print("  " + line, flush=True)

    rows = []
    log_path = out / f"gpu-{machine_tag()}.log"
    with open(log_path, "w") as log:
        for part in PARTS:
            if part.name not in wanted:
                continue
            left = overall - (time.perf_counter() - t_start)
            budget = min(budgets[part.name], left)
            if budgets[part.name] <= 0:
                note = "skipped: its budget is 0 s"
            elif left < MIN_START_S:
                note = f"skipped: the overall budget is spent ({left:.0f} s of {overall:.0f} s left)"
            else:
                note = None
            if note:
                print(f"\n[bench gpu] {part.name}: {note}", flush=True)
                log.write(f"\n===== {part.name}: {note}\n")
                rows.append({"part": part.name, "status": "skipped", "seconds": 0.0, "budget_s": budgets[part.name],
                             "json": None, "note": note})
                continue
            rows.append(run_part(part, args, budget, out, log, env))
    total = time.perf_counter() - t_start
    print_table(rows, ["part", "status", "seconds", "budget_s", "json", "note"],
                title=f"bench gpu ({'dry run, CPU' if args.dry_run else machine_tag()}): {total:.0f} s of "
                      f"{overall:.0f} s")
    write_result("gpu", rows, {"dry_run": args.dry_run, "overall_budget_s": overall, "total_s": total,
                               "budgets": budgets, "install": install, "available": backends,
                               "log": log_path.name}, directory=out,
                 launch="./launch.sh bench gpu " + " ".join(argv if argv is not None else sys.argv[1:]))
    return rows


if __name__ == "__main__":
    main()

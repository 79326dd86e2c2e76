"""Sparse video attention vs dense: forward and forward+backward time per method and density, in one run.

    ./launch.sh bench attention                  # CPU: grid (8, 32, 32) = 8,192 tokens (all methods) and
                                                 #      (32, 16, 16) = 8,192 tokens in 32 frames (radial),
                                                 #      4 heads, d=64, fp32
    ./launch.sh bench attention --shapes gpu     # GPU: (21, 30, 52) = 32,760 and (21, 45, 80) = 75,600 tokens,
                                                 #      12 heads, d=128, bf16
    ./launch.sh bench attention --grid 4,16,16 --methods radial sliding_tile

Every registered sparse backend with an option set below is measured (VMoBA too, once vdiff.attention.vmoba
registers) through each implementation in --impls (default: fast = FlexAttention for every method, and gather =
dense SDPA over gathered key blocks for radial / sliding_tile; `reference` = explicit [L, L] mask + SDPA can be
added), against dense SDPA (flash / cuDNN / memory-efficient on GPU, flash kernel on CPU), dense FlexAttention, and
xformers / flash_attn where they run. Columns:
    impl            the sparse implementation (attention.impl) of the row
    density         fraction of (query, key) pairs the method computes (`sparse_pattern(...).density`; VMoBA: the
                    call's selection, mean over heads)
    blocks          kernel blocks visited x block area / L^2 (static methods; partial blocks count whole): the
                    kernel's work as a fraction of dense, to hold against density
    fwd_ms          forward, median of --repeats calls after --warmup (timed interleaved with the dense kernels)
    x_sdpa, x_best  forward speed-up over dense SDPA / over the fastest dense kernel
    ideal           1 / density
    frac            achieved fraction of the ideal speed-up over the best dense kernel = x_best / ideal
    fwdbwd_*        the same for forward+backward (on CPU compiled FlexAttention has no backward: n/a; training on
                    CPU runs the gather path, impl=auto's choice there)
    build_s         static methods: building the layout and the row's artefact (gather plan / FlexAttention block
                    mask) on the device from nothing, alone
    first_s         first call: mask build (the same pieces, on the call's device) + compile + the call (masks are
                    then cached across layers, steps and requests)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import median, print_table, time_alternating, write_result
from vdiff.attention import AttentionContext, MaskCache, available, get_backend, sparse_pattern
from vdiff.config import AttentionConfig, RadialConfig, SlidingTileConfig, VMoBAConfig
from vdiff.runtime import default_device, first_line

CONFIG_CLASSES = {"radial": RadialConfig, "sliding_tile": SlidingTileConfig, "vmoba": VMoBAConfig}
STATIC = ("radial", "sliding_tile")  # methods with a gather / reference path of the same block pattern

# Per shape: method -> list of (layer, options). Options chosen to span densities; radial's density depends on the
# frame count (frames at distance <= 1 are always attended), so CPU adds a 32-frame grid of the same token count.
SHAPE_SETS: dict[str, list[dict[str, Any]]] = {
    "cpu": [
        dict(grid=(8, 32, 32), heads=4, dim=64, dtype="float32", methods={
            "radial": [(0, dict(decay_factor=0.2, block_size=64, sink=False)),
                       (0, dict(decay_factor=0.2, block_size=64, sink=True))],
            "sliding_tile": [(0, dict(tile=(2, 8, 8), window=(1, 3, 3))),
                             (0, dict(tile=(2, 8, 8), window=(2, 3, 3))),
                             (0, dict(tile=(2, 8, 8), window=(3, 3, 3)))],
            "vmoba": [(0, dict(chunk_t=1, chunk_hw=(8, 8), chunk_thw=(2, 8, 8), select="topk", topk=2)),
                      (1, dict(chunk_t=1, chunk_hw=(8, 8), chunk_thw=(2, 8, 8), select="topk", topk=4)),
                      (2, dict(chunk_t=1, chunk_hw=(8, 8), chunk_thw=(2, 8, 8), select="topk", topk=8))],
        }),
        dict(grid=(32, 16, 16), heads=4, dim=64, dtype="float32", methods={
            "radial": [(0, dict(decay_factor=0.2, block_size=64, sink=True)),
                       (0, dict(decay_factor=0.2, block_size=64, sink=False))],
        }),
    ],
    "gpu": [
        dict(grid=grid, heads=12, dim=128, dtype="bfloat16", methods={
            "radial": [(0, dict(decay_factor=0.2, block_size=128, sink=True)),
                       (0, dict(decay_factor=1.0, block_size=128, sink=True))],
            "sliding_tile": [(0, dict(tile=(6, 8, 8), window=(3, 3, 3))),
                             (0, dict(tile=(6, 8, 8), window=(3, 3, 5)))],
            "vmoba": [(layer, dict(chunk_t=2, chunk_hw=(8, 8), chunk_thw=(3, 8, 8), select="topk", topk=4))
                      for layer in (0, 1, 2)]
                     + [(0, dict(chunk_t=2, chunk_hw=(8, 8), chunk_thw=(3, 8, 8), select="threshold",
                                 threshold=0.25))],
        })
        for grid in ((21, 30, 52), (21, 45, 80))
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default=None,
                   help="shape set (default: gpu where CUDA is available, else cpu)")
    p.add_argument("--grid", default=None, help="only this token grid T,H,W (uses the set's first entry's options)")
    p.add_argument("--methods", nargs="*", default=None, help="sparse methods to run (default: every registered one)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per kernel (default: 5 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per kernel first")
    p.add_argument("--impls", nargs="*", default=["fast", "gather"], choices=["fast", "gather", "reference"],
                   help="sparse implementations to time (gather / reference: radial and sliding_tile only; "
                        "default: fast gather)")
    p.add_argument("--kernels", nargs="*", default=None, choices=["sdpa", "flex", "flash", "xformers"],
                   help="dense kernels to time (default: every one that runs here; sdpa is always timed)")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives ratios robust to other jobs' load")
    return p.parse_args(argv)


def _qkv(shape: dict, batch: int, device: torch.device, requires_grad: bool = False) -> list[torch.Tensor]:
    length = shape["grid"][0] * shape["grid"][1] * shape["grid"][2]
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(batch, length, shape["heads"], shape["dim"], device=device, generator=g,
                        dtype=getattr(torch, shape["dtype"])).requires_grad_(requires_grad) for _ in range(3)]


def _dense_kernels(device: torch.device, wanted: list[str] | None = None) -> list[str]:
    status = available(device)
    return [name for name in ("sdpa", "flex", "flash", "xformers")
            if status[name].available and (wanted is None or name in wanted or name == "sdpa")]


def _fwd(backend, ctx, q, k, v):
    def run():
        with torch.no_grad():
            return backend.forward(q, k, v, ctx)
    return run


def _fwdbwd(backend, ctx, q, k, v):
    grad = torch.randn_like(q)

    def run():
        out = backend.forward(q, k, v, ctx)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
    return run


def _build_seconds(backend, ctx, impl: str, device: torch.device) -> float:
    """Seconds to build a static method's layout and `impl`'s artefact (gather plan / FlexAttention block mask /
    reference mask) on `device` from nothing: what a new (grid, options) costs before its first call."""
    t0 = time.perf_counter()
    layout = backend.build_layout(tuple(ctx.grid), getattr(ctx.config, backend.name))
    {"gather": layout.gather_plan, "fast": layout.block_mask, "reference": layout.reference_mask}[impl](device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _short(reason: str | None) -> str | None:
    return reason.split(" (")[0] if reason else None


def bench_shape(shape: dict, args, device: torch.device, methods: list[str]) -> list[dict]:
    grid = tuple(shape["grid"])
    repeats = args.repeats or (10 if device.type == "cuda" else 5)
    q, k, v = _qkv(shape, args.batch, device)
    qg, kg, vg = _qkv(shape, args.batch, device, requires_grad=True)
    kernels = _dense_kernels(device, args.kernels)

    # what to run: (row, forward fn, forward+backward fn or reason)
    entries: list[tuple[dict, Any, Any]] = []
    for name in kernels:
        backend = get_backend(name, device)
        ctx = AttentionContext(grid=grid, config=AttentionConfig(kernel=name), mask_cache=MaskCache())
        bwd_reason = _short(backend.backward_reason(device))
        entries.append((dict(method=f"dense:{name}", impl="", options="", layer=0), _fwd(backend, ctx, q, k, v),
                        bwd_reason or _fwdbwd(backend, ctx, qg, kg, vg)))
    for method in methods:
        for layer, options in shape["methods"].get(method, []):
            for impl in args.impls:
                if impl != "fast" and method not in STATIC:
                    continue  # gather / reference rows: the static methods only (VMoBA keeps its impl=fast rows)
                backend = get_backend(method, device)
                cfg = AttentionConfig(backend=method, impl=impl, **{method: CONFIG_CLASSES[method](**options)})
                ctx = AttentionContext(grid=grid, config=cfg, layer=layer, mask_cache=MaskCache())
                bwd_reason = backend.backward_reason(device)
                if bwd_reason is None and device.type == "cpu" and impl == "fast":
                    bwd_reason = "CPU: no Flex backward"
                label = ", ".join(f"{key}={val}" for key, val in options.items())
                entries.append((dict(method=method, impl=impl, options=label, layer=layer, _backend=backend,
                                     _ctx=ctx), _fwd(backend, ctx, q, k, v),
                                bwd_reason or _fwdbwd(backend, ctx, qg, kg, vg)))

    rows, failed = [], []
    for row, _, _ in entries:  # the static masks alone, on a throwaway cache: layout + this impl's artefact
        if row.get("method") in STATIC:
            row["build_s"] = _build_seconds(row["_backend"], row["_ctx"], row["impl"], device)
    for row, fwd, _ in entries:  # first call: mask build + compile
        t0 = time.perf_counter()
        try:
            fwd()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # a kernel that cannot run here: its row says why, the others are timed
            first = first_line(err)
            print(f"  [{grid}] {row['method']} {row['impl']} {row['options']} failed: {first}", flush=True)
            failed.append(dict(grid="x".join(map(str, grid)), method=row["method"], impl=row["impl"],
                               options=row["options"], layer=row["layer"], error=first[:200]))
            row["_failed"] = True
            continue
        row["first_s"] = time.perf_counter() - t0
        if "_backend" in row:  # right after its own call: VMoBA's density is that of the last call
            row["density"] = row["_backend"].density(row["_ctx"])
        print(f"  [{grid}] first call {row['method']} {row['impl']} {row['options']}: {row['first_s']:.1f}s",
              flush=True)

    entries = [entry for entry in entries if not entry[0].pop("_failed", False)]
    if not any(row["method"] == "dense:sdpa" for row, _, _ in entries):
        return failed  # the reference kernel itself failed: nothing to compare against
    print(f"  [{grid}] timing forward ({repeats} interleaved rounds)...", flush=True)
    fwd_times = time_alternating({i: fwd for i, (_, fwd, _) in enumerate(entries)}, warmup=args.warmup,
                                 repeats=repeats, device=device)
    bwd_times: dict[int, list[float]] = {}
    if not args.no_backward:
        runnable = {i: fb for i, (_, _, fb) in enumerate(entries) if callable(fb)}
        print(f"  [{grid}] timing forward+backward ({len(runnable)} kernels)...", flush=True)
        bwd_times = time_alternating(runnable, warmup=args.warmup, repeats=repeats, device=device)

    dense_fwd = {row["method"]: median(fwd_times[i]) for i, (row, _, _) in enumerate(entries)
                 if row["method"].startswith("dense:")}
    dense_bwd = {row["method"]: median(bwd_times[i]) for i, (row, _, _) in enumerate(entries)
                 if row["method"].startswith("dense:") and i in bwd_times}
    best_fwd = min(dense_fwd.values())
    best_bwd = min(dense_bwd.values()) if dense_bwd else None
    for i, (row, _, fb) in enumerate(entries):
        backend, ctx = row.pop("_backend", None), row.pop("_ctx", None)
        density = row.pop("density", 1.0)
        blocks = None
        if row["method"] in ("radial", "sliding_tile"):
            info = sparse_pattern(row["method"], grid, **getattr(ctx.config, row["method"]).__dict__).info
            blocks = info.get("block_density", info.get("kernel_block_density"))
        t_fwd = median(fwd_times[i])
        ideal = 1.0 / density
        out = dict(grid="x".join(map(str, grid)), **row, density=density, blocks=blocks, fwd_ms=1e3 * t_fwd,
                   x_sdpa=dense_fwd["dense:sdpa"] / t_fwd, x_best=best_fwd / t_fwd, ideal=ideal,
                   frac=best_fwd / t_fwd / ideal)
        if i in bwd_times:
            t_bwd = median(bwd_times[i])
            out.update(fwdbwd_ms=1e3 * t_bwd, fwdbwd_x_best=best_bwd / t_bwd, fwdbwd_frac=best_bwd / t_bwd / ideal)
        elif args.no_backward:
            out.update(fwdbwd_ms="skipped")
        else:
            out.update(fwdbwd_ms=f"n/a ({fb})")
        rows.append(out)
    return rows + failed


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    set_name = args.shapes or ("gpu" if device.type == "cuda" else "cpu")
    shapes = SHAPE_SETS[set_name]
    if args.grid:
        grid = tuple(int(x) for x in args.grid.split(","))
        shapes = [dict(shapes[0], grid=grid)]
    status = available(device)
    registered = [m for m in CONFIG_CLASSES if m in status and status[m].available]
    methods = [m for m in (args.methods or registered) if m in registered]
    missing = sorted(set(args.methods or []) - set(registered))
    if missing:
        raise SystemExit(f"not registered / cannot run here: {missing}; available sparse methods: {registered}")
    print(f"attention bench on {device}: shapes={set_name} methods={methods}", flush=True)

    rows = []
    meta = dict(shapes=shapes, methods=methods, impls=args.impls, kernels=args.kernels, repeats=args.repeats,
                warmup=args.warmup, batch=args.batch, threads=torch.get_num_threads(),
                available={name: str(s) for name, s in status.items()})
    for done, shape in enumerate(shapes, 1):
        rows += bench_shape(shape, args, device, methods)
        # after every shape: a run stopped by its time budget (bench.gpu) keeps the shapes it finished
        write_result("attention", rows, meta=dict(meta, shapes_done=done))
    columns = ["grid", "method", "impl", "options", "layer", "density", "blocks", "fwd_ms", "x_sdpa", "x_best", "ideal",
               "frac", "fwdbwd_ms", "fwdbwd_x_best", "fwdbwd_frac", "build_s", "first_s", "error"]
    print_table(rows, columns, title=f"attention: {set_name} shapes, batch {args.batch}, heads/dim per shape "
                                     f"{[(s['heads'], s['dim'], s['dtype']) for s in shapes]}")
    return rows


if __name__ == "__main__":
    main()

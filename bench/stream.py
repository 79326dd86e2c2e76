"""Long video: time per chunk against chunk index, with the causal KV cache (finite window and global) and without.

    ./launch.sh bench stream                      # 64 chunks, tiny causal model (random weights), CPU
    ./launch.sh bench stream --chunks 16 --steps 2 --uncached 8

Per chunk index: wall seconds and KV bytes of a finite window (sink 1 + window 2 chunks: cost flat however long the
video runs), of a global window (every earlier chunk: grows), and of the reference without KV cache (recomputes the
whole history each step: grows fastest; run for the first `--uncached` chunks). Side by side: one bidirectional
pass of the same model size over the same total length (the whole clip at once), per chunk; and the bundled causal
checkpoint (or --checkpoint) at its own size and window. Prints the table and
the ratios (window: chunk N / chunk 8; target <= 1.15 at 64), writes bench/results/stream-<machine>.json and a plot of
seconds per chunk against chunk index (docs/stream-time-per-chunk.png). Speed comes from the model's shape, not its
training, so random weights measure the same as trained ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.cache import psnr
from bench.common import machine_info, print_table, write_result

PLOT = Path(__file__).resolve().parent.parent / "docs" / "stream-time-per-chunk.png"


def _pipe(window: int | None, cache: list[str], height: int, seed: int = 0):
    from vdiff.config import CausalConfig, model_preset
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    cfg = model_preset("tiny", causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=window))
    config = PipelineConfig(num_frames=2, height=height, width=height, guidance_scale=1.0, cache=cache)
    return VideoPipeline.from_model_config(cfg, config=config, seed=seed)


def _per_chunk(pipe, chunks: int, steps: int, repeats: int, cache=None) -> list[dict]:
    """Per chunk: the median over `repeats` streams of its wall seconds, its KV bytes / keys attended, its frames."""
    runs = []
    for _ in range(repeats):
        rows, t_prev = [], time.perf_counter()
        for chunk in pipe.stream("a red circle moving right", num_chunks=chunks, seed=0, num_inference_steps=steps,
                                 cache=cache):
            now = time.perf_counter()
            rows.append({"seconds": now - t_prev, "kv_bytes": chunk.stats["kv_bytes"],
                         "keys": chunk.stats["tokens_attended"], "frames": chunk.frames})
            t_prev = now
        runs.append(rows)
    return [dict(runs[0][i], seconds=statistics.median(r[i]["seconds"] for r in runs)) for i in range(chunks)]



def _bidirectional(total_frames: int, steps: int, height: int) -> float:
    from vdiff.config import model_preset
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    pipe = VideoPipeline.from_model_config(model_preset("tiny", rope_max_seq_len=max(256, total_frames)),
                                           config=PipelineConfig(num_frames=total_frames, height=height, width=height,
                                                                 guidance_scale=1.0, cache=["text_kv"]))
    t0 = time.perf_counter()
    pipe("a red circle moving right", num_frames=total_frames, seed=0, num_inference_steps=steps)
    return time.perf_counter() - t0


def _plot(series: dict[str, list[float]], path: Path) -> None:
    """A small line plot (PIL only): seconds per chunk against chunk index, one colour per series."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 48
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    top = max(max(v) for v in series.values()) * 1.1
    n = max(len(v) for v in series.values())
    d.line([(pad, pad), (pad, h - pad), (w - pad, h - pad)], fill="black")
    d.text((pad, 12), f"seconds per chunk (max {top:.3g} s) vs chunk index (1..{n})", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for k, (name, ys) in enumerate(series.items()):
        pts = [(pad + (w - 2 * pad) * i / max(1, n - 1), h - pad - (h - 2 * pad) * y / top) for i, y in enumerate(ys)]
        d.line(pts, fill=colours[k % 4], width=2)
        d.text((w - pad - 190, pad + 16 * k), name, fill=colours[k % 4])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="./launch.sh bench stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=64, help="chunks per stream (default 64)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per chunk (default 4)")
    p.add_argument("--uncached", type=int, default=16, help="chunks of the no-KV-cache reference (default 16)")
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (default 32: 8 x 8 latent)")
    p.add_argument("--repeats", type=int, default=3, help="streams per variant; per-chunk medians (default 3)")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/stream-time-per-chunk.png")
    p.add_argument("--checkpoint", default=None,
                   help="a causal pipeline streamed at its own size and window beside the random models (default: "
                        "the bundled checkpoints/shapes-causal when present; 'none' to leave it out)")
    args = p.parse_args(argv)
    if args.chunks < 8:
        p.error("--chunks must be >= 8 (the ratio is chunk N / chunk 8)")
    torch.manual_seed(0)
    r = args.repeats
    window = _per_chunk(_pipe(2, ["text_kv", "causal_kv"], args.size), args.chunks, args.steps, r)
    global_ = _per_chunk(_pipe(None, ["text_kv", "causal_kv"], args.size), args.chunks, args.steps, r)
    uncached = _per_chunk(_pipe(2, ["text_kv"], args.size), min(args.uncached, args.chunks), args.steps, 1)
    from vdiff.cache import CausalKVCacheConfig

    external = {mode: _per_chunk(_pipe(2, ["text_kv", "causal_kv"], args.size), args.chunks, args.steps, r,
                                 cache=["text_kv", CausalKVCacheConfig(external=mode)]) for mode in ("split", "reuse")}
    bidir_s = _bidirectional(2 * args.chunks, args.steps, args.size)
    from vdiff.runtime import bundled_causal_checkpoint

    checkpoint = args.checkpoint or bundled_causal_checkpoint()
    trained = None
    if checkpoint is not None and checkpoint != "none":
        from vdiff.pipeline import VideoPipeline

        trained = _per_chunk(VideoPipeline.from_pretrained(checkpoint), args.chunks, args.steps, r)
    rows = []
    for i in range(args.chunks):
        rows.append({
            "chunk": i + 1, "window_s": window[i]["seconds"], "window_kv_bytes": window[i]["kv_bytes"],
            "window_keys": window[i]["keys"], "global_s": global_[i]["seconds"],
            "global_kv_bytes": global_[i]["kv_bytes"],
            "external_split_s": external["split"][i]["seconds"], "external_reuse_s": external["reuse"][i]["seconds"],
            "global_keys": global_[i]["keys"], "uncached_s": uncached[i]["seconds"] if i < len(uncached) else None,
            **({"checkpoint_s": trained[i]["seconds"], "checkpoint_kv_bytes": trained[i]["kv_bytes"]}
               if trained is not None else {}),
        })
    shown = [r for r in rows if r["chunk"] in {1, 2, 4, 8, 16, 32, 64, args.chunks}]
    print_table(shown, ["chunk", "window_s", "window_keys", "window_kv_bytes", "global_s", "global_keys",
                        "global_kv_bytes", "uncached_s", "external_reuse_s"]
                + (["checkpoint_s", "checkpoint_kv_bytes"] if trained is not None else []),
                title=f"stream: tiny causal model, {args.size} x {args.size}, 2 frames per chunk, {args.steps} steps")
    last = args.chunks - 1
    summary = {
        "window_ratio_last_over_8": window[last]["seconds"] / window[7]["seconds"],
        "global_ratio_last_over_8": global_[last]["seconds"] / global_[7]["seconds"],
        "window_kv_bytes_flat": window[last]["kv_bytes"] == window[7]["kv_bytes"],
        "bidirectional_total_s": bidir_s, "window_total_s": sum(r["seconds"] for r in window),
        "global_total_s": sum(r["seconds"] for r in global_), "goal_window_ratio": 1.15,
    }
    if trained is not None:  # the trained checkpoint at its own size and window (its own frames per chunk)
        summary.update(checkpoint=str(checkpoint),
                       checkpoint_ratio_last_over_8=trained[last]["seconds"] / trained[7]["seconds"],
                       checkpoint_kv_bytes_flat=trained[last]["kv_bytes"] == trained[7]["kv_bytes"],
                       checkpoint_total_s=sum(x["seconds"] for x in trained))
        print(f"{checkpoint}: chunk {args.chunks} / chunk 8 = {summary['checkpoint_ratio_last_over_8']:.3f} (goal <= "
              f"1.15), KV bytes flat: {summary['checkpoint_kv_bytes_flat']}", flush=True)
    for mode, runs in external.items():  # block-external attention on the finite window: speed and error
        summary[f"external_{mode}_total_s"] = sum(x["seconds"] for x in runs)
        summary[f"external_{mode}_psnr_db"] = psnr(np.concatenate([x["frames"] for x in runs]),
                                                    np.concatenate([x["frames"] for x in window]))
        summary[f"external_{mode}_speedup"] = summary["window_total_s"] / summary[f"external_{mode}_total_s"]
    print(f"window: chunk {args.chunks} / chunk 8 = {summary['window_ratio_last_over_8']:.3f} (goal <= 1.15), KV bytes "
          f"flat: {summary['window_kv_bytes_flat']}; global: {summary['global_ratio_last_over_8']:.3f}; "
          f"total {summary['window_total_s']:.2f} s (window) vs {bidir_s:.2f} s for one bidirectional pass over "
          f"{2 * args.chunks} frames", flush=True)
    for mode in external:
        print(f"block_external={mode}: {summary[f'external_{mode}_speedup']:.2f}x the window's time, frames at "
              f"{summary[f'external_{mode}_psnr_db']:.1f} dB PSNR vs causal_kv alone", flush=True)
    if not args.no_plot:
        series = {"window (sink 1 + 2)": [r["seconds"] for r in window], "global": [r["seconds"] for r in global_],
                  "no KV cache": [r["seconds"] for r in uncached]}
        if trained is not None:
            series[f"{Path(checkpoint).name} (trained)"] = [x["seconds"] for x in trained]
        _plot(series, PLOT)
        print(f"wrote {PLOT}")
    write_result("stream", rows, {"summary": summary, "args": vars(args), "threads": machine_info()["torch_threads"]})
    return rows


if __name__ == "__main__":
    main()

"""One video on several processes: time, scaling efficiency, bytes exchanged, memory and exactness per split.

    ./launch.sh bench parallel                                # CPU: 1 process vs cfg=2 and ulysses=2, 1 thread each
    ./launch.sh bench parallel --splits cfg2 ulysses2 cfg2xulysses2 --size 64 --frames 16   # GPUs (one per rank)
    ./launch.sh bench parallel --shape wan480 --splits cfg2 cfg2xulysses4    # 8 GPUs: Wan2.1-1.3B, 81 x 480 x 832

Every configuration runs under torchrun (gloo on CPU, NCCL on GPUs) on the same random-weight pipeline (speed comes
from the shape, not the training): `--shape tiny`, a saved tiny pipeline of --layers layers at --frames x --size x
--size; `--shape wan480`, the wan2.1-1.3b transformer in bf16 at 81 x 480 x 832 (32,760 tokens) with bench cache's
small random text encoder and AutoencoderKLWan, built by every rank from seed 0 (CUDA only). The same prompts, seed
and settings; "1" is one process. Per configuration:
median denoise and end-to-end seconds over --repeats videos (after a warm-up), the scaling efficiency
E(N) = T1 / (N * TN) of both, the bytes each rank sends per denoising step through torch.distributed (counted by
wrapping the collectives, this benchmark only), each rank's peak memory (resident set on CPU, CUDA allocator peak on
GPU) and the largest difference of the final latents to one process. Prints the table and writes
bench/results/parallel-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLITS = {"1": (1, 1), "cfg2": (2, 1), "ulysses2": (1, 2), "cfg2xulysses2": (2, 2), "ulysses4": (1, 4),
          "cfg2xulysses4": (2, 4)}
PROMPT = "a red circle moving right"
GUIDANCE = {"tiny": 4.0, "wan480": 5.0}  # classifier-free guidance on: cfg=2 has its two branches to split


def _wan480_pipeline(parallel, device):
    """bench cache's random wan2.1-1.3b pipeline (bf16), the same weights on every rank (seed 0), under `parallel`."""
    import torch

    from bench.cache import _wan_random
    from vdiff.pipeline import VideoPipeline

    torch.manual_seed(0)
    base = _wan_random(torch.device("cpu")).to(device)
    return VideoPipeline(base.transformer, base.text_encoder, base.vae, base.scheduler, base.config, parallel)


def _save_pipeline(folder: Path, args: argparse.Namespace) -> Path:
    from vdiff.config import model_preset
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    cfg = PipelineConfig(num_frames=args.frames, height=args.size, width=args.size,
                         num_inference_steps=args.steps, guidance_scale=GUIDANCE["tiny"])
    model = model_preset("tiny", num_layers=args.layers, rope_max_seq_len=max(1024, args.frames))
    return VideoPipeline.from_model_config(model, config=cfg, seed=0).save_pretrained(folder)


def _launch(split: str, folder: Path, out: Path, args: argparse.Namespace) -> list[dict]:
    from vdiff.runtime import free_port

    cfg, ulysses = SPLITS[split]
    nproc = cfg * ulysses
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "bench.parallel", "--worker", str(folder), str(out), split,
           str(args.repeats), str(args.steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench parallel: {split} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"{split}-rank{r}.json").read_text()) for r in range(nproc)]


class _ByteCounter:
    """Bytes this rank passes to torch.distributed's collectives (send side), while `counting`."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.bytes, self.counting = 0, False
        for name in ("all_to_all_single", "all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), name))

    def _wrap(self, fn, name):
        def counted(*args, **kwargs):
            if self.counting:
                tensor = args[1] if name in ("all_to_all_single", "all_gather", "all_gather_into_tensor") else args[0]
                self.bytes += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)

        return counted


def _peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def _worker(folder: str, out: str, split: str, repeats: str, steps: str) -> None:
    import statistics

    import torch
    import torch.distributed as dist

    from vdiff import ParallelConfig
    from vdiff.parallel.mesh import init_distributed, parallel_device
    from vdiff.pipeline import VideoPipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    counter = _ByteCounter()
    init_distributed()
    rank, device = dist.get_rank(), parallel_device()
    cfg, ulysses = SPLITS[split]
    parallel = ParallelConfig(cfg=cfg, ulysses=ulysses) if split != "1" else None
    shape = "wan480" if folder == "wan480" else "tiny"
    pipe = (_wan480_pipeline(parallel, device) if shape == "wan480"
            else VideoPipeline.from_pretrained(folder, parallel=parallel, device=device))
    sampling = {"num_inference_steps": int(steps), "guidance_scale": GUIDANCE[shape]}
    latents: dict = {}

    def run():
        out_ = pipe(PROMPT, seed=0, **sampling,
                    callback=lambda i, n, lat: latents.__setitem__("x", lat.detach().cpu().clone()))
        return out_.stats

    run()  # warm-up (first-call allocations, kernels)
    denoise, total, sent = [], [], []
    for _ in range(int(repeats)):
        counter.bytes, counter.counting = 0, True
        stats = run()
        counter.counting = False
        denoise.append(stats.denoise_s)
        total.append(stats.total_s)
        sent.append(counter.bytes / max(1, len(stats.step_s)))
    torch.save(latents["x"], Path(out, f"{split}-rank{rank}-latents.pt"))
    Path(out, f"{split}-rank{rank}.json").write_text(json.dumps({
        "denoise_s": statistics.median(denoise), "total_s": statistics.median(total),
        "bytes_per_step": statistics.median(sent), "peak_memory_bytes": _peak_memory_bytes(device),
        "tokens": stats.tokens}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="./launch.sh bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", default=["cfg2", "ulysses2"], choices=[s for s in SPLITS if s != "1"],
                   help="configurations beside one process (default: cfg2 ulysses2)")
    p.add_argument("--shape", choices=["tiny", "wan480"], default="tiny",
                   help="tiny (any device) or wan480 (wan2.1-1.3b, 81 x 480 x 832, bf16; CUDA)")
    p.add_argument("--frames", type=int, default=None, help="video frames, --shape tiny (default 8)")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels, --shape tiny (default 32)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 4 tiny, 10 wan480)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers, --shape tiny (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed videos per configuration; medians (default 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    args = p.parse_args(argv)
    if args.shape == "wan480":
        for name in ("frames", "size", "layers"):
            if getattr(args, name) is not None:
                p.error(f"--{name} is for --shape tiny; wan480 is wan2.1-1.3b (30 layers) at 81 x 480 x 832")
        args.steps = 10 if args.steps is None else args.steps
    else:
        defaults = {"frames": 8, "size": 32, "steps": 4, "layers": 4}
        for name, value in defaults.items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    for name in ("frames", "size", "steps", "layers", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1")

    import torch

    from bench.common import print_table, write_result

    if args.shape == "wan480":
        need = max(SPLITS[s][0] * SPLITS[s][1] for s in args.splits)
        have = torch.cuda.device_count()
        if have < need:
            raise SystemExit(f"bench parallel --shape wan480 needs {need} CUDA devices for --splits "
                             f"{' '.join(args.splits)} (one per rank); this machine has {have}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = "wan480" if args.shape == "wan480" else _save_pipeline(Path(tmp, "pipeline"), args)
        results = {split: _launch(split, folder, Path(tmp), args) for split in ["1", *args.splits]}
        reference = torch.load(Path(tmp, "1-rank0-latents.pt"))
        diffs = {split: max((torch.load(Path(tmp, f"{split}-rank{r}-latents.pt")) - reference).abs().max().item()
                            for r in range(len(ranks))) for split, ranks in results.items()}
    one = results["1"][0]
    rows = []
    for split, ranks in results.items():
        n = len(ranks)
        denoise = max(r["denoise_s"] for r in ranks)  # the video is done when its slowest rank is
        total = max(r["total_s"] for r in ranks)
        rows.append({"split": split, "ranks": n, "denoise_s": denoise, "total_s": total,
                     "E_denoise": one["denoise_s"] / (n * denoise), "E_total": one["total_s"] / (n * total),
                     "bytes_per_step": max(r["bytes_per_step"] for r in ranks),
                     "peak_mem_mib": max(r["peak_memory_bytes"] for r in ranks) / 2**20,
                     "max_diff": diffs[split], "tokens": ranks[0]["tokens"]})
    print_table(rows, ["split", "ranks", "denoise_s", "total_s", "E_denoise", "E_total", "bytes_per_step",
                       "peak_mem_mib", "max_diff"],
                title=(f"parallel: tiny model ({args.layers} layers), {args.frames} x {args.size} x {args.size}"
                       if args.shape == "tiny" else "parallel: wan2.1-1.3b (random, bf16), 81 x 480 x 832")
                      + f", {args.steps} steps, guidance {GUIDANCE[args.shape]:g}, "
                        f"{args.threads} thread(s) per process")
    write_result("parallel", rows, meta=vars(args))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:7])
    else:
        main()

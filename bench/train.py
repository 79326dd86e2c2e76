"""Training throughput: tokens/s and model FLOPs utilisation (MFU).

    ./launch.sh bench train                 # the tiny recipe through the real Trainer loop on this machine (CPU ok)
    ./launch.sh bench train --gpu           # + Wan2.1-1.3B shape, 480p x 81 frames (32,760 tokens), bf16, one GPU,
                                            #   dense and every sparse backend that can train here

Model FLOPs per step = 3 x forward FLOPs (forward + backward), forward = 2 x (matmul params) x tokens
+ self-attention 4 x L^2 x D per layer (scaled by the backend's density) + cross-attention 4 x L x S x D per layer.
Gradient checkpointing's recomputation is not counted (as in the usual MFU definition). Peak: bf16 dense tensor
throughput of the GPU (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine_info, print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "b200": 2250.0}


def model_flops_per_token(cfg, tokens: int, text_len: int, density: float = 1.0) -> float:
    """Forward FLOPs per token of a VideoDiT (matmuls + attention)."""
    d, layers = cfg.hidden_size, cfg.num_layers
    per_layer_params = 4 * d * d + 4 * d * d + 2 * d * cfg.ffn_dim  # self-attn qkvo, cross-attn qkvo, FFN
    matmul = 2 * per_layer_params * layers + 2 * d * cfg.out_channels * math.prod(cfg.patch_size)
    attn = layers * (4 * tokens * d * density + 4 * text_len * d)
    return matmul + attn


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_tiny(steps: int) -> dict:
    """The tiny CPU recipe, end to end through Trainer (data, text encoder, AdamW, EMA, logging)."""
    from train.config import load_recipe
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(ROOT / "configs" / "train" / "tiny.yaml", [
            f"output_dir={out}", f"train.max_steps={steps}", f"train.checkpoint_every={steps * 10}",
            "validation.at_end=false", "train.export=false"])
        trainer = Trainer(recipe)
        trainer.run()
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][2:]  # warm-up
    cfg = recipe.model.to_model_config()
    tokens = trainer.tokens_per_sample
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    flops = 3 * model_flops_per_token(cfg, tokens, recipe.text_max_length) * tps
    return {"case": "tiny recipe (Trainer loop)", "device": str(trainer.device), "precision": "fp32",
            "backend": "dense", "tokens_per_sample": tokens, "global_batch": recipe.train.batch_size,
            "s_per_step": statistics.median(r["step_s"] for r in rows), "tokens_per_s": tps,
            "model_tflops": flops / 1e12, "mfu": None}


# --gpu-shape: (preset, latent (F, H, W), text tokens, case label)
GPU_SHAPES = {
    "wan480": ("wan2.1-1.3b", (21, 60, 104), 512, "wan2.1-1.3b 480p x 81f"),  # 81 frames, 480 x 832, Wan VAE
    "tiny": ("tiny", (4, 16, 16), 16, "tiny preset (dry run)"),  # bench.gpu --dry-run: the same code on CPU
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_wan_gpu(backend: str, steps: int, checkpointing: bool, shape: str = "wan480",
                  device: torch.device | None = None) -> dict:
    """Wan2.1-1.3B shape, one GPU, bf16 autocast, AdamW: one training step on a 480p x 81-frame latent
    (`shape="tiny"` on any device: the dry run of the same step)."""
    from vdiff.attention import AttentionContext, get_backend
    from vdiff.config import AttentionConfig, model_preset
    from vdiff.diffusion.flow import add_noise, flow_loss, timesteps_of
    from vdiff.models.dit import VideoDiT

    device = device or torch.device("cuda")
    preset, latent, text_len, case = GPU_SHAPES[shape]
    cfg = model_preset(preset)
    model = VideoDiT.from_model_config(cfg).to(device)
    model.set_attention(AttentionConfig(backend=backend))
    if checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    grid = model.token_grid(latent)
    tokens = math.prod(grid)
    x0 = torch.randn(1, cfg.in_channels, *latent, device=device)
    text = torch.randn(1, text_len, cfg.text_dim, device=device)

    def step():
        noise = torch.randn_like(x0)
        s = torch.rand(1, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = model(add_noise(x0, noise, s), timesteps_of(s), text, return_dict=False)[0]
        flow_loss(v, x0, noise).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, the sparse masks
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    density = get_backend(backend if backend != "dense" else "sdpa", device).density(
        AttentionContext(grid=grid, config=AttentionConfig(backend=backend))) if backend != "dense" else 1.0
    flops = 3 * model_flops_per_token(cfg, tokens, text_len, density) * tokens / dt
    peak = peak_tflops() if device.type == "cuda" else None
    return {"case": case, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else str(device),
            "precision": "bf16", "backend": backend, "tokens_per_sample": tokens, "global_batch": 1, "s_per_step": dt,
            "tokens_per_s": tokens / dt, "model_tflops": flops / 1e12, "mfu": flops / 1e12 / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="./launch.sh bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="tiny recipe steps (the first 2 are warm-up)")
    parser.add_argument("--gpu", action="store_true", help="also the Wan2.1-1.3B 480p x 81-frame shape on one GPU")
    parser.add_argument("--gpu-steps", type=int, default=5)
    parser.add_argument("--backends", default="dense,radial,sliding_tile,vmoba")
    parser.add_argument("--no-checkpointing", action="store_true", help="GPU case without gradient checkpointing")
    parser.add_argument("--gpu-shape", choices=sorted(GPU_SHAPES), default="wan480",
                        help="shape of the --gpu case (tiny: the same step on CPU, for bench.gpu --dry-run)")
    parser.add_argument("--skip-recipe", action="store_true", help="skip the tiny recipe row (the Trainer loop)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.gpu and not on_gpu and args.gpu_shape != "tiny":
        raise SystemExit("--gpu needs a CUDA device (none found); --gpu-shape tiny runs the same step on CPU")
    columns = ["case", "device", "precision", "backend", "tokens_per_sample", "global_batch", "s_per_step",
               "tokens_per_s", "model_tflops", "mfu", "error"]
    meta = {"args": vars(args), "machine": machine_info()["cpu"]}
    rows = [] if args.skip_recipe else [bench_tiny(args.steps)]
    if args.gpu:
        device = torch.device("cuda" if on_gpu else "cpu")
        backends = args.backends.split(",")
        for i, backend in enumerate(backends):
            t0 = time.perf_counter()
            try:
                rows.append(bench_wan_gpu(backend, args.gpu_steps, not args.no_checkpointing, args.gpu_shape, device))
            except Exception as err:  # report the backend that cannot run and why, keep measuring the others
                rows.append({"case": GPU_SHAPES[args.gpu_shape][3], "backend": backend, "error": str(err)[:200]})
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = rows[-1]
            print(f"bench train: {backend} ({i + 1}/{len(backends)}) in {time.perf_counter() - t0:.0f} s: "
                  f"{row.get('s_per_step', float('nan')):.3f} s/step{' ' + row['error'] if 'error' in row else ''}",
                  flush=True)
            write_result("train", rows, meta)  # a run killed at its budget keeps the finished backends
    print_table(rows, columns, title="training throughput")
    write_result("train", rows, meta)


if __name__ == "__main__":
    main()

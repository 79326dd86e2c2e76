"""One DiT step: VideoDiT vs diffusers' WanTransformer3DModel, same config, weights and inputs, timed alternately.

    ./launch.sh bench step                       # CPU: tiny preset, 1,024 tokens, batch 2, fp32
    ./launch.sh bench step --shape wan480        # GPU: wan2.1-1.3b at 480p x 81 frames (32,760 tokens), bf16
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import median, print_table, time_alternating, write_result
from vdiff.config import model_preset
from vdiff.runtime import default_device

SHAPES = {
    # name: (preset, latent (F, H, W), batch, text tokens, dtype)
    "tiny": ("tiny", (16, 16, 16), 2, 32, "float32"),
    "wan480": ("wan2.1-1.3b", (21, 60, 104), 1, 512, "bfloat16"),
    "wan720": ("wan2.1-1.3b", (21, 90, 160), 1, 512, "bfloat16"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="model + input shape (default: wan480 on GPU, tiny on CPU)")
    p.add_argument("--kernel", default="sdpa", help="VideoDiT dense attention kernel (sdpa | flex | xformers | flash)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per model after warm-up (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    p.add_argument("--no-backward", action="store_true", help="skip the forward+backward measurement")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from diffusers import WanTransformer3DModel

    from vdiff.models.dit import VideoDiT

    device = default_device()
    shape = args.shape or ("wan480" if device.type == "cuda" else "tiny")
    preset, latent, batch, text_len, dtype_name = SHAPES[shape]
    dtype = getattr(torch, dtype_name)
    cfg = model_preset(preset, **({"num_layers": args.layers} if args.layers else {}))

    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg.to_diffusers())
    ours = VideoDiT.from_model_config(cfg)
    ours.load_state_dict(ref.state_dict())
    ref.to(device, dtype)
    ours.to(device, dtype)
    ours.set_attention(args.kernel)  # a dense kernel name: sdpa | flex | xformers | flash

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *latent, generator=g).to(device, dtype)
    t = torch.rand(batch, generator=g).mul(1000).to(device)
    ctx = torch.randn(batch, text_len, cfg.text_dim, generator=g).to(device, dtype)
    tokens = math.prod(ours.token_grid(latent)) * batch

    with torch.no_grad():
        a = ref(x, t, ctx).sample.float()
        b = ours(x, t, ctx).sample.float()
    rel_err = ((a - b).norm() / a.norm()).item()

    def fwd(model):
        def run():
            with torch.no_grad():
                model(x, t, ctx)
        return run

    def fwd_bwd(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x, t, ctx).sample.float().square().mean().backward()
        return run

    modes = {"forward": fwd}
    if not args.no_backward:
        modes["forward+backward"] = fwd_bwd
    rows = []
    for mode, make in modes.items():
        times = time_alternating({"diffusers": make(ref), "vdiff": make(ours)}, warmup=args.warmup,
                                 repeats=args.repeats, device=device)
        d, v = median(times["diffusers"]), median(times["vdiff"])
        rows.append({
            "shape": shape, "mode": mode, "tokens": tokens, "dtype": dtype_name, "kernel": args.kernel,
            "diffusers_s": d, "vdiff_s": v, "vdiff/diffusers": v / d, "vdiff_tokens_per_s": tokens / v,
            "rel_err": rel_err, "repeats": args.repeats,
        })
    print_table(rows, ["shape", "mode", "tokens", "dtype", "kernel", "diffusers_s", "vdiff_s", "vdiff/diffusers",
                       "vdiff_tokens_per_s", "rel_err"], title=f"DiT step, {preset}, latent {latent}, batch {batch}")
    write_result("step", rows, {"preset": preset, "latent": latent, "batch": batch, "text_len": text_len,
                                "params": sum(p.numel() for p in ours.parameters())})
    return rows


if __name__ == "__main__":
    main()

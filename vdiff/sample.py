"""Sample a video from a pipeline folder.

    ./launch.sh sample --checkpoint checkpoints/shapes-tiny --prompt "a red circle moving right" --out clip.mp4
    ./launch.sh sample --checkpoint DIR --prompt "..." --out clip.gif num_frames=16 num_inference_steps=20 seed=3 \\
        attention=radial cache=[text_kv,mask,step] step.threshold=0.1 sampler=euler shift=5

key=value settings (YAML values): num_frames, height, width, num_inference_steps, guidance_scale, seed,
negative_prompt, sampler (unipc | euler), shift, fps, attention (a backend name, or attention.FIELD=... for
AttentionConfig fields, e.g. attention.backend=radial attention.radial.decay_factor=0.9), cache (a list of
text_kv | mask | step | prompt; [] for none), step.FIELD=... (StepCacheConfig: threshold, warmup_steps,
max_consecutive_skips, indicator = first_block | modulated_input), lora=PATH (a LoRA file or folder, diffusers'
format) with lora_scale=S (default 1), num_chunks=N (a causal model: N chunks, chunk by chunk over the causal KV
cache), parallel.FIELD=... (ParallelConfig: cfg, ulysses, text_encoder; one video on several processes under
torchrun: `./launch.sh sample --nproc 2 parallel.cfg=2 ...`, multi-node with --nodes --node-rank --master-addr
--master-port as for training; every rank generates its share, rank 0 writes the file). Anything not given takes the
checkpoint's defaults (its vdiff.json). --check only checks the settings (exit 2 naming a bad one).

The same command is `python -m vdiff.sample` and, once vdiff is installed, `vdiff-sample`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Settings that go to VideoPipeline.__call__ as they are; fps and step.* are handled here.
CALL_KEYS = {"num_frames", "height", "width", "num_inference_steps", "guidance_scale", "seed", "negative_prompt",
             "sampler", "shift", "attention", "cache", "num_chunks"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, then key=value settings, which may sit between the flags as a user types them."""
    p = argparse.ArgumentParser(prog="./launch.sh sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pipeline folder (VideoPipeline.save_pretrained or a Wan2.1 diffusers folder); "
                        "default: the bundled model, checkpoints/shapes-tiny")
    p.add_argument("--prompt", required=True, action="append",
                   help="text prompt; repeat for a batch (outputs get _0, _1, ... suffixes)")
    p.add_argument("--out", type=Path, required=True, help="output video: .mp4, .gif or .webm")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="transformer dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--stats", type=Path, default=None, help="also write the call's stats as JSON here")
    p.add_argument("--check", action="store_true", help="check the settings and exit (0: fine, 2: a bad one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sampling settings (see above)")
    return p.parse_intermixed_args(argv)


def parallel_settings(overrides: list[str]) -> tuple[list[str], object | None]:
    """parallel.FIELD=value settings -> (the other settings, a checked ParallelConfig or None)."""
    from vdiff.config import ConfigError, parse_overrides
    from vdiff.parallel import ParallelConfig

    mine = [o for o in overrides if o.startswith("parallel.")]
    if not mine:
        return overrides, None
    import dataclasses

    values = parse_overrides(mine)["parallel"]
    known = [f.name for f in dataclasses.fields(ParallelConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"parallel: unknown setting(s) {unknown}; known: {known}")
    try:
        return [o for o in overrides if o not in mine], ParallelConfig(**values)
    except (TypeError, ValueError) as err:  # a known field with a bad value: the config's own message
        raise ConfigError(str(err)) from None


def call_kwargs(overrides: list[str]) -> tuple[dict, int | None]:
    """key=value strings -> VideoPipeline.__call__ kwargs (and an fps for saving).

    Settings are checked here, before any weights load, so a typo costs nothing; step.* settings become one
    StepCacheConfig that replaces the "step" entry of cache=[...]."""
    from vdiff.cache import StepCacheConfig
    from vdiff.config import ConfigError, from_dict, parse_overrides

    values = parse_overrides(overrides)
    fps = values.pop("fps", None)
    step = values.pop("step", None)
    unknown = sorted(set(values) - CALL_KEYS)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {sorted(CALL_KEYS | {'fps', 'step.*'})}")
    if step is not None:
        step_cfg = from_dict(StepCacheConfig, step, prefix="step.")
        cache = values.get("cache")
        if cache is None:
            raise ConfigError("step.* settings need cache=[...,step,...] to say which caches to use")
        values["cache"] = [step_cfg if c == "step" else c for c in cache]
    return values, fps


def lora_settings(overrides: list[str]) -> tuple[list[str], Path | None, float]:
    """Take `lora=PATH` and `lora_scale=S` out of the key=value settings: (the other settings, path, scale)."""
    from vdiff.config import ConfigError

    rest, found = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in ("lora", "lora_scale"):
            found[key] = value
        else:
            rest.append(item)
    if "lora_scale" in found and "lora" not in found:
        raise ConfigError("lora_scale needs lora=PATH (the adapter to scale)")
    try:
        scale = float(found.get("lora_scale", 1.0))
    except ValueError:
        raise ConfigError(f"lora_scale: expected a number, got {found['lora_scale']!r}") from None
    lora = Path(found["lora"]) if "lora" in found else None
    if lora is not None and not lora.exists():
        raise ConfigError(f"lora={lora}: no such file or folder")
    return rest, lora, scale


def _chunks_to_frames(pipe, num_chunks) -> int:
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be an int >= 1, got {num_chunks!r}")
    return num_chunks * pipe.chunk_pixel_frames  # ValueError for a bidirectional model


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the video(s) were written; 2 for a bad setting, checkpoint or output name."""
    args = parse_args(argv)
    from vdiff.config import ConfigError
    from vdiff.runtime import BUNDLED_CHECKPOINT, default_device

    try:
        overrides, lora, lora_scale = lora_settings(args.overrides)
        overrides, parallel = parallel_settings(overrides)
        kwargs, fps = call_kwargs(overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ckpt = args.checkpoint or BUNDLED_CHECKPOINT
    if not ckpt.is_dir():
        hint = " (the bundled tiny model is not built yet; pass --checkpoint DIR)" if args.checkpoint is None else ""
        print(f"error: --checkpoint {ckpt} is not a folder{hint}", file=sys.stderr)
        return 2
    if args.out.suffix.lower() not in (".mp4", ".gif", ".webm"):
        print(f"error: --out {args.out}: use a .mp4, .gif or .webm file name", file=sys.stderr)
        return 2
    if args.check:
        return 0

    import torch

    from vdiff import VideoPipeline

    device = args.device or str(default_device())
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        pipe = VideoPipeline.from_pretrained(ckpt, device=None if parallel and args.device is None else device,
                                             torch_dtype=getattr(torch, dtype_name), parallel=parallel)
    except ValueError as err:  # a parallel split the model or the process count cannot run
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _generate(args, pipe, kwargs, fps, lora, lora_scale)
    finally:
        if pipe.parallel is not None:
            pipe.parallel.close()  # every rank waits for rank 0's file, then leaves the process group together


def _generate(args: argparse.Namespace, pipe: Any, kwargs: dict, fps: Any, lora: Any, lora_scale: float) -> int:
    writer = pipe.parallel is None or pipe.parallel.is_writer
    if lora is not None:
        pipe.load_lora_weights(lora, scale=lora_scale)
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    try:
        if "num_chunks" in kwargs:  # long video: num_chunks chunks of a causal model, one clip
            kwargs["num_frames"] = _chunks_to_frames(pipe, kwargs.pop("num_chunks"))
        out = pipe(prompts, progress=writer, **kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not writer:  # every rank holds the same frames; rank 0 writes and reports
        return 0
    paths = [args.out] if len(out.prompts) == 1 else \
        [args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}") for i in range(len(out.prompts))]
    for i, path in enumerate(paths):
        out.save(path, index=i, fps=fps)
        print(f"wrote {path}  ({out.videos.shape[1]} frames, {out.videos.shape[2]}x{out.videos.shape[3]}, "
              f"prompt {out.prompts[i]!r})")
    s = out.stats
    print(f"seed {out.seed}; {s.total_s:.2f} s total, {s.step_mean_s * 1000:.1f} ms/step x {len(s.step_s)}, "
          f"{s.tokens} tokens, attention density {s.attention.density:.3f}, caches {json.dumps(s.cache)}")
    if args.stats:
        args.stats.write_text(json.dumps(dict(s.as_dict(), seed=out.seed, prompts=out.prompts), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve a text-to-video checkpoint: a web page, the `/generate` endpoint and the `/v1/videos` job API.

    python -m serve --checkpoint checkpoints/shapes-tiny            # http://127.0.0.1:7860
    python -m serve --demo                                          # the bundled tiny model (see --help)
    VDIFF_AUTH=user:secret python -m serve --checkpoint DIR --host 0.0.0.0
    python -m serve --checkpoint DIR --groups cuda:0+cuda:1,cuda:2+cuda:3 --parallel cfg=2   # 2 requests x 2 GPUs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from serve.validation import DEFAULT_MAX_CHUNKS, DEFAULT_MAX_STEPS
from vdiff.runtime import BUNDLED_CHECKPOINT as BUNDLED

ROOT = BUNDLED.parent.parent  # the checkout
DEMO_FALLBACK = ROOT / "outputs" / "demo-pipeline"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./launch.sh serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Login: set VDIFF_AUTH=user:password to require a login (page and API; gradio_client takes "
               "auth=(user, password); the /v1 API takes HTTP basic or a bearer token). Without it the server "
               "is open to whoever can reach --host, so an address other than loopback needs --no-auth.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a VideoPipeline folder (VideoPipeline.save_pretrained)")
    src.add_argument("--demo", action="store_true",
                     help=f"serve the bundled tiny model {BUNDLED.relative_to(ROOT)}; if it is not there, a tiny "
                          f"pipeline with RANDOM (untrained) weights made once under {DEMO_FALLBACK.relative_to(ROOT)}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without a login on an address other machines reach (refused without this flag "
                        "when VDIFF_AUTH is not set)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices, one pipeline and one concurrent generation each "
                        "(default: every GPU, else cpu)")
    p.add_argument("--groups", default=None,
                   help="worker groups instead of --devices: devices joined by '+' form one group that generates "
                        "one video at a time split by --parallel; groups are separated by ',' (e.g. "
                        "cuda:0+cuda:1,cuda:2+cuda:3: two requests at a time, each on two GPUs; a group of one "
                        "device is a plain worker)")
    p.add_argument("--parallel", nargs="+", default=None, metavar="KEY=VALUE",
                   help="how a multi-device group splits a video: cfg=2, ulysses=K, vae=K, text_encoder=rank0|"
                        "replicate (their product cfg x ulysses must equal the group's device count)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait for a free device; more are answered 'busy, retry' (default 8)")
    p.add_argument("--max-outputs", type=int, default=64,
                   help="videos kept in the server's temp area; older ones are deleted (default 64)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest request in latent tokens (frames x height x width after VAE and patching)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"most denoising steps a request may ask for (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS,
                   help=f"causal (long-video) models: most chunks one request may ask for; the page's 'until "
                        f"stopped' runs to it (default {DEFAULT_MAX_CHUNKS})")
    p.add_argument("--display-scale", type=int, default=None,
                   help="integer nearest-neighbour upscale of the page's videos (default: automatic, so that "
                        "clips below 128 px show with the shorter side >= 256 px; 1 = as generated). The original "
                        "stays downloadable")
    p.add_argument("--lora", type=Path, default=None,
                   help="a LoRA adapter (file or folder, diffusers' format) applied to every request; chosen by the "
                        "operator here, never by a client")
    p.add_argument("--lora-scale", type=float, default=1.0, help="scale of --lora (default 1)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def demo_checkpoint() -> tuple[Path, str | None]:
    """The bundled tiny model, or (made once) a tiny random-weight pipeline and a banner that says so."""
    from vdiff.pipeline_io import is_pipeline_folder

    if is_pipeline_folder(BUNDLED):
        return BUNDLED, None
    banner = (f"**Demo with UNTRAINED weights.** The bundled model `{BUNDLED.relative_to(ROOT)}` is not in this "
              f"checkout, so this is a tiny pipeline with random weights (`{DEMO_FALLBACK.relative_to(ROOT)}`): "
              "it exercises the whole app, but its videos are noise, not what the prompt says.")
    if not (DEMO_FALLBACK / "vdiff.json").exists():
        from serve.demo import make_random_pipeline

        print(f"[demo] {BUNDLED} not found: writing a tiny random-weight pipeline to {DEMO_FALLBACK}", flush=True)
        make_random_pipeline(DEMO_FALLBACK)
    return DEMO_FALLBACK, banner


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_server_refusal(host: str, auth: tuple[str, str] | None, no_auth: bool) -> str | None:
    """Why serving on `host` is refused (an address others reach, no login, no explicit --no-auth), or None."""
    if auth is not None or no_auth or host in LOOPBACK or host.startswith("127."):
        return None
    return (f"refusing to serve on --host {host} without a login: anyone who reaches this address could use the "
            "page and the /v1 API. Set VDIFF_AUTH=user:password, or pass --no-auth to serve an open server on "
            "purpose.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serve.app import parse_auth, serve

    try:
        auth = parse_auth(os.environ.get("VDIFF_AUTH"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refusal = open_server_refusal(args.host, auth, args.no_auth)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    banner = None
    if args.demo:
        checkpoint, banner = demo_checkpoint()
    else:
        checkpoint = args.checkpoint
        if not checkpoint.is_dir():
            print(f"error: --checkpoint {checkpoint} is not a folder (a VideoPipeline.save_pretrained output)",
                  file=sys.stderr)
            return 2
    if args.max_chunks < 1:
        print(f"error: --max-chunks must be >= 1, got {args.max_chunks}", file=sys.stderr)
        return 2
    if args.display_scale is not None and not 1 <= args.display_scale <= 64:
        print(f"error: --display-scale must be in [1, 64], got {args.display_scale}", file=sys.stderr)
        return 2
    if args.lora is not None and not args.lora.exists():
        print(f"error: --lora {args.lora}: no such file or folder", file=sys.stderr)
        return 2
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    groups = parallel = None
    try:
        if args.groups is not None:
            if devices is not None:
                raise ValueError("--groups and --devices are exclusive: a group of one device is a plain worker")
            from serve.groups import group_config, parse_groups, parse_parallel

            groups, parallel = parse_groups(args.groups), parse_parallel(args.parallel or [])
            for group in groups:
                if len(group) > 1:
                    group_config(parallel, group)
        elif args.parallel is not None:
            raise ValueError("--parallel needs --groups (the devices each split video runs on)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if banner:
        print("[demo] " + banner.replace("**", ""), flush=True)
    serve(checkpoint, host=args.host, port=args.port, devices=devices, max_queue=args.max_queue,
          max_outputs=args.max_outputs, max_tokens=args.max_tokens, max_steps=args.max_steps, auth=auth,
          banner=banner, block=True, lora=args.lora, lora_scale=args.lora_scale, max_chunks=args.max_chunks,
          display_scale=args.display_scale, groups=groups, parallel=parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())

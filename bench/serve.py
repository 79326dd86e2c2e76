"""Serving overhead and throughput: a request through the real server (raw HTTP, gradio_client and the /v1/videos
job API, over loopback) vs a direct pipeline call doing the same work (generate + write the mp4), then throughput
with 1, 2 and 4 concurrent clients; and for a causal (long-video) model, the time to the first chunk and the steady
interval between chunks followed over /v1/videos events vs a direct `pipe.stream` writing the same chunk files.

    ./launch.sh bench serve                      # tiny preset, 16 x 32 x 32, 30 steps; the bundled causal model
    ./launch.sh bench serve --checkpoint DIR --steps 30 --repeats 5 --causal-checkpoint DIR --chunks 16

Goal: the server adds <= 5% to a generation's latency, and to the first chunk and the chunk interval. One pipeline
per device, so on one device throughput stays flat with more clients (they queue); on several GPUs it should scale
with the device count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import machine_info, print_table, time_alternating, write_result
from vdiff.runtime import free_port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./launch.sh bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pipeline folder to serve (default: a tiny random-weight pipeline made in a temp folder)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed requests per latency measurement")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--clients", default="1,2,4", help="comma-separated concurrent client counts")
    p.add_argument("--causal-checkpoint", type=Path, default=None,
                   help="causal pipeline for the stream measurement (default: the bundled checkpoints/shapes-causal, "
                        "else a tiny random-weight causal pipeline)")
    p.add_argument("--chunks", type=int, default=16, help="chunks per streamed video (0: skip the stream part)")
    p.add_argument("--stream-steps", type=int, default=20, help="denoising steps per chunk when streaming")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from gradio_client import Client

    from serve.app import serve
    from vdiff.client import VideoClient

    with tempfile.TemporaryDirectory(prefix="vdiff-bench-serve-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from serve.demo import make_random_pipeline

            checkpoint = make_random_pipeline(Path(tmp) / "pipeline")
        server = serve(checkpoint, port=free_port(), max_queue=16, block=False, quiet=True, display_scale=1)
        try:
            pipe = server.pool.pipelines[0]
            kw = dict(num_inference_steps=args.steps, num_frames=args.frames, height=args.size, width=args.size,
                      guidance_scale=5.0, cache=["text_kv", "mask", "prompt"])
            client = Client(server.url, verbose=False)
            out_path = Path(tmp) / "direct.mp4"

            def direct() -> None:
                pipe("a red circle moving right", seed=0, **kw).save(out_path)

            def direct_no_file() -> None:
                pipe("a red circle moving right", seed=0, **kw)

            def through_server() -> None:
                client.predict(prompt="a red circle moving right", seed=0, **kw, api_name="/generate")

            http = httpx.Client(timeout=600)
            data = ["a red circle moving right", "", 0, kw["num_inference_steps"], kw["guidance_scale"],
                    kw["num_frames"], kw["height"], kw["width"], "dense", kw["cache"]]

            def through_http() -> None:  # the documented REST route: POST, read the event stream, fetch the mp4
                event = http.post(f"{server.url}gradio_api/call/generate", json={"data": data}).json()["event_id"]
                text = http.get(f"{server.url}gradio_api/call/generate/{event}").text
                if "event: complete" not in text:
                    raise RuntimeError(text[-500:])
                result = json.loads(text.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])
                http.get(result[0]["url"]).raise_for_status()

            api = VideoClient(server.url, timeout=600)

            def through_api() -> None:  # POST /v1/videos, follow its events, GET the content
                api.generate("a red circle moving right", seed=0, **kw)

            times = time_alternating({"direct (generate + write mp4)": direct, "direct (generate only)": direct_no_file,
                                      "server (raw HTTP /call/generate)": through_http,
                                      "server (gradio_client)": through_server,
                                      "server (/v1/videos job API)": through_api},
                                     warmup=1, repeats=args.repeats)
            base = statistics.median(times["direct (generate + write mp4)"])
            rows = []
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"measurement": name, "clients": 1, "median_s": med, "min_s": min(ts),
                             "overhead_pct": 100 * (med - base) / base,
                             "overhead_min_pct": 100 * (min(ts) - min(times["direct (generate + write mp4)"]))
                             / min(times["direct (generate + write mp4)"]), "req_per_s": 1 / med})
            for n in [int(c) for c in args.clients.split(",") if c.strip()]:
                rows.append(_throughput(server.url, n, args.requests_per_client, kw, Client))
        finally:
            server.close()
        stream_rows = _stream_rows(args, Path(tmp)) if args.chunks > 0 else []
    print_table(rows, ["measurement", "clients", "median_s", "min_s", "overhead_pct", "overhead_min_pct", "req_per_s"],
                title=f"serve: {args.frames}x{args.size}x{args.size}, {args.steps} steps, "
                      f"devices {server.pool.devices}")
    overhead, client_overhead, api_overhead = (rows[i]["overhead_pct"] for i in (2, 3, 4))
    print(f"server overhead vs a direct call (median): {overhead:+.1f}% over raw HTTP, {client_overhead:+.1f}% "
          f"through gradio_client, {api_overhead:+.1f}% through the /v1/videos job API (goal <= 5%)")
    extra: dict = {}
    if stream_rows:
        print_table(stream_rows, ["measurement", "first_chunk_s", "chunk_interval_s", "first_chunk_overhead_pct",
                                  "interval_overhead_pct"],
                    title=f"stream: {args.chunks} chunks, {args.stream_steps} steps per chunk")
        api_row = stream_rows[-1]
        print(f"job API vs a direct pipe.stream (medians): first chunk {api_row['first_chunk_overhead_pct']:+.1f}%, "
              f"chunk interval {api_row['interval_overhead_pct']:+.1f}% (goal <= 5%)")
        extra = {"stream": stream_rows, "stream_first_chunk_overhead_pct": api_row["first_chunk_overhead_pct"],
                 "stream_interval_overhead_pct": api_row["interval_overhead_pct"], "chunks": args.chunks,
                 "stream_steps": args.stream_steps}
    write_result("serve", rows, {"checkpoint": str(args.checkpoint or "tiny random-weight pipeline (serve.demo)"),
                                 "steps": args.steps, "frames": args.frames, "size": args.size,
                                 "repeats": args.repeats, "devices": server.pool.devices,
                                 "overhead_pct": overhead, "gradio_client_overhead_pct": client_overhead,
                                 "job_api_overhead_pct": api_overhead, "goal_overhead_pct": 5.0,
                                 "torch_threads": machine_info()["torch_threads"], **extra})


def _stream_rows(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Time to the first chunk and the median interval between chunks: a direct `pipe.stream` that writes each chunk
    as the server does, vs a causal job followed over /v1/videos events (alternating, `args.repeats` each)."""
    from serve.app import serve
    from vdiff.client import VideoClient
    from vdiff.pipeline_io import write_video
    from vdiff.runtime import bundled_causal_checkpoint

    checkpoint = args.causal_checkpoint or bundled_causal_checkpoint()
    if checkpoint is None:
        from vdiff import VideoPipeline
        from vdiff.config import CausalConfig, model_preset

        cfg = model_preset("tiny", causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=2))
        checkpoint = VideoPipeline.from_model_config(cfg, seed=0).save_pretrained(tmp / "causal")
    kw = dict(num_inference_steps=args.stream_steps, guidance_scale=1.0, seed=0)
    server = serve(checkpoint, port=free_port(), max_queue=4, block=False, quiet=True, max_chunks=args.chunks)
    try:
        pipe = server.pool.pipelines[0]
        api = VideoClient(server.url, timeout=600)

        def direct() -> list[float]:
            arrivals, t0 = [], time.perf_counter()
            for chunk in pipe.stream("a red circle moving right", num_chunks=args.chunks, **kw):
                write_video(tmp / f"chunk-{chunk.index}.mp4", chunk.frames, pipe.config.fps)
                arrivals.append(time.perf_counter() - t0)
            return arrivals

        def over_api() -> list[float]:
            arrivals, t0 = [], time.perf_counter()
            for name, _ in api.stream("a red circle moving right", num_chunks=args.chunks, **kw):
                if name == "chunk":
                    arrivals.append(time.perf_counter() - t0)
            return arrivals

        runs: dict[str, list[list[float]]] = {"direct pipe.stream (+ write chunk mp4)": [],
                                              "server (/v1/videos events)": []}
        direct(), over_api()  # warm-up
        for _ in range(args.repeats):
            runs["direct pipe.stream (+ write chunk mp4)"].append(direct())
            runs["server (/v1/videos events)"].append(over_api())
    finally:
        server.close()
    rows = []
    for name, arrivals in runs.items():
        first = statistics.median(a[0] for a in arrivals)
        interval = statistics.median(statistics.median(b - a for a, b in zip(r[1:], r[2:])) for r in arrivals)
        rows.append({"measurement": name, "first_chunk_s": first, "chunk_interval_s": interval,
                     "checkpoint": str(checkpoint)})
    for row in rows:
        row["first_chunk_overhead_pct"] = 100 * (row["first_chunk_s"] - rows[0]["first_chunk_s"]) / rows[0][
            "first_chunk_s"]
        row["interval_overhead_pct"] = 100 * (row["chunk_interval_s"] - rows[0]["chunk_interval_s"]) / rows[0][
            "chunk_interval_s"]
    return rows


def _throughput(url: str, clients: int, per_client: int, kw: dict, client_cls) -> dict:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        c = client_cls(url, verbose=False)
        start.wait()
        for j in range(per_client):
            t0 = time.perf_counter()
            try:
                c.predict(prompt=f"a blue square moving up {i}", seed=j, **kw, api_name="/generate")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(exc)
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients * per_client} requests failed: {errors[0]}")
    return {"measurement": f"throughput, {clients} concurrent client(s) x {per_client} requests", "clients": clients,
            "median_s": statistics.median(latencies), "min_s": min(latencies), "overhead_pct": None,
            "req_per_s": len(latencies) / wall}


if __name__ == "__main__":
    main()

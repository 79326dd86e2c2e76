"""vdiff on Ray Serve (optional extra `vdiff[ray]`): beyond one machine, Ray places and scales the workers.

    from serve.ray_app import build_app
    from ray import serve
    serve.run(build_app("ckpt", ranks=2, parallel={"cfg": 2}, max_replicas=4), route_prefix="/")

One deployment per group shape. Each replica is one worker group: a placement group of `ranks` bundles (one GPU
each on a GPU cluster, one CPU each otherwise) packed on one node (STRICT_PACK). The replica actor is rank 0; with
`ranks > 1` it starts ranks 1..N-1 as Ray actors inside its placement group (`RankActor`), which join its process
group on that node's loopback and follow its calls (vdiff.parallel.spawn). Autoscaling follows the number of
requests each replica is working on or has queued (`target_ongoing_requests`).

Routes (the same bodies and checks as the one-machine server, serve.validation): `POST /generate` (JSON body as the
job API's create: prompt, seed, num_inference_steps, ...) answers the video file with its stats in the
`X-Vdiff-Stats` header; `GET /v1/status` the replica's pool. The asynchronous `/v1/videos` job API is not served
here: a job lives in the replica that made it and Ray Serve routes each HTTP request to any replica, so polling a
job needs a job store shared by the replicas (not built).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at run time.
import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from serve.validation import RequestError, limits_for, validate_request


class RayRank:
    """A follower rank as a Ray actor, with the subprocess.Popen surface vdiff.parallel.spawn.Leader uses."""

    def __init__(self, actor: Any, ref: Any, pid: int):
        self.actor, self.ref, self.pid, self.returncode = actor, ref, pid, None

    def poll(self) -> int | None:
        import ray

        if self.returncode is None:
            ready, _ = ray.wait([self.ref], timeout=0)
            if ready:
                try:
                    self.returncode = int(ray.get(self.ref) or 0)
                except Exception:  # the actor died or raised
                    self.returncode = 1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import ray

        ready, _ = ray.wait([self.ref], timeout=timeout)
        if not ready:
            raise subprocess.TimeoutExpired("ray rank", timeout)
        return self.poll()

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)
        self.returncode = -9 if self.returncode is None else self.returncode


def _rank_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=1)
    class RankActor:
        def pid(self) -> int:
            return os.getpid()

        def run(self, argv: list[str], env: dict[str, str]) -> int:
            os.environ.update(env)
            from vdiff.parallel.spawn import main

            return main(argv[2:])  # argv = ["-m", "vdiff.parallel.spawn", folder, spec]

    return RankActor


def ray_starter(use_gpu: bool):
    """A vdiff.parallel.spawn starter that runs each follower as a Ray actor in the caller's placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_cls = _rank_actor_class()

    def start(argv: list[str], env: dict[str, str], log_path: Path) -> RayRank:
        pg = ray.util.get_current_placement_group()
        options: dict[str, Any] = {"num_gpus": 1 if use_gpu else 0}
        if pg is not None:
            bundle = int(env["RANK"])
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
        actor = actor_cls.options(**options).remote()
        gpu_env = {"LOCAL_RANK": "0"} if use_gpu else {}  # Ray shows each rank actor its own GPU as cuda:0
        pid = ray.get(actor.pid.remote())  # first: an actor runs its calls in order, and `run` never returns early
        return RayRank(actor, actor.run.remote(argv, {**env, **gpu_env}), pid)

    return start


def build_app(checkpoint: str | Path, *, ranks: int = 1, parallel: dict[str, Any] | None = None,
              use_gpu: bool | None = None, min_replicas: int = 1, max_replicas: int = 1,
              target_ongoing_requests: float = 1.0, max_queue: int = 4, name: str | None = None) -> Any:
    """A Ray Serve application serving `checkpoint` with replicas of `ranks` ranks split by `parallel`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from ray import serve

    from serve.worker import ServerBusy

    checkpoint = str(Path(checkpoint).resolve())
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"replicas: need 1 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
    if ranks > 1:
        from serve.groups import group_config

        group_config(parallel or {}, ["?"] * ranks)  # the degrees must multiply to `ranks`
    gpu = bool(use_gpu) if use_gpu is not None else False
    bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    api = FastAPI(title=f"vdiff: {Path(checkpoint).name}")

    @serve.deployment(
        name=name or f"vdiff-{ranks}rank",
        ray_actor_options={"num_cpus": 0},  # the replica's resources are its placement group's first bundle
        placement_group_bundles=[bundle] * ranks, placement_group_strategy="STRICT_PACK",
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing_requests},
        max_ongoing_requests=max_queue + 1)
    @serve.ingress(api)
    class VideoGroup:
        def __init__(self) -> None:
            from serve.worker import OutputStore, WorkerPool
            from vdiff import ParallelConfig, VideoPipeline
            from vdiff.parallel.spawn import use_starter

            device = "cuda:0" if gpu else "cpu"
            if ranks == 1:
                pipe = VideoPipeline.from_pretrained(checkpoint, device=device)
            else:
                config = ParallelConfig(**(parallel or {}), launch="spawn", devices=(device,) * ranks)
                with use_starter(ray_starter(gpu)):
                    pipe = VideoPipeline.from_pretrained(checkpoint, parallel=config)
            self.pool = WorkerPool([pipe], [f"{device} x {ranks}"], max_queue=max_queue,
                                   store=OutputStore(max_files=16))
            self.limits = limits_for(pipe, device)

        @api.post("/generate")
        async def generate(self, request: Request) -> Any:
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                req = validate_request(self.limits, **body)
            except (RequestError, TypeError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            try:
                job = self.pool.submit(req)
            except ServerBusy as exc:  # this replica's queue is full: the client retries (or autoscaling adds one)
                return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "2"})
            try:
                result = await asyncio.to_thread(job.wait)
            except Exception as exc:
                return JSONResponse({"error": str(exc)}, status_code=500)
            return FileResponse(result.path, media_type="video/mp4",
                                headers={"X-Vdiff-Stats": json.dumps(result.stats, default=str)})

        @api.get("/v1/status")
        def status(self) -> dict[str, Any]:
            return {"pid": os.getpid(), **self.pool.status()}

        def __del__(self) -> None:
            pool = getattr(self, "pool", None)
            if pool is not None:
                pool.close()

    return VideoGroup.bind()

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
`X-Vdiff-Stats` header; `GET /v1/status` the replica's pool; and the `/v1/videos` job API of serve/api.py. A job
lives in the replica that made it, while Ray Serve sends each HTTP request to any replica: so each replica also runs
the job API on its own node-local port (`InternalAPI`, reachable with a token made per application), its job ids
carry the replica's key (`KEY_LEN` characters after `video_`), and a named directory actor maps keys to those
ports. The replica that receives a request about a job forwards it, streamed (events, content), to the job's
replica; `POST /v1/videos` and `/v1/models` go to the receiving replica's own, `GET /v1/videos` merges every
replica's list.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations (Request) at run time.
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
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


KEY_LEN = 8  # hex characters of a replica's key in its job ids: video_<key><random part>


def job_directory(name: str) -> Any:
    """The named actor (one per application) mapping replica keys to their InternalAPI URLs."""
    import ray

    @ray.remote(num_cpus=0)
    class JobDirectory:
        def __init__(self) -> None:
            self.urls: dict[str, str] = {}

        def register(self, key: str, url: str) -> None:
            self.urls[key] = url

        def remove(self, key: str) -> None:
            self.urls.pop(key, None)

        def all(self) -> dict[str, str]:
            return dict(self.urls)

    return JobDirectory.options(name=name, get_if_exists=True, lifetime="detached").remote()


class InternalAPI:
    """serve/api.py's job API over one replica's JobStore, on a port of the replica's node, behind a bearer token."""

    def __init__(self, jobs: Any, limits: Any, token: str):
        import socket

        import uvicorn
        from fastapi import FastAPI
        from ray.util import get_node_ip_address

        from serve.api import add_api

        app = FastAPI(title="vdiff replica job API")
        add_api(app, jobs, limits, auth=("vdiff", token))
        host = get_node_ip_address()
        # Bound here and handed to uvicorn: a port picked now and bound later can be taken in between (Ray starts
        # processes that bind ephemeral ports all the time).
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="vdiff-internal-api",
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica's job API did not start on {self.url}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True  # uvicorn's shutdown closes the socket (asyncio's server owns it)


def build_app(checkpoint: str | Path, *, ranks: int = 1, parallel: dict[str, Any] | None = None,
              use_gpu: bool | None = None, min_replicas: int = 1, max_replicas: int = 1,
              target_ongoing_requests: float = 1.0, max_queue: int = 4, name: str | None = None,
              auth: tuple[str, str] | None = None) -> Any:
    """A Ray Serve application serving `checkpoint` with replicas of `ranks` ranks split by `parallel`. `auth`
    (user, password): the job API asks for it (HTTP basic, or a bearer token), as VDIFF_AUTH does on one machine."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from ray import serve
    from starlette.background import BackgroundTask

    from serve.api import _authorized, error
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
    token = secrets.token_urlsafe(24)  # the replicas' internal job APIs answer only the application's replicas
    directory_name = f"vdiff-jobs-{name or f'{ranks}rank'}-{token[:8]}"
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
            from serve.jobs import JobStore

            self.key = secrets.token_hex(KEY_LEN // 2)
            self.jobs = JobStore(self.pool, model=Path(checkpoint).name, id_prefix=self.key)
            self.internal = InternalAPI(self.jobs, self.limits, token)
            self.directory = job_directory(directory_name)
            import ray

            ray.get(self.directory.register.remote(self.key, self.internal.url))
            self.urls: dict[str, str] = {self.key: self.internal.url}
            self.client: Any = None

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
            return {"pid": os.getpid(), "replica_key": self.key, **self.pool.status()}

        @api.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"])
        async def job_api(self, request: Request, path: str) -> Any:
            """The job API: forwarded to the replica that holds the job (see the module docstring)."""
            if auth is not None and not _authorized(request, auth):
                return error(401, "authentication_error", "login required: HTTP basic user:password or a bearer "
                             "token", headers={"WWW-Authenticate": 'Basic realm="vdiff"'})
            parts = path.strip("/").split("/")
            if parts == ["videos"] and request.method == "GET":
                return await self._merged_list(request)
            url = self.internal.url
            if parts[0] == "videos" and len(parts) >= 2:
                video_id = parts[1]
                key = video_id[len("video_"):len("video_") + KEY_LEN] if video_id.startswith("video_") else ""
                url = await self._owner(key)
                if url is None:
                    return error(404, "not_found", f"no video job {video_id!r} (unknown, or its replica is gone)",
                                 "video_id")
            return await self._forward(request, f"{url}/v1/{path}")

        async def _owner(self, key: str) -> str | None:
            if key not in self.urls:
                self.urls = await self.directory.all.remote()
            return self.urls.get(key)

        def _http(self) -> Any:
            import httpx

            if self.client is None:  # made in the serving event loop; reads wait as long as an event stream lasts
                self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                                                headers={"authorization": f"Bearer {token}"})
            return self.client

        async def _forward(self, request: Request, target: str) -> Any:
            client = self._http()
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "content-length")}
            try:
                sent = client.build_request(request.method, target, params=request.query_params,
                                            content=request.stream(), headers=headers)
                answer = await client.send(sent, stream=True)
            except Exception as exc:  # the replica that holds the job went away
                return error(502, "replica_unavailable", f"the replica holding this job did not answer: {exc}")
            keep = {k: v for k, v in answer.headers.items()
                    if k.lower() in ("content-type", "retry-after", "content-disposition", "cache-control",
                                     "location")}
            keep["x-vdiff-received-by"] = self.key  # the replica Serve chose (it forwarded to `target`'s)
            return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=keep,
                                     background=BackgroundTask(answer.aclose))

        async def _merged_list(self, request: Request) -> Any:
            limit = request.query_params.get("limit", "20")
            try:
                n = max(1, min(int(limit), 100))
            except ValueError:
                return error(400, "invalid_request_error", f"limit must be an integer 1..100, got {limit!r}",
                             "limit")
            client = self._http()
            self.urls = await self.directory.all.remote()
            answers = await asyncio.gather(*(client.get(f"{url}/v1/videos", params={"limit": n})
                                             for url in self.urls.values()), return_exceptions=True)
            jobs = [job for a in answers if not isinstance(a, Exception) and a.status_code == 200
                    for job in a.json()["data"]]
            jobs.sort(key=lambda job: job["created_at"], reverse=True)
            return JSONResponse({"object": "list", "data": jobs[:n]})

        def __del__(self) -> None:
            for name in ("internal", "pool"):
                part = getattr(self, name, None)
                if part is not None:
                    part.close()
            directory, key = getattr(self, "directory", None), getattr(self, "key", None)
            if directory is not None and key is not None:
                with contextlib.suppress(Exception):  # Ray itself may be shutting down
                    directory.remove.remote(key)

    return VideoGroup.bind()

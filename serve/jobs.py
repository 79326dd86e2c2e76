"""The job API's records: one `VideoJob` per `POST /v1/videos`, over one `WorkerPool` job, kept in a `JobStore`.

    store = JobStore(pool, max_jobs=256)
    vj = store.submit(request)          # ServerBusy when the pool's queue is full (the route answers 429)
    vj.as_dict()                        # {"id", "status", "progress", "steps_done", "num_steps", "seed", ...}
    events, finished = vj.events_since(0)
    unsubscribe = vj.subscribe(wake)    # wake() is called (from the worker thread) after every new event

A `VideoJob` follows its pool job through the pool's listener, which fires when the job starts, after every denoising
step and when it ends, so `progress` is the real share of steps done and never goes down. Ids come from
`secrets.token_urlsafe`: a job (and its output) is reachable only by whoever was given its id.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.validation import GenerationRequest, RequestError
from serve.worker import Job, OutOfMemory, WorkerPool
from vdiff.diffusion.sampling import Cancelled

TERMINAL = ("completed", "failed", "cancelled")


def _now() -> float:
    return round(time.time(), 3)


class VideoJob:
    """One API job: status, progress, timings and an append-only event log, written by the worker thread."""

    def __init__(self, job: Job, model: str, id_prefix: str = ""):
        self.id = "video_" + id_prefix + secrets.token_urlsafe(16)
        self.job, self.model = job, model
        self.status = "queued"
        self.steps_done, self.chunks_sent = 0, 0
        self.num_steps = job.request.num_inference_steps * (job.request.num_chunks or 1)
        self.created_at, self.started_at, self.completed_at = _now(), None, None
        self.error: dict[str, str] | None = None
        self.deleted = False
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._waiters: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        job.add_listener(self._update)

    # ---- read side ---------------------------------------------------------------------------------------------

    @property
    def progress(self) -> int:
        """Percent of denoising steps done (0 to 100, monotonic)."""
        return 100 if self.status == "completed" else 100 * self.steps_done // max(self.num_steps, 1)

    @property
    def output(self) -> Path | None:
        """The finished video, while it exists (deleted jobs and files the bounded output area dropped: None)."""
        result = self.job.result
        if self.deleted or result is None or not result.path.is_file():
            return None
        return result.path

    def chunk(self, index: int) -> Path | None:
        """Chunk `index` of a causal job, once written (and while the job and its files exist)."""
        chunks = self.job.chunks
        if self.deleted or not 0 <= index < len(chunks) or not chunks[index].is_file():
            return None
        return chunks[index]

    def as_dict(self) -> dict[str, Any]:
        r: GenerationRequest = self.job.request
        out: dict[str, Any] = {
            "id": self.id, "object": "video", "model": self.model, "status": self.status, "progress": self.progress,
            "steps_done": self.steps_done, "num_steps": self.num_steps, "created_at": self.created_at,
            "started_at": self.started_at, "completed_at": self.completed_at, "seed": r.seed, "prompt": r.prompt,
            "num_frames": r.num_frames, "height": r.height, "width": r.width, "guidance_scale": r.guidance_scale,
            "attention": r.attention, "error": self.error, "deleted": self.deleted,
        }
        if r.causal:
            out.update(num_chunks=r.num_chunks, chunks_done=len(self.job.chunks),
                       prompts={str(k): v for k, v in sorted(self.job.switches.items())},
                       chunk_urls=[f"/v1/videos/{self.id}/chunks/{i}" for i in range(len(self.job.chunks))])
        result = self.job.result
        if result is not None:
            stats = result.stats
            out["timings"] = {k: stats.get(k) for k in ("queue_s", "run_s", "denoise_s", "decode_s", "step_mean_s")
                              if k in stats}
        return out

    def events_since(self, index: int) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
        """Events from `index` on, and whether the job has ended (its last event is among them or before)."""
        with self._lock:
            return self._events[index:], self.status in TERMINAL

    @property
    def followers(self) -> int:
        """How many event streams follow this job now."""
        with self._lock:
            return len(self._waiters)

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` after each new event; returns the function that stops it (a follower going away)."""
        with self._lock:
            self._waiters.append(wake)

        def unsubscribe() -> None:
            with self._lock:
                if wake in self._waiters:
                    self._waiters.remove(wake)

        return unsubscribe

    # ---- write side (the pool's worker thread, or the client thread that cancels a queued job) --------------------

    def _update(self) -> None:
        job = self.job
        with self._lock:
            if self.status in TERMINAL:
                return
            if job.started_at is not None and self.status == "queued":
                self.status, self.started_at = "in_progress", _now()
                self._emit("progress")
            if job.started_at is not None and job.step > self.steps_done:
                self.steps_done = min(job.step, self.num_steps)
                self._emit("progress")
            while len(job.chunks) > self.chunks_sent:  # a causal job's chunk n is on disk
                self._emit("chunk", index=self.chunks_sent, url=f"/v1/videos/{self.id}/chunks/{self.chunks_sent}",
                           prompt=job.chunk_stats[self.chunks_sent]["prompt"])  # the prompt that made it
                self.chunks_sent += 1
            if job.done:
                self.completed_at = _now()
                if job.error is None:
                    self.status, self.steps_done = "completed", self.num_steps
                    self._emit("completed")
                elif isinstance(job.error, Cancelled):
                    self.status = "cancelled"
                    self._emit("cancelled")
                else:
                    kind = ("invalid_request_error" if isinstance(job.error, RequestError)
                            else "out_of_memory" if isinstance(job.error, OutOfMemory) else "server_error")
                    self.status, self.error = "failed", {"type": kind, "message": str(job.error)}
                    self._emit("failed")
            waiters = list(self._waiters)
        for wake in waiters:
            with contextlib.suppress(RuntimeError):  # a follower's event loop closed under it
                wake()

    def _emit(self, name: str, **extra: Any) -> None:
        self._events.append((name, {**self.as_dict(), **extra}))


class JobStore:
    """The API's jobs by id, newest last; at most `max_jobs` records (the oldest ended ones are forgotten).
    `id_prefix`: put in front of every job's random part (serve/ray_app.py: which replica holds the job)."""

    def __init__(self, pool: WorkerPool, model: str, max_jobs: int = 256, id_prefix: str = ""):
        self.pool, self.model, self.max_jobs, self.id_prefix = pool, model, max_jobs, id_prefix
        self._jobs: OrderedDict[str, VideoJob] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest) -> VideoJob:
        """Queue a checked request on the pool (raises `ServerBusy` at once when its queue is full)."""
        vj = VideoJob(self.pool.submit(request), self.model, self.id_prefix)
        with self._lock:
            self._jobs[vj.id] = vj
            ended = [k for k, j in self._jobs.items() if j.status in TERMINAL]
            for key in ended[: max(0, len(self._jobs) - self.max_jobs)]:
                del self._jobs[key]
        return vj

    def get(self, video_id: str) -> VideoJob | None:
        with self._lock:
            return self._jobs.get(video_id)

    def recent(self, limit: int = 20) -> list[VideoJob]:
        with self._lock:
            return list(reversed(self._jobs.values()))[:limit]

    def delete(self, vj: VideoJob) -> None:
        """Cancel the job if it waits or runs (it stops at its next denoising step) and delete its outputs, also
        one written in its last step after this call."""
        vj.deleted = True
        vj.job.cancel()

        def remove_output() -> None:
            if vj.job.done and vj.job.result is not None:
                self.pool.store.remove(vj.job.result.path)
            if vj.job.done and vj.job.chunk_dir is not None:  # a causal job's chunks
                self.pool.store.remove(vj.job.chunk_dir)

        vj.job.add_listener(remove_output)  # runs now when the job has ended

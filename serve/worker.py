"""Request handling behind the web app: a bounded queue, one pipeline per device, and a bounded output area.

    pool = WorkerPool.from_pretrained("checkpoints/shapes-tiny", max_queue=8)   # loads one pipeline per device
    job = pool.submit(request)          # raises ServerBusy at once when the queue is full
    job.wait()                          # or add_listener(...) and poll from asyncio
    job.result.path, job.result.stats

Each device has one worker thread that owns one `VideoPipeline` (loaded once, at start) and runs one request at a
time, so concurrency equals the number of devices and no sampler/scheduler state is shared between requests (the
pipeline builds its scheduler per call). Requests wait in one queue and go to whichever device is free.
Nothing here is global: a pool is an object the app holds.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.validation import GenerationRequest, RequestError
from vdiff.diffusion.sampling import Cancelled

log = logging.getLogger("vdiff.serve")

# A step hook sees every denoising step of every request (job, step_index, num_steps); raising stops that request.
StepHook = Callable[["Job", int, int], None]


class ServerBusy(RuntimeError):
    """The request queue is full (or the server is shutting down): the client should retry later."""


class GenerationFailed(RuntimeError):
    """A request failed on the server; the message is safe to show to the client."""


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this request; the worker freed what it could and keeps serving."""


def default_devices() -> list[str]:
    """One entry per GPU, or ["cpu"] without one."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA and others) and the CPU allocator's failure are both out-of-memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


# --------------------------------------------------------------------------------------------------------------------
# Output files: server-chosen names in one temp folder, at most `max_files` kept, removed on close.
# --------------------------------------------------------------------------------------------------------------------


class OutputStore:
    """A bounded temp area for generated videos. Names are random; clients never choose a path."""

    def __init__(self, root: str | Path | None = None, max_files: int = 64):
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="vdiff-serve-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self._files: deque[Path] = deque()
        self._lock = threading.Lock()

    def new_path(self, suffix: str = ".mp4") -> Path:
        return self.root / f"{uuid.uuid4().hex}{suffix}"

    def add(self, path: Path) -> None:
        """Record a written file (or a folder: a causal job's chunks, one entry) and delete the oldest entries beyond
        `max_files`."""
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.max_files:
                _delete(self._files.popleft())

    def remove(self, path: Path) -> None:
        """Delete one entry now (a job's outputs, when its client deletes the job)."""
        with self._lock:
            _delete(path)
            with contextlib.suppress(ValueError):
                self._files.remove(path)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file())

    def close(self) -> None:
        with self._lock:
            if self._owned:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                for path in self._files:
                    path.unlink(missing_ok=True)
            self._files.clear()


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class JobResult:
    path: Path  # the video as generated (model resolution)
    stats: dict[str, Any]
    preview: Path | None = None  # the page's copy, upscaled by the pool's display_scale (None: scale 1)


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    """One request on its way through the pool. Progress fields are written by the worker thread."""

    request: GenerationRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    device: str | None = None
    worker: int | None = None  # index of the pool worker (one per pipeline) that ran it
    step: int = 0
    num_steps: int = 0
    result: JobResult | None = None
    error: BaseException | None = None
    # A causal request: its chunk files as they are written (in the folder `chunk_dir`), each chunk's stats, and
    # the prompt switches {chunk: prompt} the stream reads at every chunk boundary (`change_prompt` adds to it)
    chunks: list[Path] = field(default_factory=list)
    chunk_frames: list[np.ndarray] = field(default_factory=list, repr=False)  # uint8 (t, H, W, 3) each
    chunk_stats: list[dict[str, Any]] = field(default_factory=list)
    chunk_dir: Path | None = None
    switches: dict[int, str] = field(default_factory=dict)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _listeners: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _on_cancel: Callable[[Job], None] | None = field(default=None, repr=False)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: removed from the queue if waiting, stopped at the next step if running."""
        if self._done.is_set() or self._cancel.is_set():
            return
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def change_prompt(self, prompt: str) -> int:
        """Switch a causal job's prompt at its next chunk boundary (the first chunk not yet started, or chunk 0 if
        it waits); returns that chunk's index. The caller checked the text (serve.validation)."""
        if self.request.num_chunks is None:
            raise RequestError("prompt: the served model is not causal; a running clip cannot change its prompt")
        at = len(self.chunks) + (1 if self.started_at is not None else 0)
        if self.done or at >= self.request.num_chunks:
            raise RequestError(f"prompt: the job has no chunk left to switch (it made {len(self.chunks)} of "
                               f"{self.request.num_chunks})")
        self.switches[at] = prompt
        return at

    def add_listener(self, fn: Callable[[], None]) -> None:
        """`fn()` is called (from the worker thread) when the job starts, after each step, and when it ends. A job
        that has already started (or ended) calls it once now, so a listener added after `submit` misses nothing."""
        self._listeners.append(fn)
        if self.started_at is not None or self.done:
            fn()

    def wait(self, timeout: float | None = None) -> JobResult:
        """Block until the job ends; return its result or raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish in {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a listener (e.g. a closed event loop) must never break the worker
                log.debug("job listener failed", exc_info=True)

    def _finish(self, result: JobResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._done.set()
        self._notify()


# --------------------------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------------------------


class WorkerPool:
    """A bounded FIFO of jobs served by one worker thread per pipeline (one pipeline per device)."""

    def __init__(self, pipelines: Sequence[Any], devices: Sequence[str] | None = None, *, max_queue: int = 8,
                 store: OutputStore | None = None, step_hooks: Sequence[StepHook] = (), video_format: str = "mp4"):
        if not pipelines:
            raise ValueError("WorkerPool needs at least one pipeline")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.devices = list(devices) if devices is not None else [str(getattr(p, "device", "cpu")) for p in pipelines]
        if len(self.devices) != len(pipelines):
            raise ValueError(f"got {len(pipelines)} pipelines for {len(self.devices)} devices")
        self.pipelines = list(pipelines)
        self.max_queue = max_queue
        self.store = store or OutputStore()
        self.step_hooks: list[StepHook] = list(step_hooks)
        self.video_format = video_format
        self.display_scale = 1  # > 1: each result also gets an upscaled preview (nearest neighbour) for the page
        self.counts = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "busy": 0, "out_of_memory": 0}
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # worker index -> its job (device labels may repeat: "cpu,cpu")
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, args=(pipe, index), name=f"vdiff-worker-{index}-{device}", daemon=True)
            for index, (pipe, device) in enumerate(zip(self.pipelines, self.devices))
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, devices: Sequence[str] | None = None, *,
                        lora: str | Path | None = None, lora_scale: float = 1.0,
                        groups: Sequence[Sequence[str]] | None = None, parallel: dict[str, Any] | None = None,
                        **kwargs: Any) -> WorkerPool:
        """Load one pipeline per device (all GPUs by default, else the CPU) once, with the LoRA adapter `lora` when
        given, and start the workers. `groups` (instead of devices): lists of devices, each served as one device by
        `parallel` (ParallelConfig fields, e.g. {"cfg": 2}) over its ranks (serve.groups)."""
        from vdiff import VideoPipeline

        if groups is not None:
            from serve.groups import group_pipelines

            pipelines, labels = group_pipelines(checkpoint, groups, parallel or {}, lora=lora, lora_scale=lora_scale)
            return cls(pipelines, labels, **kwargs)
        devices = list(devices) if devices else default_devices()
        pipelines = []
        for device in devices:
            log.info("loading %s on %s", checkpoint, device)
            pipe = VideoPipeline.from_pretrained(checkpoint)
            if lora is not None:
                pipe.load_lora_weights(lora, scale=lora_scale)
            pipelines.append(pipe.to(device))
        return cls(pipelines, devices, **kwargs)

    # ---- client side -------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request. Raises `ServerBusy` at once when `max_queue` requests are already waiting."""
        job = Job(request, switches=dict(request.prompts))
        job._on_cancel = self._dequeue
        with self._cond:
            if self._closed:
                raise ServerBusy("the server is shutting down; retry in a moment")
            idle = len(self.pipelines) - len(self._running)
            if len(self._waiting) >= self.max_queue + max(idle, 0):
                self.counts["busy"] += 1
                raise ServerBusy(f"server busy: {len(self._running)} generating and {len(self._waiting)} waiting "
                                 f"(queue limit {self.max_queue}); retry in a few seconds")
            self.counts["submitted"] += 1
            self._waiting.append(job)
            self._cond.notify()
        return job

    def queue_position(self, job: Job) -> int | None:
        """0-based position among waiting jobs, or None once it runs."""
        with self._cond:
            try:
                return self._waiting.index(job)
            except ValueError:
                return None

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"devices": list(self.devices), "running": len(self._running), "waiting": len(self._waiting),
                    "max_queue": self.max_queue, **self.counts}

    def close(self, timeout: float = 10.0) -> None:
        """Cancel waiting and running jobs, stop the workers, delete the output area."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            running = list(self._running.values())
            self._cond.notify_all()
        for job in waiting:
            job._cancel.set()
            job._finish(error=Cancelled("the server is shutting down"))
        for job in running:
            job._cancel.set()
        for thread in self._threads:
            thread.join(timeout)
        for pipe in self.pipelines:
            if hasattr(pipe, "close"):
                pipe.close()  # a GroupPipeline: its host process and the group's ranks
        self.store.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _dequeue(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # already running: the step callback sees the cancel flag
            self.counts["cancelled"] += 1
        job._finish(error=Cancelled("cancelled while waiting in the queue"))

    # ---- worker side -------------------------------------------------------------------------------------------

    def _next(self, worker: int) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self._running[worker] = job
            return job

    def _serve(self, pipe: Any, worker: int) -> None:
        while (job := self._next(worker)) is not None:
            try:
                job.worker = worker
                result, error = self._run(pipe, self.devices[worker], job), None
            except BaseException as exc:  # every failure ends this job only; the worker keeps serving
                result, error = None, exc
            with self._cond:
                self._running.pop(worker, None)
                key = ("completed" if error is None else "cancelled" if isinstance(error, Cancelled)
                       else "out_of_memory" if isinstance(error, OutOfMemory) else "failed")
                self.counts[key] += 1
            job._finish(result, error)

    def _run(self, pipe: Any, device: str, job: Job) -> JobResult:
        job.started_at, job.device = time.perf_counter(), device
        request = job.request
        chunks = request.num_chunks or 1  # steps count over every chunk of a causal request
        job.num_steps = request.num_inference_steps * chunks
        job._notify()

        def on_step(step_index: int, num_steps: int, latents: torch.Tensor) -> bool:
            job.step, job.num_steps = len(job.chunks) * num_steps + step_index + 1, num_steps * chunks
            for hook in self.step_hooks:
                hook(job, step_index, num_steps)
            job._notify()
            return not job.cancelled

        try:
            if request.causal:
                path, stats = self._stream(pipe, job, on_step)
                frames = np.concatenate(job.chunk_frames)
            else:
                out = pipe(**request.pipeline_kwargs(), callback=on_step)
                if job.cancelled:
                    raise Cancelled(f"cancelled after {job.step} of {job.num_steps} steps")
                path = self.store.new_path(f".{self.video_format}")
                out.save(path)
                self.store.add(path)
                stats = out.stats.as_dict() if hasattr(out.stats, "as_dict") else dict(out.stats)
                frames = out.frames
        except Cancelled as exc:  # the pipeline stopped at the step callback, or the job was cancelled in its last step
            raise Cancelled(f"cancelled after {job.step} of {job.num_steps} steps") from exc
        except GenerationFailed:
            raise
        except RequestError:
            raise
        except ValueError as exc:  # the pipeline's own argument checks: the client's mistake, shown as is
            raise RequestError(str(exc)) from exc
        except BaseException as exc:
            if job.cancelled:
                raise Cancelled(f"cancelled after {job.step} of {job.num_steps} steps") from exc
            if is_out_of_memory(exc):
                del exc
                self._free_memory(device)
                log.warning("out of memory on %s for %s", device, _describe(request))
                raise OutOfMemory(
                    f"out of memory on {device} generating {_describe(request)}; try fewer frames, a smaller size "
                    f"or a sparse attention backend. The server has freed the memory and keeps serving."
                ) from None
            log.error("generation failed on %s for %s:\n%s", device, _describe(request), traceback.format_exc())
            raise GenerationFailed(f"generation failed on the server ({type(exc).__name__}: {exc})") from exc
        preview = None
        if self.display_scale > 1:
            from serve.segments import upscale
            from vdiff.pipeline_io import write_video

            preview = write_video(self.store.new_path(".mp4"), upscale(frames, self.display_scale), pipe.config.fps)
            self.store.add(preview)
        finished = time.perf_counter()
        stats.update(num_frames=request.num_frames, height=request.height, width=request.width,
                     num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                     seed=request.seed, device=device, attention=request.attention, cache_names=list(request.cache),
                     queue_s=round(job.started_at - job.submitted_at, 4), run_s=round(finished - job.started_at, 4))
        return JobResult(path=path, stats=stats, preview=preview)

    def _stream(self, pipe: Any, job: Job, on_step: Callable) -> tuple[Path, dict[str, Any]]:
        """A causal request: `pipe.stream` chunk by chunk, each chunk written to the job's folder as it is made (the
        API serves it at once), then the whole clip. The stream reads `job.switches` at every chunk boundary."""
        from vdiff.pipeline_io import write_video

        fps = pipe.config.fps
        job.chunk_dir = self.store.new_path("")
        job.chunk_dir.mkdir()
        self.store.add(job.chunk_dir)  # one entry: the chunks go together
        frames = job.chunk_frames
        for chunk in pipe.stream(**{**job.request.stream_kwargs(), "prompts": job.switches}, callback=on_step):
            path = write_video(job.chunk_dir / f"chunk-{chunk.index:05d}.mp4", chunk.frames, fps)
            frames.append(chunk.frames)
            job.chunk_stats.append({**chunk.stats, "prompt": chunk.prompt})
            job.chunks.append(path)  # after its stats: a listener that sees the chunk sees them
            job._notify()
            if job.cancelled:
                raise Cancelled(f"cancelled after chunk {chunk.index}")
        path = write_video(self.store.new_path(f".{self.video_format}"), np.concatenate(frames), fps)
        self.store.add(path)
        seconds = [c["seconds"] for c in job.chunk_stats]
        return path, {"chunks": len(frames), "chunk_s": [round(x, 4) for x in seconds],
                      "denoise_s": round(sum(seconds) - sum(c["decode_s"] for c in job.chunk_stats), 4),
                      "decode_s": round(sum(c["decode_s"] for c in job.chunk_stats), 4),
                      "kv_bytes": job.chunk_stats[-1]["kv_bytes"], "fps": fps}

    @staticmethod
    def _free_memory(device: str) -> None:
        gc.collect()
        if device.startswith("cuda") and torch.cuda.is_available():
            with torch.cuda.device(torch.device(device)):
                torch.cuda.empty_cache()


def _describe(request: GenerationRequest) -> str:
    return (f"{request.num_frames}x{request.height}x{request.width}, {request.num_inference_steps} steps, "
            f"attention {request.attention}")

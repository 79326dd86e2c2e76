"""Worker groups: N ranks with one `ParallelConfig` that the worker pool treats as one device.

    ./launch.sh serve --checkpoint DIR --groups cuda:0+cuda:1,cuda:2+cuda:3 --parallel cfg=2

Each group of more than one device is a `GroupPipeline` in the server: a host process (spawned with
multiprocessing) that loads the pipeline with `ParallelConfig(..., launch="spawn", devices=the group)`, so it is the
group's rank 0 (the leader) and starts the other ranks itself (vdiff.parallel.spawn). The server and the host talk
over a pipe: a request goes down, then a message per denoising step comes back and the host waits for the server's
answer (go on or stop) before the next step, so the server's step hooks run in step with the group exactly as they
do on a single-device worker (a cancel stops every rank after the step it reached; a hook that holds a step holds
the group). Last the output (or the error) comes back. A group of one device is an ordinary pipeline in the server
process, as with `--devices`.

A rank that dies fails the request it was running with a clear error and the group is started again in the
background (the worker that owns it waits for the new one before its next request); the other groups keep serving.
An idle group never reaches a collective timeout (the leader's heartbeats).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from serve.worker import GenerationFailed
from vdiff.diffusion.sampling import Cancelled
from vdiff.parallel.config import ParallelConfig

log = logging.getLogger("vdiff.serve")
START_TIMEOUT_S = 600.0


class GroupFailed(GenerationFailed):
    """A rank of a worker group died (or the group could not start); the message names the group."""


def parse_groups(text: str) -> list[list[str]]:
    """'cuda:0+cuda:1,cuda:2' -> [['cuda:0', 'cuda:1'], ['cuda:2']]; ValueError naming the flag for an empty part."""
    groups = [[d.strip() for d in part.split("+")] for part in text.split(",")]
    if not groups or any(not d for g in groups for d in g):
        raise ValueError(f"--groups {text!r}: expected devices joined by '+' within a group and ',' between groups, "
                         "e.g. cuda:0+cuda:1,cuda:2+cuda:3")
    return groups


def parse_parallel(settings: Sequence[str]) -> dict[str, Any]:
    """['cfg=2', 'ulysses=2'] (or 'cfg=2,ulysses=2') -> {'cfg': 2, 'ulysses': 2}; ValueError naming what is wrong."""
    known = ("cfg", "ulysses", "vae", "text_encoder")
    out: dict[str, Any] = {}
    for item in (s for text in settings for s in text.split(",") if s.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("parallel.")
        if not sep or key not in known:
            raise ValueError(f"--parallel {item!r}: expected KEY=VALUE with KEY one of {list(known)}")
        out[key] = value.strip() if key == "text_encoder" else _int(key, value)
    return out


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--parallel {key}={value!r}: expected an integer") from None


def group_config(parallel: dict[str, Any], devices: Sequence[str]) -> ParallelConfig:
    """The spawned ParallelConfig of one group; ValueError when the degrees do not match its device count."""
    config = ParallelConfig(**parallel)
    if config.size != len(devices):
        raise ValueError(f"--groups {'+'.join(devices)}: {len(devices)} devices, but --parallel cfg={config.cfg} x "
                         f"ulysses={config.ulysses} = {config.size} ranks; give each multi-device group "
                         f"{config.size} devices or change --parallel")
    return replace(config, launch="spawn", devices=tuple(devices))


def group_pipelines(checkpoint: str | Path, groups: Sequence[Sequence[str]], parallel: dict[str, Any], *,
                    lora: str | Path | None = None, lora_scale: float = 1.0) -> tuple[list[Any], list[str]]:
    """(pipelines, device labels) for the worker pool: a GroupPipeline per group of several devices, a pipeline for
    a group of one. Every group's degrees are checked against its device count and the model before any process
    starts."""
    from vdiff import VideoPipeline
    from vdiff.models.dit import VideoDiT

    configs = [group_config(parallel, g) if len(g) > 1 else None for g in groups]
    model = VideoDiT.load_config(Path(checkpoint) / "transformer")
    for config in configs:
        if config is not None:
            config.check_model(model, config.size)
    pipelines: list[Any] = []
    try:
        for group, config in zip(groups, configs):
            log.info("loading %s on %s", checkpoint, "+".join(group))
            if config is None:
                pipe = VideoPipeline.from_pretrained(checkpoint)
                if lora is not None:
                    pipe.load_lora_weights(lora, scale=lora_scale)
                pipelines.append(pipe.to(group[0]))
            else:
                pipelines.append(GroupPipeline(checkpoint, config, lora=lora, lora_scale=lora_scale))
    except BaseException:
        for pipe in pipelines:
            if isinstance(pipe, GroupPipeline):
                pipe.close()
        raise
    return pipelines, ["+".join(g) for g in groups]


@dataclass
class _Description:
    """What the server needs of a group's pipeline without holding it (serve.validation.limits_for, the worker)."""

    limits: Any
    config: Any
    caches: list[str]
    causal_config: Any
    chunk_pixel_frames: int
    rank_pids: list[int]  # ranks 1..N-1 (rank 0 is the host process)


class GroupPipeline:
    """The server's handle on one worker group (see the module docstring). Callable like a VideoPipeline."""

    def __init__(self, checkpoint: str | Path, config: ParallelConfig, *, lora: str | Path | None = None,
                 lora_scale: float = 1.0, start_timeout: float = START_TIMEOUT_S):
        self.checkpoint, self.parallel_config = str(checkpoint), config
        self.lora, self.lora_scale, self.start_timeout = lora, lora_scale, start_timeout
        self.label = "+".join(config.devices)
        self._lock = threading.Lock()  # one request at a time (the pool gives a group one job at a time)
        self._send_lock = threading.Lock()  # the pipe is not thread-safe: close() may send while a request runs
        self._ready = threading.Event()
        self._closed = False
        self._start_error: BaseException | None = None
        self.restarts = 0
        self._start()
        self._wait_ready()

    # ---- the process ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        spec = {"checkpoint": self.checkpoint, "config": self.parallel_config,
                "lora": None if self.lora is None else str(self.lora), "lora_scale": self.lora_scale}
        self.process = ctx.Process(target=host_main, args=(child, spec), name=f"vdiff-group-{self.label}",
                                   daemon=False)
        self.process.start()
        child.close()
        if not self._conn.poll(self.start_timeout):
            self._kill()
            raise GroupFailed(f"group {self.label}: no answer from its host within {self.start_timeout:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise GroupFailed(f"group {self.label}: its host exited while loading (exit status "
                              f"{self.process.exitcode})") from None
        if kind != "ready":
            self._kill()
            raise _rebuild(payload, self.label)
        d: _Description = payload
        self.limits, self.config, self.caches = d.limits, d.config, d.caches
        self.transformer = SimpleNamespace(causal_config=d.causal_config)
        self.chunk_pixel_frames = d.chunk_pixel_frames
        self.rank_pids = [self.process.pid, *d.rank_pids]
        self._ready.set()

    def _wait_ready(self) -> None:
        if not self._ready.wait(self.start_timeout):
            raise GroupFailed(f"group {self.label}: still restarting after {self.start_timeout:.0f} s")
        if self._start_error is not None:
            raise GroupFailed(f"group {self.label} could not be restarted: {self._start_error}")

    def _restart(self) -> None:
        """Start the group again (in the background: the failing request is answered first)."""
        self._ready.clear()
        self._kill()
        self.restarts += 1

        def again() -> None:
            try:
                self._start()
                self._start_error = None
            except BaseException as exc:  # reported to the next request
                self._start_error = exc
                self._ready.set()

        if not self._closed:
            threading.Thread(target=again, name=f"vdiff-group-restart-{self.label}", daemon=True).start()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self._conn.close()

    def close(self) -> None:
        self._closed = True
        if self._ready.is_set() and self.process.is_alive():
            try:
                with self._send_lock:
                    self._conn.send(("stop", None))
                self.process.join(60)
            except (OSError, BrokenPipeError):
                pass
        self._kill()

    # ---- one request ----------------------------------------------------------------------------------------------

    def __call__(self, callback: Callable[[int, int, Any], Any] | None = None, **kwargs: Any) -> Any:
        with self._lock:
            self._wait_ready()
            conn, cancelled, hook_error = self._conn, False, None
            try:
                with self._send_lock:
                    conn.send(("call", kwargs))
                while True:
                    kind, payload = conn.recv()
                    if kind == "step":  # the host waits for this answer before its next step
                        if not cancelled and callback is not None:
                            try:
                                cancelled = callback(*payload, None) is False
                            except BaseException as exc:  # raised here as on a one-device worker, once the group
                                hook_error, cancelled = exc, True  # has stopped (so the pipe is clean for the next)
                        with self._send_lock:
                            conn.send(("go", not cancelled))
                    elif kind == "broken":
                        self._restart()
                        raise GroupFailed(f"group {self.label}: {payload}; the group is restarting")
                    elif hook_error is not None:
                        raise hook_error
                    elif kind == "done":
                        return payload
                    else:
                        raise _rebuild(payload, self.label)
            except (EOFError, OSError, BrokenPipeError):
                code = self.process.exitcode
                self._restart()
                raise GroupFailed(f"group {self.label}: its leader process died (exit status {code}); the group "
                                  "is restarting") from None


def _rebuild(payload: tuple[str, str], label: str) -> BaseException:
    kind, message = payload
    if kind == "ValueError":
        return ValueError(message)
    if kind == "Cancelled":
        return Cancelled(message)
    if kind == "OutOfMemory":
        from serve.worker import OutOfMemory

        return OutOfMemory(f"group {label}: {message}")
    return GroupFailed(f"group {label}: {message}")


# --------------------------------------------------------------------------------------------------------------------
# The host process (rank 0 of the group)
# --------------------------------------------------------------------------------------------------------------------


def _dead_ranks(leader: Any, wait: float) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        dead = [i + 1 for i, p in enumerate(leader.procs) if p.poll() is not None]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def host_main(conn: Any, spec: dict[str, Any]) -> None:
    """Load the group's pipeline (spawning its other ranks) and serve requests from the pipe until 'stop'."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s vdiff.group: %(message)s")
    from serve.worker import is_out_of_memory
    from vdiff.pipeline import VideoPipeline

    try:
        pipe = VideoPipeline.from_pretrained(spec["checkpoint"], parallel=spec["config"])
        if spec["lora"]:
            pipe.load_lora_weights(spec["lora"], scale=spec["lora_scale"])  # dispatched: every rank loads it
    except BaseException as exc:
        conn.send(("error", (type(exc).__name__ if isinstance(exc, ValueError) else "RuntimeError",
                             f"could not load the pipeline: {type(exc).__name__}: {exc}")))
        return
    conn.send(("ready", _Description(pipe.limits, pipe.config, pipe.caches, pipe.transformer.causal_config,
                                     pipe.chunk_pixel_frames if pipe.transformer.causal_config else 0,
                                     [p.pid for p in pipe.parallel.leader.procs])))
    requests: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()  # the server's go on (True) / stop (False) after each step

    def read() -> None:  # the pipe's reader: step answers go to the running request, requests wait their turn
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                answers.put(False)  # the server is gone: stop the running request after its step
                requests.put(("stop", None))
                return
            if kind == "go":
                answers.put(bool(payload))
            else:
                requests.put((kind, payload))
                if kind == "stop":  # a request still running stops after its step (no answer will come)
                    answers.put(False)
                    return

    threading.Thread(target=read, name="vdiff-group-reader", daemon=True).start()
    leader = pipe.parallel.leader
    while True:
        kind, kwargs = requests.get()
        if kind == "stop":
            break

        def on_step(i: int, n: int, latents: Any) -> bool:
            conn.send(("step", (i, n)))
            return answers.get()

        try:
            out = pipe(**kwargs, callback=on_step, progress=False)
            conn.send(("done", out))
        except BaseException as exc:
            lost = "Connection closed by peer" in str(exc) or "Connection reset" in str(exc)
            dead = _dead_ranks(leader, wait=5.0 if lost else 0.0)  # the socket can close before the exit is seen
            if dead or lost:
                detail = leader.describe_exit(dead[0]) if dead else f"{type(exc).__name__}: {exc}"
                log.error("group rank lost: %s", detail)
                conn.send(("broken", f"rank {dead[0] if dead else '?'} died during the request ({detail[:300]})"))
                leader.kill()
                os._exit(3)  # the process group is broken: the server starts a new host
            if isinstance(exc, Cancelled):
                payload = ("Cancelled", str(exc))
            elif isinstance(exc, ValueError):
                payload = ("ValueError", str(exc))
            elif is_out_of_memory(exc):
                payload = ("OutOfMemory", str(exc))
            else:
                log.error("request failed:\n%s", traceback.format_exc())
                payload = ("RuntimeError", f"{type(exc).__name__}: {exc}")
            conn.send(("error", payload))
    pipe.parallel.close()

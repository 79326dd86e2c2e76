"""`ParallelConfig(launch="spawn")`: a parallel pipeline from one Python process (a notebook, the server) without
torchrun. The caller becomes rank 0 (the leader); ranks 1..N-1 are started on loopback as `python -m
vdiff.parallel.spawn` and load the same folder (followers). Afterwards the leader's pipeline is used as usual:

    pipe = VideoPipeline.from_pretrained("ckpt", parallel=ParallelConfig(cfg=2, launch="spawn"))
    out = pipe("a red circle moving right", seed=0)     # the followers run the same call
    pipe.parallel.close()                               # or at interpreter exit: the followers stop

Protocol (one gloo group over the N ranks, `Leader.dispatch`): every call of a dispatched pipeline method on the
leader (generation, LoRA and cache changes: see `DISPATCHED`) first broadcasts (method, args, kwargs) to the
followers, who run the same method; callbacks and progress bars stay on the leader (a cancel still reaches every
rank: the step callback's stop flag is reduced over the group). When no call comes for `HEARTBEAT_S` seconds the
leader broadcasts a no-op, so an idle group never reaches a collective timeout. `stream()` on the leader is
announced the same way and the followers iterate the same stream (`Leader.stream`). A follower whose leader is gone
(its socket closes) leaves with an error; a follower that dies makes the leader's next collective fail, and the
leader's call raises.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vdiff.parallel.config import ParallelConfig

log = logging.getLogger("vdiff.parallel")

# Pipeline methods that run on every rank when the leader calls them (they change what a rank computes).
DISPATCHED = ("__call__", "load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora_weights",
              "enable_cache", "disable_cache")
LOCAL_ONLY = ("callback", "progress")  # arguments that stay on the leader (followers get None / False)
HEARTBEAT_S = float(os.environ.get("VDIFF_SPAWN_HEARTBEAT", "60"))
FOLLOWER_ENV = "VDIFF_SPAWN_FOLLOWER"  # set in a follower's environment: its from_pretrained joins, never spawns
# the group's collective timeout (rendezvous, group creation, any exchange); an idle group is kept alive by heartbeats
TIMEOUT_S = float(os.environ.get("VDIFF_SPAWN_TIMEOUT", "1800"))


def dispatched(method: Callable) -> Callable:
    """Decorator for a pipeline method that every rank of a spawned group must run (see `DISPATCHED`)."""
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, "parallel", None)
        leader = getattr(runtime, "leader", None)
        if leader is None:
            return method(self, *args, **kwargs)
        return leader.run(method.__name__, lambda: method(self, *args, **kwargs), args, kwargs)

    return call


def rank_device(config: ParallelConfig, rank: int) -> str:
    """The device of `rank` in a spawned group: config.devices[rank], else cuda:rank on GPUs, else the CPU."""
    if config.devices:
        return config.devices[rank]
    return f"cuda:{rank}" if torch.cuda.is_available() else "cpu"


class Leader:
    """Rank 0 of a spawned group: the follower processes and the dispatch of calls to them."""

    def __init__(self, config: ParallelConfig, procs: list[subprocess.Popen], logs: list[Path]):
        self.config, self.procs, self.logs = config, procs, logs
        self.group: Any = None  # set by `attach` once every rank has created it
        self._lock = threading.RLock()  # one dispatch (and the call it announces) at a time
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._depth = threading.local()
        self.streaming = False  # a stream() is open: the followers iterate it too, and no other call may start
        self.heartbeats = 0
        atexit.register(self.close)

    def attach(self) -> None:
        """Create the dispatch group (collective with the followers' `follow`) and start the heartbeat."""
        self.group = dispatch_group(self.config.size)
        threading.Thread(target=self._heartbeat, name="vdiff-spawn-heartbeat", daemon=True).start()

    def run(self, name: str, thunk: Callable[[], Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """Announce `name(*args, **kwargs)` to the followers, then run it here (`thunk`). A dispatched method called
        from inside another one (e.g. a cache enabled by a call) is not announced again."""
        if getattr(self._depth, "n", 0):
            return thunk()
        with self._lock:
            self._announce(name, args, kwargs)
            self._depth.n = 1
            try:
                return thunk()
            finally:
                self._depth.n = 0
                self._last = time.monotonic()

    def stream(self, make: Callable[[], Any], kwargs: dict[str, Any]) -> Any:
        """A generator over `make()` (the leader's own stream) whose first step announces `stream(**kwargs)` to the
        followers, who iterate the same stream in lockstep (vdiff.streaming: each chunk starts with rank 0's go-on
        or stop). Until it ends or is closed, other calls on the group are refused and heartbeats pause: a stream
        left unread for longer than the group's timeout (VDIFF_SPAWN_TIMEOUT) breaks the group."""
        with self._lock:
            self._announce("__stream__", (), kwargs)
            self.streaming = True
        try:
            yield from make()
        finally:
            self.streaming = False
            self._last = time.monotonic()

    def _announce(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Broadcast one call to the followers (its LOCAL_ONLY arguments left out); refused while a stream is open,
        since the followers are inside it."""
        if self.streaming:
            shown = "stream" if name == "__stream__" else name
            raise RuntimeError(f"parallel: {shown}() while a stream() of this spawned group is open; iterate the "
                               f"stream to its end or close() it first")
        self._send((name, args, {k: v for k, v in kwargs.items() if k not in LOCAL_ONLY}))

    def in_call(self) -> bool:
        """True inside a dispatched call on this thread (the followers are running the same call)."""
        return bool(getattr(self._depth, "n", 0))

    def _send(self, message: Any) -> None:
        dead = [i + 1 for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"parallel: rank(s) {dead} of the spawned group have exited "
                               f"({self.describe_exit(dead[0])}); the group must be started again")
        dist.broadcast_object_list([message], src=0, group=self.group)

    def _heartbeat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S / 4):
            if self.streaming or time.monotonic() - self._last < HEARTBEAT_S:
                continue
            with self._lock:
                if self._stopped.is_set():
                    return
                try:
                    self._send(("__noop__", (), {}))
                except Exception as exc:  # a follower died: the next call reports it
                    log.warning("parallel: heartbeat failed: %s", exc)
                    return
                self._last = time.monotonic()
                self.heartbeats += 1

    def describe_exit(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        text = self.logs[rank - 1].read_text(errors="replace") if self.logs[rank - 1].exists() else ""
        tail = "\n".join(line for line in text.splitlines() if line.strip() and "it/s]" not in line)[-1500:]
        return f"rank {rank} exit status {proc.returncode}" + (f"; its log ends:\n{tail}" if tail else "")

    def close(self, timeout: float = 60.0) -> None:
        """Stop the followers (they leave the process group with the leader) and end the group. Idempotent."""
        if self._stopped.is_set():
            return
        with self._lock:
            self._stopped.set()
            alive = all(p.poll() is None for p in self.procs)
            try:
                if alive and self.group is not None and dist.is_initialized():
                    dist.broadcast_object_list([("__stop__", (), {})], src=0, group=self.group)
                    dist.barrier(group=self.group)
            except Exception as exc:
                log.warning("parallel: stopping the followers failed: %s", exc)
            if dist.is_initialized():
                dist.destroy_process_group()
            for proc in self.procs:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        atexit.unregister(self.close)

    def kill(self) -> None:
        """End the followers at once (a broken group); the leader's process group is left to the caller."""
        self._stopped.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_process(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The default way a follower starts: a child process running `argv` (its output in `log_path`)."""
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, *argv], env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT)


# How followers start: a callable (argv, env, log_path) -> a handle with pid, poll(), returncode, wait(timeout)
# and kill(), like subprocess.Popen. serve/ray_app.py swaps in Ray actors (`use_starter`).
_STARTER: list[Callable[..., Any]] = [start_process]


class use_starter:  # noqa: N801 (a context manager used as a statement)
    """`with use_starter(fn): VideoPipeline.from_pretrained(..., parallel=ParallelConfig(launch="spawn"))`."""

    def __init__(self, starter: Callable[..., Any]):
        self.starter = starter

    def __enter__(self) -> None:
        _STARTER.append(self.starter)

    def __exit__(self, *exc: Any) -> None:
        _STARTER.pop()


def spawn_group(config: ParallelConfig, folder: str | Path, load_kwargs: dict[str, Any]) -> Leader:
    """Start ranks 1..N-1 on loopback and initialise this process as rank 0 of the group (gloo on CPU, NCCL on GPUs
    plus gloo for control). `load_kwargs`: what the followers pass to `VideoPipeline.from_pretrained` (JSON-able)."""
    from vdiff.runtime import free_port

    if dist.is_initialized():
        raise RuntimeError("parallel.launch='spawn': this process is already in a process group (a spawned pipeline "
                           "that is still open: call its pipe.parallel.close() first; under torchrun use "
                           "launch='torchrun')")
    port = free_port()
    logs_dir = Path(os.environ.get("VDIFF_SPAWN_LOGS", "") or _tempdir())
    procs, logs = [], []
    spec = json.dumps({"config": {**asdict(config), "devices": list(config.devices)}, "load": load_kwargs})
    for rank in range(1, config.size):
        env = {FOLLOWER_ENV: "1", "RANK": str(rank), "WORLD_SIZE": str(config.size),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(config.size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(logs_dir / f"rank{rank}.log")
        procs.append(_STARTER[-1](["-m", "vdiff.parallel.spawn", str(folder), spec], env, logs[-1]))
    leader = Leader(config, procs, logs)
    try:
        _init_group(0, config.size, port, rank_device(config, 0))
    except BaseException:
        leader.kill()
        raise
    return leader


def _init_group(rank: int, world: int, port: int, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))


def dispatch_group(size: int) -> Any:
    """The gloo group the leader broadcasts calls over (collective: every rank creates it, in the same order)."""
    return dist.new_group(list(range(size)), backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="vdiff-spawn-")


def follow(pipe: Any, group: Any) -> None:
    """A follower's loop: run every method the leader announces until it says stop (or its socket closes)."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        name, args, kwargs = box[0]
        if name == "__stop__":
            dist.barrier(group=group)
            return
        if name == "__noop__":
            continue
        if name in ("__call__", "__stream__"):
            kwargs = {**kwargs, "progress": False}
        try:
            if name == "__stream__":  # the leader's stream, chunk by chunk, until it ends or rank 0 says stop
                for _ in pipe.stream(**kwargs):
                    pass
            else:
                getattr(pipe, name)(*args, **kwargs)
        except Exception as exc:  # the leader sees the same failure (checks agree on every rank); keep following
            log.info("parallel follower: %s raised %s: %s", name, type(exc).__name__, exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A follower rank of a spawned parallel pipeline (started by "
                                                 "ParallelConfig(launch='spawn'); not run by hand).")
    parser.add_argument("folder")
    parser.add_argument("spec", help="JSON: {config: ParallelConfig fields, load: from_pretrained keyword arguments}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    spec = json.loads(args.spec)
    config = ParallelConfig(**{**spec["config"], "devices": tuple(spec["config"]["devices"])})
    from vdiff.pipeline import VideoPipeline  # imported before the rendezvous: the leader waits from there on

    rank = int(os.environ["RANK"])
    device = rank_device(config, rank)
    _init_group(rank, config.size, int(os.environ["MASTER_PORT"]), device)

    load = dict(spec["load"])
    if load.get("torch_dtype"):
        load["torch_dtype"] = getattr(torch, load["torch_dtype"])
    pipe = VideoPipeline.from_pretrained(args.folder, parallel=config, device=device, **load)
    group = dispatch_group(config.size)  # the leader's Leader.attach
    try:
        follow(pipe, group)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by tests/test_serve.py and tests/test_browser.py: a real tiny pipeline on disk, a real server on loopback.

No fake pipeline: the checkpoint is a random-weight tiny VideoPipeline written with `save_pretrained` and served
through `serve.app.serve`, exactly as `./launch.sh serve --checkpoint DIR` does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import av
import numpy as np
import torch

from serve.worker import Job

HOLD = "[hold]"  # a prompt containing this waits at its first step until released or cancelled
OOM = "[oom]"  # a prompt containing this raises torch.OutOfMemoryError at its second step


def save_tiny_pipeline(path: Path, causal: bool = False) -> Path:
    """A random-weight tiny pipeline on disk; `causal`: block-causal (chunks of 2 frames, sink 1, window 1)."""
    from vdiff import VideoPipeline
    from vdiff.config import CausalConfig, model_preset

    extra = {"causal": CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=1)} if causal else {}
    pipe = VideoPipeline.from_model_config(model_preset("tiny", num_layers=2, **extra), seed=0)
    return pipe.save_pretrained(path)


class StepControl:
    """Step hooks for the server's workers: hold marked requests at step 0 (until released or cancelled), and raise
    a real torch.OutOfMemoryError inside the pipeline's denoising loop for [oom] requests."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = threading.Event()  # set while a held request is waiting

    def __call__(self, job: Job, step: int, num_steps: int) -> None:
        prompt = job.request.prompt
        if OOM in prompt and step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the test)")
        if HOLD in prompt and step == 0:
            self.held.set()
            deadline = time.monotonic() + 60
            while not self.release.is_set() and not job.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            self.held.clear()


def port_outside_ephemeral_range(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range, for a server that binds it later (Ray Serve's proxy):
    processes that bind port 0 meanwhile (Ray starts many) cannot take it."""
    import random
    import socket

    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    ports = range(20000, max(20001, low))  # above Ray's worker ports (10002-19999)
    for port in random.Random().sample(ports, min(200, len(ports))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000..{low - 1} on {host}")


def decode_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3), decoded with PyAV (what a player would show)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264", stream.codec_context.name
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def serving(checkpoint: str | Path, **kwargs):
    """A real server (page + job API) for `checkpoint` on a free loopback port, closed at the end."""
    from serve.app import serve
    from vdiff.runtime import free_port

    srv = serve(checkpoint, port=free_port(), block=False, quiet=True, **kwargs)
    try:
        yield srv
    finally:
        srv.close()

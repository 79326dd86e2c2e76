"""Worker groups (serve.groups): a 2-rank cfg=2 group (a host process that spawns its second rank) and a 1-rank
worker behind one server. Concurrent clients are served by both at once, the group's video equals one process, a
cancel stops the group after a step, a rank killed during a request fails that request with a clear error while
the other worker keeps serving, and the group is restarted and serves again. The server's step hooks run in step
with the group (the host waits for each step's answer), so the kill below lands before the group's next step.
Real processes, gloo, CPU."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from _serve_helpers import HOLD, OOM, StepControl, decode_video, save_tiny_pipeline, wait_until

from serve.groups import GroupFailed, group_config, parse_groups, parse_parallel
from serve.worker import OutOfMemory
from vdiff.diffusion.sampling import Cancelled

KILL = "[kill-rank-1]"  # on the group, a prompt containing this kills its rank 1 at the second step


def test_group_flags_are_checked():
    assert parse_groups("cuda:0+cuda:1,cuda:2") == [["cuda:0", "cuda:1"], ["cuda:2"]]
    assert parse_parallel(["cfg=2", "ulysses=2,text_encoder=replicate"]) == {"cfg": 2, "ulysses": 2,
                                                                             "text_encoder": "replicate"}
    with pytest.raises(ValueError, match=r"--groups 'cuda:0\+,cuda:1': expected devices joined by '\+'"):
        parse_groups("cuda:0+,cuda:1")
    with pytest.raises(ValueError, match=r"--parallel 'ring=2': expected KEY=VALUE with KEY one of"):
        parse_parallel(["ring=2"])
    with pytest.raises(ValueError, match=r"--parallel cfg='two': expected an integer"):
        parse_parallel(["cfg=two"])
    with pytest.raises(ValueError, match=r"--groups cpu\+cpu\+cpu: 3 devices, but --parallel cfg=2 x ulysses=1 = 2"):
        group_config({"cfg": 2}, ["cpu", "cpu", "cpu"])
    config = group_config({"cfg": 2}, ["cpu", "cpu"])
    assert config.launch == "spawn" and config.devices == ("cpu", "cpu")


def test_serve_cli_refuses_bad_groups(tmp_path, capsys):
    from serve.__main__ import main

    folder = save_tiny_pipeline(tmp_path / "p")
    assert main(["--checkpoint", str(folder), "--groups", "cpu+cpu", "--parallel", "cfg=2", "ulysses=2"]) == 2
    assert "--groups cpu+cpu: 2 devices, but --parallel cfg=2 x ulysses=2 = 4 ranks" in capsys.readouterr().err
    assert main(["--checkpoint", str(folder), "--parallel", "cfg=2"]) == 2
    assert "--parallel needs --groups" in capsys.readouterr().err
    assert main(["--checkpoint", str(folder), "--groups", "cpu+cpu", "--devices", "cpu"]) == 2
    assert "--groups and --devices are exclusive" in capsys.readouterr().err


class _Killer:
    """A step hook: kills rank 1 of the job's group at step 1 (the worker then waits in the group's exchange)."""

    def __init__(self, pool):
        self.pool, self.killed = pool, threading.Event()

    def __call__(self, job, step, num_steps):
        on_group = job.worker == 0  # the pool's first "device" is the group
        if KILL in job.request.prompt and on_group and step == 1 and not self.killed.is_set():
            os.kill(self.pool.pipelines[job.worker].rank_pids[1], signal.SIGKILL)
            self.killed.set()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_group_and_a_single_worker_serve_cancel_and_survive_a_lost_rank(tmp_path, monkeypatch):
    from serve.app import serve
    from serve.validation import GenerationRequest
    from vdiff import VideoPipeline
    from vdiff.runtime import free_port

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VDIFF_SPAWN_LOGS", str(tmp_path))
    folder = save_tiny_pipeline(tmp_path / "p")
    control = StepControl()
    srv = serve(folder, port=free_port(), groups=[["cpu", "cpu"], ["cpu"]], parallel={"cfg": 2}, block=False,
                quiet=True, step_hooks=[control], display_scale=1, max_queue=4)
    pool = srv.pool
    killer = _Killer(pool)
    pool.step_hooks.append(killer)
    try:
        assert pool.devices == ["cpu+cpu", "cpu"]
        group = pool.pipelines[0]

        def request(prompt: str, steps: int = 3, seed: int = 5) -> GenerationRequest:
            return GenerationRequest(prompt=prompt, negative_prompt=None, seed=seed, num_inference_steps=steps,
                                     guidance_scale=4.0, num_frames=4, height=32, width=32, attention="dense",
                                     attention_is_default=True)

        # two concurrent held requests: one on the group, one on the single worker, at the same time
        jobs = [pool.submit(request(f"{HOLD} a red circle moving left")) for _ in range(2)]
        assert wait_until(lambda: pool.status()["running"] == 2, timeout=120)
        assert sorted(j.worker for j in jobs) == [0, 1]
        control.release.set()
        videos = {j.worker: decode_video(j.wait(180).path) for j in jobs}
        ref = VideoPipeline.from_pretrained(folder)("[hold] a red circle moving left", seed=5, num_inference_steps=3,
                                                  guidance_scale=4.0, num_frames=4, height=32, width=32).frames
        for worker, video in videos.items():  # the 2-rank group's video is the one-process video (up to the codec)
            assert video.shape == ref.shape and np.abs(video.astype(int) - videos[1].astype(int)).max() <= 2, worker
        control.release.clear()

        # the HTTP job API in front of the groups
        r = httpx.post(f"{srv.url}v1/videos", json={"prompt": "a blue square moving up", "seed": 1,
                                                     "num_inference_steps": 2, "num_frames": 4, "height": 32,
                                                     "width": 32}, timeout=30)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert wait_until(lambda: httpx.get(f"{srv.url}v1/videos/{job_id}", timeout=10).json()["status"]
                          == "completed", timeout=180)

        # cancel on the group: every rank stops after the step the cancel reached
        held = pool.submit(request(f"{HOLD} a green circle", steps=6))
        other = pool.submit(request(f"{HOLD} a green square", steps=6))
        assert wait_until(lambda: pool.status()["running"] == 2, timeout=60)
        on_group = held if held.worker == 0 else other
        on_group.cancel()
        control.release.set()
        with pytest.raises(Cancelled):
            on_group.wait(120)
        (other if on_group is held else held).wait(120)
        control.release.clear()

        # a step hook that raises on the group fails that request as on the single worker, and the group goes on
        # (the host waits for each step's answer, so nothing of the failed request is left in the pipe)
        pair = [pool.submit(request(f"{OOM} {HOLD} a blue circle", steps=4)) for _ in range(2)]
        assert wait_until(lambda: pool.status()["running"] == 2, timeout=60)
        control.release.set()
        for job in pair:
            with pytest.raises(OutOfMemory, match="out of memory"):
                job.wait(120)
        control.release.clear()

        # a rank dies during a request: that request fails with the group's name, the single worker keeps serving
        pids = list(group.rank_pids)
        pair = [pool.submit(request(f"{KILL} {HOLD} a red square", steps=4)) for _ in range(2)]
        assert wait_until(lambda: pool.status()["running"] == 2, timeout=60)
        victim, bystander = sorted(pair, key=lambda j: j.worker)  # worker 0 is the group
        control.release.set()
        lost = r"(?s)group cpu\+cpu: rank 1 died during the request \(rank 1 exit status -9.*restarting"
        with pytest.raises(GroupFailed, match=lost):
            victim.wait(120)
        assert killer.killed.is_set()
        bystander.wait(120)
        # restarted: new processes, and the next request on the group succeeds
        assert wait_until(lambda: group._ready.is_set(), timeout=180)
        assert group.restarts == 1 and group.rank_pids != pids
        control.release.clear()
        again = [pool.submit(request(f"{HOLD} a red circle moving left")) for _ in range(2)]
        assert wait_until(lambda: pool.status()["running"] == 2, timeout=120)  # the restarted group took one
        control.release.set()
        for job in again:
            video = decode_video(job.wait(180).path)
            assert np.abs(video.astype(int) - videos[1].astype(int)).max() <= 2, job.worker  # the same video
    finally:
        control.release.set()
        srv.close()
    time.sleep(0.5)
    for pid in group.rank_pids:  # closing the server ended every rank of the group
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True

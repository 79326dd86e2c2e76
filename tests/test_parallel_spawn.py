"""ParallelConfig(launch="spawn"): the calling process is rank 0 and starts the other ranks on loopback. Run as a
script in its own process (it becomes a process-group member), as a notebook would: the spawned cfg=2 pipeline
equals one process, a cancel on the leader stops every rank, cache changes reach the followers, an idle group
outlives the collective timeout (heartbeats), close() ends every follower, a causal model's call and stream() run on
both ranks, and a dead follower fails the next call with its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SMALL = dict(num_frames=4, height=16, width=16, num_inference_steps=4, guidance_scale=4.0)


def test_every_dispatched_method_is_wrapped():
    from vdiff.parallel.spawn import DISPATCHED
    from vdiff.pipeline import VideoPipeline

    for name in DISPATCHED:
        assert hasattr(getattr(VideoPipeline, name), "__wrapped__"), name


def test_spawn_settings_are_checked():
    from vdiff import ParallelConfig

    assert ParallelConfig(cfg=2, launch="spawn", devices="cpu+cpu").devices == ("cpu", "cpu")
    with pytest.raises(ValueError, match=r"parallel.launch must be one of \['torchrun', 'spawn'\]"):
        ParallelConfig(launch="fork")
    with pytest.raises(ValueError, match=r"parallel.devices: 1 devices \(cpu\) for cfg=2 x ulysses=1 = 2 ranks"):
        ParallelConfig(cfg=2, launch="spawn", devices=("cpu",))
    with pytest.raises(ValueError, match=r"parallel.devices is for launch='spawn'"):
        ParallelConfig(cfg=2, devices="cpu+cpu")


@pytest.mark.distributed
@pytest.mark.slow
def test_spawned_group_equals_one_process_and_follows_the_leader(tmp_path):
    from test_parallel_generation import _save_tiny

    folder = _save_tiny(tmp_path / "p")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "VDIFF_SPAWN_HEARTBEAT": "1",
           "VDIFF_SPAWN_TIMEOUT": "20", "VDIFF_SPAWN_LOGS": str(tmp_path)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, __file__, str(folder), str(tmp_path / "res.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["latent_scale"] > 0.1 and res["latent_err"] <= 1e-5 and res["frame_err"] <= 1, res
    assert res["stats"]["world_size"] == 2 and res["stats"]["rank"] == 0
    assert res["cancel"].endswith("after step 2/4") and res["after_cancel_err"] <= 1e-5, res
    assert res["step_cache"]["pattern"] == res["step_cache"]["ref_pattern"] and "S" in res["step_cache"]["pattern"]
    assert res["step_cache"]["err"] <= 1e-4
    assert res["idle_heartbeats"] >= 5 and res["after_idle_err"] <= 1e-5, res  # idle 25 s > the 20 s timeout
    assert res["exit_codes"] == [0]
    assert res["causal_frame_err"] <= 1  # uint8 rounding of equal floats
    assert res["causal_kv_bytes"][1] * 2 == res["causal_kv_bytes"][0] > 0  # rank 0 holds the conditional K/V only
    # stream() on the leader: the follower iterates it too (a prompt switch, a close after 4 chunks of an
    # open-ended stream, a finite one read to its end), other calls wait for it to close, and the group goes on
    assert res["stream_err"] <= 1 and res["stream_full_err"] <= 1 and res["after_stream_err"] <= 1, res
    assert "__call__() while a stream() of this spawned group is open" in res["during_stream"]
    assert "rank(s) [1] of the spawned group have exited" in res["dead"] and "exit status -9" in res["dead"]


def _script(folder: str, out: str) -> None:
    import itertools
    import time

    import numpy as np

    from vdiff import ParallelConfig
    from vdiff.cache import StepCacheConfig
    from vdiff.diffusion.sampling import Cancelled
    from vdiff.pipeline import VideoPipeline

    plain = VideoPipeline.from_pretrained(folder)

    def run(pipe, **kw):
        seen = {}
        o = pipe("a red circle moving right", seed=0, **{**SMALL, **kw},
                 callback=lambda i, n, lat: seen.__setitem__("lat", lat.clone()))
        return o, seen["lat"]

    ref, ref_lat = run(plain)
    pipe = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2, launch="spawn"))
    got, lat = run(pipe)
    res = {"latent_err": (lat - ref_lat).abs().max().item(), "latent_scale": ref_lat.abs().max().item(),
           "frame_err": int(np.abs(got.videos.astype(int) - ref.videos.astype(int)).max()),
           "stats": got.stats.parallel}
    try:  # the leader cancels after step 1; the followers stop after the same step and take the next call
        pipe("a red circle", seed=1, **SMALL, callback=lambda i, n, lat: False if i == 1 else None)
        res["cancel"] = "no error"
    except Cancelled as err:
        res["cancel"] = str(err)
    res["after_cancel_err"] = (run(pipe)[1] - ref_lat).abs().max().item()
    step = StepCacheConfig(threshold=0.6, warmup_steps=1)
    for p in (plain, pipe):
        p.enable_cache(step)  # on the spawned pipeline: dispatched to the follower
    (a, a_lat), (b, b_lat) = run(plain, num_inference_steps=8), run(pipe, num_inference_steps=8)
    res["step_cache"] = {"pattern": b.stats.cache["step"]["pattern"], "ref_pattern": a.stats.cache["step"]["pattern"],
                         "err": (a_lat - b_lat).abs().max().item()}
    for p in (plain, pipe):
        p.disable_cache("step")
    before = pipe.parallel.leader.heartbeats
    time.sleep(25)  # longer than the group's 20 s collective timeout: the follower waits on heartbeats
    res["idle_heartbeats"] = pipe.parallel.leader.heartbeats - before
    res["after_idle_err"] = (run(pipe)[1] - ref_lat).abs().max().item()
    procs = pipe.parallel.leader.procs
    pipe.parallel.close()
    res["exit_codes"] = [p.returncode for p in procs]

    # a second group after close, of a causal model: pipe(...) and stream() run the chunks on both ranks
    from vdiff.config import CausalConfig, model_preset
    from vdiff.pipeline import PipelineConfig

    causal = Path(out).parent / "causal"
    model = model_preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                         causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=1))
    config = PipelineConfig(num_frames=6, height=16, width=16, num_inference_steps=2, guidance_scale=3.0,
                            text_max_length=16, cache=["text_kv", "causal_kv"])
    VideoPipeline.from_model_config(model, config=config, seed=0).save_pretrained(causal)
    again = VideoPipeline.from_pretrained(causal, parallel=ParallelConfig(cfg=2, launch="spawn"))
    one = VideoPipeline.from_pretrained(causal)("a red circle", seed=2)
    two = again("a red circle", seed=2)
    res["causal_frame_err"] = int(np.abs(one.videos.astype(int) - two.videos.astype(int)).max())
    res["causal_kv_bytes"] = [o.stats.cache["causal_kv"]["kv_bytes"] for o in (one, two)]
    plain_causal = VideoPipeline.from_pretrained(causal)

    def take(p, count, **kw):  # the first `count` chunks of an open-ended stream, then the caller stops
        gen = p.stream("a red circle", seed=2, **kw)
        frames = [chunk.frames for chunk in itertools.islice(gen, count)]
        gen.close()
        return np.concatenate(frames).astype(int)

    switch = {2: "a blue square"}
    res["stream_err"] = int(np.abs(take(again, 4, prompts=switch) - take(plain_causal, 4, prompts=switch)).max())
    res["stream_full_err"] = int(np.abs(take(again, 3, num_chunks=3) - one.videos[0].astype(int)).max())
    gen = again.stream("a red circle", seed=2)
    next(gen)
    try:  # the followers are in the stream: another call now would interleave with it
        again("a red circle", seed=2)
        res["during_stream"] = "no error"
    except RuntimeError as err:
        res["during_stream"] = str(err)
    gen.close()
    res["after_stream_err"] = int(np.abs(again("a red circle", seed=2).videos.astype(int)
                                         - one.videos.astype(int)).max())
    again.parallel.leader.procs[0].kill()
    again.parallel.leader.procs[0].wait()
    try:
        again("a red circle", seed=0, **SMALL)
        res["dead"] = "no error"
    except RuntimeError as err:
        res["dead"] = str(err)
    again.parallel.leader.kill()
    Path(out).write_text(json.dumps(res, default=float))
    os._exit(0)  # the broken group's gloo threads: leave without waiting for them


if __name__ == "__main__":
    _script(*sys.argv[1:3])

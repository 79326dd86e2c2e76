"""The web app and HTTP API, driven by a real client (gradio_client) against a real server on loopback.

The server runs the real pipeline (tiny, random weights, saved and loaded from disk); requests use 2 steps of
8 x 32 x 32. Faults are real code paths: the OOM case raises torch.OutOfMemoryError inside the pipeline's denoising
loop (through the server's step hooks), the disconnect case kills a client process mid-generation.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serve_helpers import HOLD, OOM, StepControl, decode_video, save_tiny_pipeline, wait_until

from serve.app import build_app, format_stats, launch_kwargs, parse_auth, serve
from serve.validation import Limits, RequestError, limits_for, validate_request
from serve.worker import OutputStore, ServerBusy, WorkerPool
from vdiff.limits import GenerationLimits, Span
from vdiff.runtime import free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

FAST = dict(num_inference_steps=2, num_frames=8, height=32, width=32)
API_PARAMS = ["prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "num_frames", "height",
              "width", "attention", "cache"]
MAX_QUEUE = 3  # 4 concurrent clients on one device: 1 runs, 3 wait
MAX_OUTPUTS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("serve") / "tiny-pipeline")


@pytest.fixture(scope="module")
def control() -> StepControl:
    return StepControl()


@pytest.fixture(scope="module")
def server(checkpoint, control):
    srv = serve(checkpoint, port=free_port(), max_queue=MAX_QUEUE, max_outputs=MAX_OUTPUTS, block=False, quiet=True,
                step_hooks=[control], display_scale=1)  # served videos as generated (the browser test: upscaled)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False)


@pytest.fixture(autouse=True)
def _released(control):
    control.release.clear()
    yield
    control.release.set()  # never leave a held request behind


def _generate(client: Client, **kwargs):
    return client.predict(**{**FAST, **kwargs}, api_name="/generate")


def _path(video) -> str:
    """The local path of a downloaded Video output (a str, or {"video": path} in older gradio_client versions)."""
    return video["video"] if isinstance(video, dict) else video


def _idle(server) -> bool:
    s = server.pool.status()
    return s["running"] == 0 and s["waiting"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def test_api_parameters_are_named_as_the_pipeline(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in api["parameters"]] == API_PARAMS
    # No input takes a file: a client has no way to hand the server a path.
    assert not any("file" in json.dumps(p["type"]).lower() for p in api["parameters"])


def test_generation_returns_playable_mp4_of_the_asked_video(server, client, checkpoint, tmp_path):
    from vdiff import VideoPipeline

    video, line, stats = _generate(client, prompt="a red circle moving right", seed=7, cache=[])
    frames = decode_video(_path(video))
    assert frames.shape == (8, 32, 32, 3)
    assert stats["seed"] == 7 and stats["steps"] == 2 and stats["num_frames"] == 8
    assert "seed 7" in line and "attention dense" in line
    # The known answer: the same pipeline called directly with the same arguments, written by the same encoder,
    # decodes to exactly the same frames; another seed does not.
    pipe = VideoPipeline.from_pretrained(checkpoint)
    pipe("a red circle moving right", seed=7, cache=[], **FAST).save(tmp_path / "direct.mp4")
    pipe("a red circle moving right", seed=8, cache=[], **FAST).save(tmp_path / "other.mp4")
    np.testing.assert_array_equal(frames, decode_video(tmp_path / "direct.mp4"))
    assert np.abs(frames.astype(np.float32) - decode_video(tmp_path / "other.mp4")).mean() > 10


def test_random_seed_is_reported_and_reproducible(client):
    _, _, stats = _generate(client, prompt="a blue square moving up", seed="random")
    seed = stats["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    a, _, _ = _generate(client, prompt="a blue square moving up", seed=seed)
    b, _, _ = _generate(client, prompt="a blue square moving up", seed=seed)
    np.testing.assert_array_equal(decode_video(_path(a)), decode_video(_path(b)))


def test_stats_report_attention_density_and_cache_hits(client):
    _, line, stats = _generate(client, prompt="a green triangle moving left", seed=1, cache=["text_kv"],
                               attention="vmoba")
    assert stats["attention"] == "vmoba" and 0.0 < stats["attention_density"] < 1.0
    assert stats["cache"]["text_kv"]["hits"] > 0
    assert "attention vmoba density" in line and "text_kv" in line


def test_four_concurrent_clients_all_complete(server):
    before = server.pool.status()["completed"]
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = _generate(Client(server.url, verbose=False), prompt=f"a yellow circle moving down {i}", seed=i)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert sorted(results) == [0, 1, 2, 3]
    for i, (video, _, stats) in results.items():
        assert stats["seed"] == i
        assert decode_video(_path(video)).shape == (8, 32, 32, 3)
    assert server.pool.status()["completed"] == before + 4


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and faults
# ---------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(prompt=""), "prompt must not be empty"),
    (dict(prompt="   "), "prompt must not be empty"),
    (dict(prompt="x" * 501), "prompt is too long: 501 characters, the limit is 500"),
    (dict(prompt=5), "prompt must be a string"),
    (dict(prompt="ok", negative_prompt="n" * 501), "negative_prompt is too long"),
    (dict(prompt="ok", num_frames=0), "num_frames must be an integer in [1,"),
    (dict(prompt="ok", num_frames=100000), "num_frames must be an integer in [1,"),
    (dict(prompt="ok", num_frames=8.5), "num_frames must be an integer"),
    (dict(prompt="ok", num_frames="ten"), "num_frames must be an integer"),
    (dict(prompt="ok", num_frames=256, height=256, width=256), "tokens; this server allows at most"),
    (dict(prompt="ok", height=33), "height must be a multiple of 8"),
    (dict(prompt="ok", width=-32), "width must be an integer in [8,"),
    (dict(prompt="ok", num_inference_steps=0), "num_inference_steps must be an integer in [1, 100]"),
    (dict(prompt="ok", num_inference_steps=101), "num_inference_steps must be an integer in [1, 100]"),
    (dict(prompt="ok", num_inference_steps=True), "num_inference_steps must be an integer"),
    (dict(prompt="ok", guidance_scale=-1), "guidance_scale must be a number in [0, 50]"),
    (dict(prompt="ok", guidance_scale=1e9), "guidance_scale must be a number in [0, 50]"),
    (dict(prompt="ok", guidance_scale="nan"), "guidance_scale must be a finite number"),
    (dict(prompt="ok", guidance_scale="inf"), "guidance_scale must be a finite number"),
    (dict(prompt="ok", guidance_scale=[5]), "guidance_scale must be a number"),
    (dict(prompt="ok", seed=-5), "seed must be \"random\""),
    (dict(prompt="ok", seed="lucky"), "seed must be \"random\""),
    (dict(prompt="ok", attention="nope"), "attention must be one of ['dense'"),
    (dict(prompt="ok", attention=3), "attention must be one of"),
    (dict(prompt="ok", cache="text_kv"), "cache must be a list of names"),
    (dict(prompt="ok", cache=["nope"]), "cache: unknown cache 'nope'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[f"{i}-{m[:24]}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_a_clear_error(client, server, kwargs, message):
    before = server.pool.status()["submitted"]
    with pytest.raises(AppError) as err:
        _generate(client, **kwargs)
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith("Invalid input: ")
    assert server.pool.status()["submitted"] == before  # rejected before reaching a device


def test_nan_in_raw_json_gets_a_clear_error(server, client):
    """A JSON body with a NaN literal (what JavaScript's JSON.stringify never sends but other clients can)."""
    values = ["ok", "", 1, 2, "NaN_HERE", 8, 32, 32, "dense", []]
    body = json.dumps({"data": values}).replace('"NaN_HERE"', "NaN")
    r = httpx.post(f"{server.url}gradio_api/call/generate", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    if r.status_code == 200:  # accepted by the transport: the handler must name the value
        event_id = r.json()["event_id"]
        text = httpx.get(f"{server.url}gradio_api/call/generate/{event_id}", timeout=30).text
        assert "event: error" in text and "guidance_scale must be a finite number" in text, text
    else:  # rejected by the transport with a 4xx that says why
        assert 400 <= r.status_code < 500 and r.text
    _generate(client, prompt="still serving after NaN", seed=1)


def test_server_still_serves_after_bad_inputs(client, server):
    for kwargs, _ in BAD_INPUTS[:5]:
        with pytest.raises(AppError):
            _generate(client, **kwargs)
    video, _, _ = _generate(client, prompt="a red square moving left", seed=2)
    assert decode_video(_path(video)).shape == (8, 32, 32, 3)


def test_out_of_memory_is_reported_and_the_server_recovers(client, server):
    before = server.pool.status()
    with pytest.raises(AppError) as err:
        _generate(client, prompt=f"{OOM} a red circle", seed=1)
    msg = str(err.value)
    assert "out of memory on cpu generating 8x32x32, 2 steps" in msg and "keeps serving" in msg, msg
    after = server.pool.status()
    assert after["out_of_memory"] == before["out_of_memory"] + 1 and after["failed"] == before["failed"]
    video, _, _ = _generate(client, prompt="after the OOM", seed=3)
    assert decode_video(_path(video)).shape == (8, 32, 32, 3)


def test_full_queue_answers_busy_at_once(server, control):
    assert wait_until(lambda: _idle(server))
    jobs, base = [], server.pool.status()["submitted"]
    # One request runs (held at its first step), MAX_QUEUE wait: the queue is full.
    for i in range(1 + MAX_QUEUE):
        jobs.append(Client(server.url, verbose=False).submit(prompt=f"{HOLD} busy {i}", seed=i, **FAST,
                                                             api_name="/generate"))
        assert wait_until(lambda n=base + i + 1: server.pool.status()["submitted"] >= n, timeout=30)
    assert wait_until(lambda: server.pool.status()["running"] == 1 and server.pool.status()["waiting"] == MAX_QUEUE)
    busy_before = server.pool.status()["busy"]
    with pytest.raises(AppError) as err:
        _generate(Client(server.url, verbose=False), prompt="one too many", seed=9)
    assert str(err.value).startswith("Busy, retry: server busy"), str(err.value)
    # at once, not after the queue drains: the held request is still running and the queue still full
    status = server.pool.status()
    assert status["running"] == 1 and status["waiting"] == MAX_QUEUE, status
    assert server.pool.status()["busy"] == busy_before + 1
    control.release.set()
    for job in jobs:  # the queued ones still complete
        video, _, _ = job.result(timeout=120)
        assert decode_video(_path(video)).shape == (8, 32, 32, 3)


def test_client_disconnect_stops_generation(server, client, control):
    assert wait_until(lambda: _idle(server))
    before = server.pool.status()
    script = textwrap.dedent(f"""
        from gradio_client import Client
        c = Client({server.url!r}, verbose=False)
        c.predict(prompt="{HOLD} disconnecting client", seed=1, num_inference_steps=50, num_frames=8,
                  height=32, width=32, api_name="/generate")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        assert wait_until(control.held.is_set, timeout=60), "the request never started"
    finally:
        proc.kill()  # the client goes away mid-generation, without a word to the server
        proc.wait()
    # The server notices, stops the pipeline at its next step and frees the device (the hold is never released).
    assert wait_until(lambda: server.pool.status()["cancelled"] == before["cancelled"] + 1, timeout=20)
    assert wait_until(lambda: _idle(server))
    assert server.pool.status()["completed"] == before["completed"]
    video, _, _ = _generate(client, prompt="after a disconnect", seed=4)
    assert decode_video(_path(video)).shape == (8, 32, 32, 3)


def test_cancel_stops_generation(server, control):
    assert wait_until(lambda: _idle(server))
    before = server.pool.status()
    c = Client(server.url, verbose=False)
    job = c.submit(prompt=f"{HOLD} cancelled", seed=1, **FAST, api_name="/generate")
    assert wait_until(control.held.is_set, timeout=60)
    job.cancel()
    assert wait_until(lambda: server.pool.status()["cancelled"] == before["cancelled"] + 1, timeout=20)
    assert wait_until(lambda: _idle(server))
    video, _, _ = _generate(c, prompt="after a cancel", seed=5)
    assert decode_video(_path(video)).shape == (8, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def test_outputs_stay_in_a_bounded_area(server, client):
    root = server.pool.store.root
    for i in range(MAX_OUTPUTS + 2):
        _generate(client, prompt=f"file {i}", seed=i, num_inference_steps=1)
    files = server.pool.store.files()
    assert len(files) == MAX_OUTPUTS
    assert all(f.parent == root and f.suffix == ".mp4" and len(f.stem) == 32 for f in files)


def test_clients_cannot_read_server_paths(server, client, checkpoint):
    video, _, _ = _generate(client, prompt="served file", seed=6)
    served = server.pool.store.files()[-1]
    ok = httpx.get(f"{server.url}gradio_api/file={served}", timeout=30)
    assert ok.status_code == 200 and ok.content == served.read_bytes()
    for path in ("/etc/passwd", str(checkpoint / "vdiff.json"), str(served.parent / ".." / "etc" / "passwd"),
                 str(Path(__file__).resolve())):
        r = httpx.get(f"{server.url}gradio_api/file={path}", timeout=30)
        assert r.status_code in (403, 404), (path, r.status_code)


def test_pool_close_removes_the_output_area(checkpoint):
    from serve.validation import GenerationRequest
    from vdiff import VideoPipeline

    pool = WorkerPool([VideoPipeline.from_pretrained(checkpoint)], ["cpu"], max_queue=1,
                      store=OutputStore(max_files=2))
    req = GenerationRequest(prompt="x", negative_prompt=None, seed=0, num_inference_steps=1, guidance_scale=1.0,
                            num_frames=4, height=32, width=32, attention="dense", attention_is_default=True)
    result = pool.submit(req).wait(60)
    assert result.path.is_file() and result.path.parent == pool.store.root
    pool.close()
    assert not pool.store.root.exists()
    with pytest.raises(ServerBusy):
        pool.submit(req)


def test_requests_spread_across_devices(checkpoint):
    """Two pipelines (two "devices": on a GPU box these are cuda:0 and cuda:1; here both are labelled cpu): two held
    requests run at the same time, one per worker, a third waits; released, all three complete, and the same
    request gives the same video on either worker (each worker owns its pipeline, no shared sampler state)."""
    from serve.validation import GenerationRequest
    from vdiff import VideoPipeline

    control = StepControl()
    pool = WorkerPool([VideoPipeline.from_pretrained(checkpoint) for _ in range(2)], ["cpu", "cpu"], max_queue=2,
                      store=OutputStore(max_files=8), step_hooks=[control])
    try:
        def request(prompt: str) -> GenerationRequest:
            return GenerationRequest(prompt=prompt, negative_prompt=None, seed=3, num_inference_steps=2,
                                     guidance_scale=2.0, num_frames=4, height=32, width=32, attention="dense",
                                     attention_is_default=True)

        jobs = [pool.submit(request(f"{HOLD} a red circle moving left")) for _ in range(3)]
        assert wait_until(lambda: pool.status()["running"] == 2 and pool.status()["waiting"] == 1, timeout=60)
        assert sorted(j.worker for j in jobs if j.worker is not None) == [0, 1]  # one per worker, concurrently
        control.release.set()
        results = [j.wait(120) for j in jobs]
        assert pool.status()["completed"] == 3
        videos = [decode_video(r.path) for r in results]
        assert videos[0].shape == (4, 32, 32, 3) and videos[0].std() > 0
        by_worker = {j.worker: v for j, v in zip(jobs, videos)}
        assert set(by_worker) == {0, 1}
        np.testing.assert_array_equal(by_worker[0], by_worker[1])
    finally:
        control.release.set()
        pool.close()


# ---------------------------------------------------------------------------------------------------------------------
# Login, validation and stats formatting (no generation)
# ---------------------------------------------------------------------------------------------------------------------


def test_login_from_env_blocks_anonymous_clients(server):
    auth = parse_auth("alice:s3cret")
    assert auth == ("alice", "s3cret")
    for bad in ("alice", ":x", "alice:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)
    assert parse_auth("") is None
    limits = limits_for(server.pool.pipelines[0])
    app = build_app(server.pool, limits)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, auth=auth, prevent_thread_lock=True, quiet=True,
                       **launch_kwargs(server.pool))
    try:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a plain ValueError/HTTP error
            Client(f"http://127.0.0.1:{port}/", verbose=False).view_api(print_info=False)
        c = Client(f"http://127.0.0.1:{port}/", auth=auth, verbose=False)
        assert "/generate" in c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    finally:
        app.close()


def test_limits_follow_the_pipeline(server):
    limits = limits_for(server.pool.pipelines[0], max_tokens=1024)
    assert limits.generation is server.pool.pipelines[0].limits  # the pipeline's own rules, not a copy of them
    assert limits.sides.multiple == 8 and limits.sides.min == 8
    assert 16 in limits.frame_choices and 32 in limits.size_choices
    assert all(limits.generation.token_count(f, s, s) <= 1024
               for f in limits.frame_choices for s in (min(limits.size_choices),))
    assert limits.attention_choices[0] == "dense" and "vmoba" in limits.attention_choices
    assert "sdpa" not in limits.attention_choices and "flash" not in limits.attention_choices  # not runnable here
    assert limits.default_cache == ("text_kv", "mask", "prompt")


def _generation_limits(frames: Span | None = None) -> GenerationLimits:
    """Pipeline rules written out by hand: 1 to 16 frames, sides 8 to 32 in steps of 8, the tiny preset's defaults."""
    return GenerationLimits(frames=frames or Span(1, 16), frame_rule="-", height=Span(8, 32, 8), width=Span(8, 32, 8),
                            default_frames=16, default_height=32, default_width=32, default_steps=30,
                            default_guidance=5.0)


def test_validate_request_defaults_and_types():
    limits = Limits(_generation_limits(), attention_choices=("dense", "radial"), default_cache=("text_kv",))
    req = validate_request(limits, prompt="  a red circle  ", seed="7", num_inference_steps=4.0, guidance_scale="2.5",
                           num_frames="8", height=32, width=32.0, attention=None, cache=None)
    assert (req.prompt, req.seed, req.num_inference_steps, req.guidance_scale) == ("a red circle", 7, 4, 2.5)
    assert (req.num_frames, req.height, req.width, req.attention, req.cache) == (8, 32, 32, "dense", ("text_kv",))
    assert req.attention_is_default and req.pipeline_kwargs()["attention"] is None
    assert validate_request(limits, prompt="x", cache=[], num_frames=8).pipeline_kwargs()["cache"] == []
    seeds = {validate_request(limits, prompt="x", seed=s, num_frames=8).seed for s in ("random", -1, None, "") * 3}
    assert len(seeds) > 1
    with pytest.raises(RequestError, match=r"^guidance_scale must be a finite number"):
        validate_request(limits, prompt="x", guidance_scale=math.nan)
    with pytest.raises(RequestError, match=r"^prompt must not contain NUL"):
        validate_request(limits, prompt="a\x00b")


def test_values_left_out_take_the_pipelines_defaults():
    req = validate_request(Limits(_generation_limits()), prompt="x", seed=0)
    assert (req.num_frames, req.height, req.width, req.num_inference_steps, req.guidance_scale) == (16, 32, 32, 30, 5.0)
    with pytest.raises(RequestError, match=r"^num_frames must be an integer in \[1, 16\], got None$"):
        validate_request(Limits(_generation_limits()), prompt="x", num_frames=None)  # None is a value, and a bad one


def test_validate_request_follows_the_pipelines_frame_rule():
    """Wan's VAE takes 4k+1 frames: the server checks the numbers of the pipeline's rule (no wording to parse)."""
    limits = Limits(_generation_limits(frames=Span(1, 125, 4)))
    assert validate_request(limits, prompt="x", num_frames=9, height=8, width=8).num_frames == 9
    with pytest.raises(RequestError, match=r"^num_frames must be 4k \+ 1 in \[1, 125\], got 8$"):
        validate_request(limits, prompt="x", num_frames=8)
    with pytest.raises(RequestError, match=r"^num_frames must be an integer in \[1, 125\], got 129$"):
        validate_request(limits, prompt="x", num_frames=129)


def test_format_stats_line():
    line = format_stats({"run_s": 1.5, "step_mean_s": 0.25, "steps": 4, "queue_s": 0.5, "attention": "radial",
                         "attention_density": 0.31, "cache": {"text_kv": {"hits": 6, "misses": 2}, "mask": {}},
                         "seed": 11, "device": "cpu"})
    assert line == ("1.50 s (0.250 s/step) · queued 0.50 s · attention radial density 0.31 · "
                    "cache hits text_kv 6/8, mask - · 4 steps · seed 11 · cpu")

"""One video on several processes (vdiff.parallel.inference): CFG parallel and Ulysses under real gloo processes equal
one process; a causal model streams under cfg=2, ulysses=2 and both as in one process; the text encoder runs once;
a request that differs between ranks raises on every rank; bad degrees fail before any weight loads; mesh layouts of
8, 16 and 72 ranks under torch's fake process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5
SMALL = dict(num_frames=4, height=16, width=16, num_inference_steps=3)  # grid (4, 2, 2) = 16 tokens
ODD = dict(num_frames=3, height=24, width=24, num_inference_steps=3)  # grid (3, 3, 3) = 27 tokens: not divisible by 2
SPARSE = dict(num_frames=4, height=32, width=32, num_inference_steps=2)  # grid (4, 4, 4) = 64 tokens


def _save_tiny(folder: Path) -> Path:
    from vdiff.config import model_preset
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    cfg = PipelineConfig(num_frames=4, height=16, width=16, num_inference_steps=3, text_max_length=16)
    model = model_preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
    return VideoPipeline.from_model_config(model, config=cfg, seed=0).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------------
# In one process: configuration errors and mesh layouts
# --------------------------------------------------------------------------------------------------------------------


def test_bad_degrees_name_the_valid_values():
    from vdiff import ParallelConfig

    with pytest.raises(ValueError, match=r"ulysses=8 does not divide the model's 12 attention heads; valid ulysses "
                                         r"degrees: 1, 2, 3, 4, 6, 12; for 8 ranks use cfg=2 ulysses=4"):
        ParallelConfig(ulysses=8).check(12, world_size=8)
    with pytest.raises(ValueError, match=r"cfg=2 x ulysses=2 = 4 ranks, but 2 processes are running"):
        ParallelConfig(cfg=2, ulysses=2).check(12, world_size=2)
    with pytest.raises(ValueError, match=r"parallel.cfg must be 1 or 2"):
        ParallelConfig(cfg=3)
    with pytest.raises(ValueError, match=r"parallel.vae=2 must divide the ranks of one video \(cfg=1 x ulysses=1 = "
                                         r"1\); valid values: 1"):
        ParallelConfig(vae=2)
    with pytest.raises(ValueError, match=r"parallel.vae=4 must divide .* = 6\); valid values: 1, 2, 3, 6"):
        ParallelConfig(cfg=2, ulysses=3, vae=4)
    with pytest.raises(ValueError, match=r"text_encoder must be one of \['rank0', 'replicate'\]"):
        ParallelConfig(text_encoder="rank1")
    with pytest.raises(ValueError, match=r"parallel.ulysses must be an int >= 1"):
        ParallelConfig(ulysses=0)
    with pytest.raises(ValueError, match=r"parallel.devices must be devices joined by '\+'"):
        ParallelConfig(launch="spawn", devices=1)

    from vdiff.config import ConfigError
    from vdiff.sample import parallel_settings

    with pytest.raises(ConfigError, match=r"parallel: unknown setting\(s\) \['degree'\]; known: \['cfg', "):
        parallel_settings(["parallel.degree=2", "parallel.cfg=2"])
    with pytest.raises(ConfigError, match=r"parallel.cfg must be 1 or 2"):  # a known field: its own message
        parallel_settings(["parallel.cfg=3"])
    assert parallel_settings(["seed=1", "parallel.cfg=2"]) == (["seed=1"], ParallelConfig(cfg=2))


def test_bad_degrees_fail_before_the_weights_load(tmp_path, monkeypatch):
    from vdiff import ParallelConfig
    from vdiff.pipeline import VideoPipeline

    folder = _save_tiny(tmp_path / "p")
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()  # loading the weights would fail: the errors below must come first
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"ulysses=3 does not divide the model's 2 attention heads; valid ulysses "
                                         r"degrees: 1, 2"):
        VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(ulysses=3))
    with pytest.raises(ValueError, match=r"cfg=2 x ulysses=1 = 2 ranks, but 1 processes are running"):
        VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2))
    # a Wan VAE folder (its config alone: no weights) cannot be split over the height: refused with the reason
    wan = tmp_path / "wan"
    shutil.copytree(folder, wan)
    (wan / "vae" / "vae_config.json").unlink()
    (wan / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # the degrees fit: the VAE is what is refused
    with pytest.raises(ValueError, match=r"parallel.vae=2: this VAE cannot be split over the latent height "
                                         r"\(AutoencoderKLWan's decoder runs a self-attention over every position"):
        VideoPipeline.from_pretrained(wan, parallel=ParallelConfig(cfg=2, vae=2))


def test_height_bands_cover_the_rows_once():
    from vdiff.parallel.vae import bands

    assert bands(5, 2) == [(0, 3), (3, 5)]
    assert bands(12, 4) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert bands(7, 7) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ValueError, match=r"parallel.vae=4: the latents have 3 rows"):
        bands(3, 4)


@pytest.mark.parametrize("world, cfg, ulysses", [(8, 2, 4), (8, 1, 2), (16, 2, 8), (16, 2, 2), (72, 2, 4),
                                                 (72, 1, 8)])
def test_mesh_layout_axis_order_and_membership(world, cfg, ulysses):
    from vdiff.parallel.config import ParallelConfig
    from vdiff.parallel.mesh import MeshLayout

    lay = MeshLayout.of(ParallelConfig(cfg=cfg, ulysses=ulysses), world)
    assert lay.shape == (world // (cfg * ulysses), cfg, ulysses)
    for axis, size in zip(("replica", "cfg", "ulysses"), lay.shape):
        groups = lay.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(world))  # a partition of the ranks
        assert all(len(g) == size for g in groups)
    assert all(g == list(range(g[0], g[0] + ulysses)) for g in lay.groups("ulysses"))  # Ulysses ranks consecutive
    assert all(b - a == ulysses for g in lay.groups("cfg") for a, b in zip(g, g[1:]))  # CFG pair outside them
    for rank in range(world):
        c = lay.coords(rank)
        assert lay.rank(**c) == rank
        assert rank in lay.group_of("cfg", rank) and rank in lay.group_of("ulysses", rank)


def test_mesh_groups_under_the_fake_process_group_match_device_mesh():
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vdiff.parallel.config import ParallelConfig
    from vdiff.parallel.mesh import AXES, MeshLayout, ParallelMesh

    for world, cfg, ulysses in ((8, 2, 4), (16, 2, 2), (72, 2, 4)):
        config = ParallelConfig(cfg=cfg, ulysses=ulysses)
        lay = MeshLayout.of(config, world)
        for rank in sorted({0, 1, ulysses, world // 2 + 1, world - 1}):
            dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
            try:
                mesh = ParallelMesh(config, replicas=lay.replica)
                reference = init_device_mesh("cpu", lay.shape, mesh_dim_names=AXES)  # torch's own layout
                for axis in AXES:
                    ranks = dist.get_process_group_ranks(mesh.groups[axis])
                    assert ranks == mesh.ranks[axis] == lay.group_of(axis, rank), (world, rank, axis)
                    assert sorted(dist.get_process_group_ranks(reference.get_group(axis))) == ranks, (world, axis)
                start = rank // config.size * config.size  # one video: the cfg x ulysses block of this replica
                assert mesh.video_ranks == list(range(start, start + config.size))
                with pytest.raises(ValueError, match=rf"but {world} processes are running"):
                    ParallelMesh(ParallelConfig(cfg=cfg, ulysses=ulysses), replicas=lay.replica + 1)
            finally:
                dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# Real processes (gloo): equal to one process
# --------------------------------------------------------------------------------------------------------------------


def _run(folder: Path, out: Path, nproc: int, mode: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
         str(folder), str(out), mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    ranks = _run(_save_tiny(tmp_path / "p"), tmp_path, 2, "two")
    for r, res in enumerate(ranks):
        assert res["vae2/decode_err"] == 0.0  # the pixel VAE: the bands are the same numbers
        for key in ("cfg2", "cfg2/g1", "vae2", "vae2/odd", "ulysses2/dense", "ulysses2/odd", "ulysses2/radial",
                    "ulysses2/sliding_tile",
                    "ulysses2/vmoba", "text/replicate"):
            d = res[key]
            assert d["latent_scale"] > 0.1, (r, key, d)
            assert d["latent_err"] <= TOL and d["frame_err"] <= 1, (r, key, d)  # uint8 frames: rounding of equal floats
        assert res["cfg2/g1"]["notes"] and "cfg parallel had no effect" in res["cfg2/g1"]["notes"][0]
        for key in ("cfg2/step", "ulysses2/step"):  # the step cache skips the steps one process skips
            one, here = res[key]["pattern"]
            assert one == here == ranks[0][key]["pattern"][1] and "S" in one and "F" in one, (r, key, res[key])
            assert res[key]["latent_err"] <= 1e-4, (r, key, res[key])
        assert res["cfg2"]["notes"] == []
        assert res["text/embeds_err"] == 0.0
        for key in ("causal/cached", "causal/reference", "causal/live_switch",  # each rank one branch's K/V
                    "causal/switch_guidance"):
            assert res[key]["latent_scale"] > 0.1 and res[key]["latent_err"] <= TOL, (r, key, res[key])
        assert res["causal/call_frame_err"] <= 1 and res["causal/call_notes"] == []
        # rank 1 alone cancels at its 4th step (chunk 1, step 0): both ranks stop after the same step
        assert "at chunk 1, after step 1/3" in res["causal/cancel"], res["causal/cancel"]
        assert res["causal/cancel"].endswith("| 4 steps seen"), res["causal/cancel"]
        for key in ("causal/ulysses/cached", "causal/ulysses/reference", "causal/ulysses/live_switch",
                    "causal/ulysses/split", "causal/ulysses/switch_guidance"):
            assert res[key]["latent_scale"] > 0.1 and res[key]["latent_err"] <= TOL, (r, key, res[key])
        one_bytes, rank_bytes = res["causal/ulysses/kv_bytes"]
        assert rank_bytes * 2 == one_bytes > 0, res["causal/ulysses/kv_bytes"]  # half the heads on each rank
        assert res["ulysses2/odd_split"] == [27, 28]
        assert "seed: rank 0 = 0, rank 1 = 1" in res["mismatch/seed"]
        assert "prompt: rank 0" in res["mismatch/prompt"]
        assert "height" in res["mismatch/rejected"]
        assert res["random_seed"] == ranks[0]["random_seed"]
        # a cancel on one rank stops every rank after the same step (no rank left waiting in an exchange)
        assert "after step 2/" in res["cancel"] and res["cancel"].endswith("steps seen [0, 1]"), res["cancel"]
    assert ranks[0]["frames_digest"] == ranks[1]["frames_digest"]  # every rank returns the same frames


@pytest.mark.distributed
@pytest.mark.slow
def test_cfg2_x_ulysses2_on_four_ranks_equals_one_process(tmp_path):
    ranks = _run(_save_tiny(tmp_path / "p"), tmp_path, 4, "four")
    for r, res in enumerate(ranks):
        for key in ("cfg2xulysses2", "cfg2xulysses2/odd", "cfg2xulysses2/vae4", "causal/cfg2xulysses2"):
            assert res[key]["latent_err"] <= TOL and res[key]["frame_err"] <= 1, (r, key, res[key])
        assert res["causal/cfg2xulysses2"]["latent_scale"] > 0.1
    assert len({res["frames_digest"] for res in ranks}) == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_launch_sample_nproc_writes_the_one_process_video(tmp_path):
    """`./launch.sh sample --nproc 2 parallel.cfg=2`: torchrun underneath, rank 0 writes the file, which holds the
    frames one process makes; so does `--nodes 2` on loopback; a bad split is refused by --check before torchrun."""
    import numpy as np
    from _serve_helpers import decode_video

    folder = _save_tiny(tmp_path / "p")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    common = ["--checkpoint", str(folder), "--prompt", "a red circle moving right", "seed=2", "guidance_scale=4"]
    one = subprocess.run(["./launch.sh", "sample", *common, "--out", str(tmp_path / "one.mp4")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(["./launch.sh", "sample", "--nproc", "2", *common, "--out", str(tmp_path / "two.mp4"),
                          "parallel.cfg=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 only
    a, b = decode_video(tmp_path / "one.mp4"), decode_video(tmp_path / "two.mp4")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # two "nodes" of one process each on loopback (--nodes 2 --node-rank R): the same video, written once by rank 0
    nodes = ["--nodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    procs = [subprocess.Popen(["./launch.sh", "sample", *nodes, "--node-rank", str(r), *common, "--out",
                               str(tmp_path / f"node{r}.mp4"), "parallel.cfg=2"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert not (tmp_path / "node1.mp4").exists()
    c = decode_video(tmp_path / "node0.mp4")
    assert c.shape == a.shape and np.abs(a.astype(int) - c.astype(int)).max() <= 1
    bad = subprocess.run(["./launch.sh", "sample", "--nproc", "2", *common, "--out", str(tmp_path / "x.mp4"),
                          "parallel.ring=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "parallel.ring=2: ring attention is not implemented" in bad.stderr
    assert "torch.distributed" not in bad.stderr  # refused before torchrun


def _free_port() -> int:
    from vdiff.runtime import free_port

    return free_port()


# --------------------------------------------------------------------------------------------------------------------
# The worker (run by torchrun)
# --------------------------------------------------------------------------------------------------------------------


def _worker(folder: str, out: str, mode: str) -> None:
    import hashlib

    import numpy as np
    import torch
    import torch.distributed as dist

    from vdiff import ParallelConfig
    from vdiff.config import AttentionConfig, SlidingTileConfig
    from vdiff.pipeline import VideoPipeline

    dist.init_process_group("gloo")  # also tests reuse of an existing group; from_pretrained inits one when absent
    rank = dist.get_rank()
    plain = VideoPipeline.from_pretrained(folder)

    def generate(pipe, **kw):
        seen = {}
        out = pipe("a red circle moving right", seed=kw.pop("seed", 0), guidance_scale=kw.pop("guidance_scale", 4.0),
                   callback=lambda i, n, lat: seen.__setitem__("latents", lat.clone()), **kw)
        return out, seen["latents"]

    def compare(pipe, **kw):
        ref, ref_lat = generate(plain, **kw)
        got, lat = generate(pipe, **kw)
        return {"latent_err": (lat - ref_lat).abs().max().item(), "latent_scale": ref_lat.abs().max().item(),
                "frame_err": int(np.abs(got.videos.astype(int) - ref.videos.astype(int)).max()),
                "notes": got.stats.parallel["notes"],
                "pattern": [s.cache.get("step", {}).get("pattern") for s in (ref.stats, got.stats)]}

    res: dict = {}
    if mode == "two":
        cfg2 = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2))
        res["cfg2"] = compare(cfg2, **SMALL)
        res["cfg2/g1"] = compare(cfg2, guidance_scale=1.0, **SMALL)
        video, _ = generate(cfg2, **SMALL)
        res["frames_digest"] = hashlib.sha256(video.videos.tobytes()).hexdigest()
        res["random_seed"] = cfg2("a red circle", **SMALL).seed  # seed=None: rank 0's draw on every rank

        sp = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(ulysses=2))
        res["ulysses2/dense"] = compare(sp, **SMALL)
        res["ulysses2/odd"] = compare(sp, **ODD)
        res["ulysses2/odd_split"] = [sp.parallel.sequence.length, sp.parallel.sequence.padded]  # hooks ran, padded
        sparse = {"radial": AttentionConfig(backend="radial", impl="reference"),
                  "sliding_tile": AttentionConfig(backend="sliding_tile", impl="reference",
                                                  sliding_tile=SlidingTileConfig(tile=(2, 2, 2), window=(1, 1, 1))),
                  "vmoba": AttentionConfig(backend="vmoba", impl="reference")}
        for name, attn in sparse.items():
            res[f"ulysses2/{name}"] = compare(sp, attention=attn, **SPARSE)

        from vdiff.cache import StepCacheConfig

        step = dict(num_frames=4, height=16, width=16, num_inference_steps=8,
                    cache=[StepCacheConfig(threshold=0.6, warmup_steps=1)])
        res["cfg2/step"] = compare(cfg2, **step)  # skip decisions from the whole video's change: same on all ranks
        res["ulysses2/step"] = compare(sp, **{**step, "num_frames": 3, "height": 24, "width": 24})  # padded shards

        vae2 = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2, vae=2))
        res["vae2"] = compare(vae2, **SMALL)
        res["vae2/odd"] = compare(vae2, **ODD)
        g = torch.Generator().manual_seed(3)
        lat = torch.randn(2, plain.vae.latent_channels, 3, 5, 4, generator=g)
        # 5 latent rows: bands of 3 and 2
        res["vae2/decode_err"] = (vae2.parallel.decode(vae2.vae, lat) - plain.vae.decode(lat)).abs().max().item()

        rep = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2, text_encoder="replicate"))
        res["text/replicate"] = compare(rep, **SMALL)
        batch = ["a red circle", "a blue square", ""]
        res["text/embeds_err"] = (cfg2.parallel.encode_text(cfg2.text_encoder, batch).embeds
                                  - rep.parallel.encode_text(rep.text_encoder, batch).embeds).abs().max().item()

        from vdiff.diffusion.sampling import Cancelled

        seen: list[int] = []  # rank 1 alone cancels after step 1 (a server's cancel reaching one rank)
        try:
            cfg2("a red circle", seed=0, **SMALL,
                 callback=lambda i, n, lat: seen.append(i) or (False if rank == 1 and i == 1 else None))
            res["cancel"] = "no error"
        except Cancelled as err:
            res["cancel"] = f"{err} | steps seen {seen}"
        res.update(_causal_under_cfg2(Path(out), rank))
        for key, kw in (("seed", dict(seed=rank)), ("prompt", dict(prompt=f"prompt {rank}")),
                        ("rejected", dict(height=16 if rank == 0 else 17))):
            try:
                cfg2(**{"prompt": "same", "seed": 0, **SMALL, **kw})
                res[f"mismatch/{key}"] = "no error"
            except (ValueError, RuntimeError) as err:
                res[f"mismatch/{key}"] = str(err)
    else:
        both = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2, ulysses=2))
        res["cfg2xulysses2"] = compare(both, **SMALL)
        res["cfg2xulysses2/odd"] = compare(both, **ODD)
        res["cfg2xulysses2/vae4"] = compare(VideoPipeline.from_pretrained(
            folder, parallel=ParallelConfig(cfg=2, ulysses=2, vae=4)), **ODD)  # 6 latent rows: bands 2, 2, 1, 1
        video, _ = generate(both, **SMALL)
        res["frames_digest"] = hashlib.sha256(video.videos.tobytes()).hexdigest()
        causal = _causal_folder(Path(out), rank)  # each cfg rank one branch, each ulysses rank one head
        prompt, switch = "a red circle moving right", {2: "a blue square moving up"}
        ref = [c.latents for c in VideoPipeline.from_pretrained(causal).stream(prompt, seed=3, num_chunks=4,
                                                                               prompts=switch)]
        got = [c.latents for c in VideoPipeline.from_pretrained(causal, parallel=ParallelConfig(cfg=2, ulysses=2))
               .stream(prompt, seed=3, num_chunks=4, prompts=switch)]
        res["causal/cfg2xulysses2"] = {"latent_err": max((x - y).abs().max().item() for x, y in zip(got, ref)),
                                       "latent_scale": min(x.abs().max().item() for x in ref), "frame_err": 0}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res, default=float))
    dist.destroy_process_group()


def _causal_folder(out: Path, rank: int) -> Path:
    """A tiny causal pipeline (2 heads, chunks of 2 frames, sink 1, window 1), saved by rank 0."""
    import torch

    from vdiff.config import CausalConfig, model_preset
    from vdiff.pipeline import PipelineConfig, VideoPipeline

    folder = out / "causal"
    if rank == 0:
        model = model_preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                             causal=CausalConfig(chunk_frames=2, sink_chunks=1, window_chunks=1))
        config = PipelineConfig(num_frames=8, height=16, width=16, num_inference_steps=3, guidance_scale=3.0,
                                text_max_length=16, cache=["text_kv", "causal_kv"], context_noise=0.1)
        VideoPipeline.from_model_config(model, config=config, seed=0).save_pretrained(folder)
    torch.distributed.barrier()
    return folder


def _causal_under_cfg2(out: Path, rank: int) -> dict:
    """A causal model under cfg=2 vs one process: the cached stream (each rank its branch's K/V), the reference (the
    whole history recomputed), a prompt switch given by the call and one added on rank 0 alone while the stream runs,
    pipe(...) collecting the stream, a cancel on rank 1 alone; the same streams under ulysses=2."""
    import numpy as np

    from vdiff import ParallelConfig
    from vdiff.cache.causal_kv import CausalKVCacheConfig
    from vdiff.diffusion.sampling import Cancelled
    from vdiff.pipeline import VideoPipeline

    folder = _causal_folder(out, rank)
    one = VideoPipeline.from_pretrained(folder)
    two = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(cfg=2))
    uly = VideoPipeline.from_pretrained(folder, parallel=ParallelConfig(ulysses=2))
    prompt, switch = "a red circle moving right", {2: "a blue square moving up"}

    def err(kw: dict, live: bool = False, pipe=two) -> dict:
        ref = [c.latents for c in one.stream(prompt, seed=3, num_chunks=4, prompts=dict(switch), **kw)]
        asked: dict = {} if live else dict(switch)
        got = []
        for c in pipe.stream(prompt, seed=3, num_chunks=4, prompts=asked, **kw):
            got.append(c.latents)
            if live and rank == 0 and c.index == 0:
                asked[2] = switch[2]  # steering on rank 0 (the caller / server) reaches rank 1
        return {"latent_err": max((x - y).abs().max().item() for x, y in zip(got, ref)),
                "latent_scale": min(x.abs().max().item() for x in ref)}

    res = {"causal/cached": err({}), "causal/reference": err({"cache": ["text_kv"]}),
           "causal/live_switch": err({}, live=True),
           "causal/switch_guidance": err({"switch_guidance": 2.0, "switch_guidance_chunks": 1}),  # old branch too
           # Ulysses: each rank's KV buffers hold its head group (window 1: chunk 3 evicts chunk 1)
           "causal/ulysses/cached": err({}, pipe=uly),
           "causal/ulysses/reference": err({"cache": ["text_kv"]}, pipe=uly),
           "causal/ulysses/live_switch": err({}, live=True, pipe=uly),
           "causal/ulysses/switch_guidance": err({"switch_guidance": 2.0}, pipe=uly),
           "causal/ulysses/split": err({"cache": ["text_kv", CausalKVCacheConfig(external="split")]}, pipe=uly)}
    res["causal/ulysses/kv_bytes"] = [list(p.stream(prompt, seed=3, num_chunks=1))[0].stats["kv_bytes"]
                                      for p in (one, uly)]
    a = one(prompt, seed=4, num_frames=6)
    b = two(prompt, seed=4, num_frames=6)
    res["causal/call_frame_err"] = int(np.abs(a.videos.astype(int) - b.videos.astype(int)).max())
    res["causal/call_notes"] = b.stats.parallel.get("notes")
    seen: list[int] = []
    try:
        two(prompt, seed=0, num_frames=6,
            callback=lambda i, n, lat: seen.append(i) or (False if rank == 1 and len(seen) == 4 else None))
        res["causal/cancel"] = "no error"
    except Cancelled as exc:
        res["causal/cancel"] = f"{exc} | {len(seen)} steps seen"
    return res


if __name__ == "__main__":
    _worker(*sys.argv[1:4])

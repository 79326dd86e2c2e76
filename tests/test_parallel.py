"""Ulysses sequence parallel: a 2-rank forward + backward (real gloo processes) equals the 1-rank model, for the
dense backend and every sparse one that can train here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["dense", "radial", "sliding_tile", "vmoba"]


def _worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from vdiff.config import AttentionConfig, SlidingTileConfig, model_preset
    from vdiff.models.dit import VideoDiT
    from vdiff.parallel import SequenceParallel, apply_sequence_parallel, remove_sequence_parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = SequenceParallel()
    torch.manual_seed(0)
    cfg = model_preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
    model = VideoDiT.from_model_config(cfg)
    x = torch.randn(2, 48, 4, 8, 8)  # grid (4, 4, 4) = 64 tokens
    t = torch.tensor([300.0, 800.0])
    text = torch.randn(2, 5, 384)
    per_token_t = torch.rand(2, 64) * 1000  # per-token timesteps exercise the split of the modulation too
    results = {}
    attentions = {
        "dense": AttentionConfig(),
        "radial": AttentionConfig(backend="radial", impl="reference"),
        "sliding_tile": AttentionConfig(backend="sliding_tile", impl="reference",
                                        sliding_tile=SlidingTileConfig(tile=(2, 2, 2), window=(1, 1, 1))),
        "vmoba": AttentionConfig(backend="vmoba", impl="reference"),
    }
    for name, attn in attentions.items():
        for timestep in (t, per_token_t):
            outs, grads = [], []
            for use_sp in (False, True):
                model.zero_grad()
                if use_sp:
                    apply_sequence_parallel(model, sp)  # from outside: the model's forward knows nothing of it
                out = model(x, timestep, text, return_dict=False, attention_kwargs={"attention": attn})[0]
                if use_sp:
                    assert remove_sequence_parallel(model)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                g = torch.cat([p.grad.flatten() for p in model.parameters()])
                if use_sp:
                    dist.all_reduce(g)
                    g /= world  # each rank holds world x its share (see vdiff.parallel.sequence)
                outs.append(out.detach())
                grads.append(g)
            key = f"{name}/{'per_token' if timestep.ndim == 2 else 'per_sample'}"
            results[key] = {
                "out_err": (outs[0] - outs[1]).abs().max().item(),
                "out_scale": outs[0].abs().max().item(),
                "grad_err": (grads[0] - grads[1]).abs().max().item(),
                "grad_scale": grads[0].abs().max().item(),
            }
    # a causal model (long video): block-causal chunks, per-token timesteps, teacher-forcing layout
    from vdiff.config import CausalConfig

    causal = VideoDiT.from_model_config(model_preset("tiny", num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                                     ffn_dim=64, causal=CausalConfig(chunk_frames=1, sink_chunks=1,
                                                                                     window_chunks=1)))
    chunks = [(j, True) for j in range(2)] + [(j, False) for j in range(2)]  # [context 0, 1 | noisy 0, 1]
    outs, grads = [], []
    for use_sp in (False, True):
        causal.zero_grad()
        if use_sp:
            apply_sequence_parallel(causal, sp)
        out = causal(x, per_token_t, text, return_dict=False, attention_kwargs={"chunks": chunks})[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        g = torch.cat([p.grad.flatten() for p in causal.parameters()])
        if use_sp:
            assert remove_sequence_parallel(causal)
            dist.all_reduce(g)
            g /= world
        outs.append(out.detach())
        grads.append(g)
    results["causal/per_token"] = {
        "out_err": (outs[0] - outs[1]).abs().max().item(), "out_scale": outs[0].abs().max().item(),
        "grad_err": (grads[0] - grads[1]).abs().max().item(), "grad_scale": grads[0].abs().max().item(),
    }
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_sequence_parallel_2_ranks_equals_1_rank(tmp_path):
    out = tmp_path / "sp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert set(results) == {f"{b}/{k}" for b in BACKENDS for k in ("per_sample", "per_token")} | {"causal/per_token"}
    for key, r in results.items():
        assert r["out_scale"] > 0.1 and r["grad_scale"] > 1e-3, key
        assert r["out_err"] <= 1e-5 * max(1.0, r["out_scale"]), (key, r)
        assert r["grad_err"] <= 1e-4 * max(1.0, r["grad_scale"]), (key, r)


if __name__ == "__main__":
    _worker(sys.argv[1])

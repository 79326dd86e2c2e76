"""The attention seam itself: one implementation policy, stateless backends, cached capability answers, options
checked when a config is built, and a registry that can take back what a test registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdiff.attention import (
    AttentionBackend,
    AttentionContext,
    AttentionStats,
    BackendUnavailable,
    available,
    backend_names,
    dispatch,
    get_backend,
    policy,
    register_backend,
    sparse_pattern,
    unregister_backend,
)
from vdiff.attention.dense import sdpa_attention
from vdiff.config import AttentionConfig, ConfigError, RadialConfig, VMoBAConfig, from_dict, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
SPARSE = ("radial", "sliding_tile", "vmoba")


@pytest.fixture
def cuda_without_flex(monkeypatch):
    """A CUDA device on which FlexAttention cannot run (e.g. triton missing), simulated through the policy's check."""
    def reason(device):
        return "FlexAttention on CUDA needs triton, which is not installed" if torch.device(device).type == "cuda" \
            else None

    monkeypatch.setattr(policy, "flex_unavailable_reason", reason)


@pytest.mark.parametrize("method", SPARSE)
def test_auto_on_cuda_without_flex_runs_gather_never_reference(cuda_without_flex, method):
    backend = get_backend(method, "cpu")
    for grad in (False, True):
        assert backend.implementation("auto", "cuda", needs_grad=grad) == "gather"
    with pytest.raises(BackendUnavailable, match="needs triton"):
        backend.implementation("fast", "cuda", needs_grad=False)
    status = available("cuda")[method]
    assert status.available and "impl=auto runs gather" in status.implementation
    assert "needs triton" in status.implementation  # and says why


@pytest.mark.parametrize("method", SPARSE)
def test_available_names_the_implementation_per_device(method, monkeypatch):
    assert "impl=auto runs gather" in available("cpu")[method].implementation
    monkeypatch.setattr(policy, "flex_unavailable_reason", lambda device: None)
    monkeypatch.setattr(policy, "flex_backward_reason", lambda device: None)
    assert get_backend(method, "cpu").implementation("auto", "cuda", needs_grad=True) == "fast"
    assert "impl=auto runs fast" in available("cuda")[method].implementation
    assert available("cpu")["sdpa"].implementation is None  # dense kernels have one implementation


def test_vmoba_backend_keeps_no_per_call_state():
    """Two calls with different selections on the one shared backend object: each call's stats hold its own density
    and path, and the backend object is unchanged (server workers share it)."""
    backend = get_backend("vmoba", "cpu")
    before = dict(vars(backend))
    grid = (4, 4, 4)
    cfg = AttentionConfig(backend="vmoba", vmoba=VMoBAConfig(chunk_t=1, chunk_hw=(2, 2), chunk_thw=(1, 2, 2)))
    results = []
    for seed, topk in ((1, 1), (2, 3)):
        cfg.vmoba.topk = topk
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 64, 2, 8, generator=g) for _ in range(3))
        stats = AttentionStats()
        dispatch(q, k, v, AttentionContext(grid=grid, config=cfg, stats=stats))
        want = sparse_pattern("vmoba", grid, q=q, k=k, chunk_t=1, chunk_hw=(2, 2), chunk_thw=(1, 2, 2), topk=topk)
        assert stats.density == pytest.approx(want.density, abs=1e-6)
        assert stats.by_impl == {"vmoba:gather": 1}
        results.append(stats.density)
    assert results[0] < results[1]
    assert vars(backend) == before


class _Counting(AttentionBackend):
    name = "test_counting"

    def __init__(self):
        self.asked = 0

    def unavailable_reason(self, device=None):
        self.asked += 1
        return None

    def forward(self, q, k, v, ctx):
        return sdpa_attention(q, k, v)


def test_capability_is_cached_per_device_type_and_unregister_cleans_up():
    backend = register_backend(_Counting())
    try:
        assert "test_counting" in backend_names()
        q = torch.randn(1, 8, 1, 4)
        ctx = AttentionContext(grid=(1, 2, 4), config=AttentionConfig(backend="test_counting"))
        for _ in range(5):
            dispatch(q, q, q, ctx)
        assert backend.asked == 1  # asked once for cpu, not per call
    finally:
        unregister_backend("test_counting")
    assert "test_counting" not in backend_names()
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'test_counting'"):
        get_backend("test_counting")
    with pytest.raises(ConfigError, match="attention.backend must be one of"):
        AttentionConfig(backend="test_counting")


@pytest.mark.parametrize("overrides, message", [
    (["radial.block_size=100"], r"attention\.radial\.block_size must be one of \[16, 32, 64, 128, 256\], got 100"),
    (["radial.decay_factor=0"], r"attention\.radial\.decay_factor must be a number > 0"),
    (["sliding_tile.window=[0, 1, 1]"], r"attention\.sliding_tile\.window must be 3 integers"),
    (["vmoba.threshold=1.5"], r"attention\.vmoba\.threshold must be in \(0, 1\]"),
    (["vmoba.chunk_hw=[0, 2]"], r"attention\.vmoba\.chunk_hw must be 2 integers"),
    (["backend=radiall"], r"attention\.backend must be one of \['dense', 'radial', 'sliding_tile', 'vmoba'"),
    (["kernel=fast"], r"attention\.kernel must be one of \['sdpa', 'flex', 'xformers', 'flash'\]"),
])
def test_options_are_checked_when_the_config_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(AttentionConfig, parse_overrides(overrides), prefix="attention.")
    nested = {"attention": parse_overrides(overrides)}  # under another section: the full dotted key, once
    with pytest.raises(ConfigError, match="model." + message):
        from_dict(_Section, {"model": nested}, prefix="")


def test_options_checked_in_direct_construction_and_set_attention():
    from vdiff.config import model_preset
    from vdiff.models.dit import VideoDiT

    with pytest.raises(ConfigError, match=r"attention\.radial\.block_size"):
        RadialConfig(block_size=100)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=1))
    with pytest.raises(ConfigError, match=r"unknown attention backend 'radiall'; choose one of \['dense', 'radial'"):
        model.set_attention("radiall")
    model.set_attention("flex")  # a dense kernel by name
    assert model.attention_config == AttentionConfig(kernel="flex")
    model.set_attention("radial")
    assert model.attention_config == AttentionConfig(backend="radial")


def test_train_print_config_refuses_bad_sparse_options():
    """The issue's command: a bad sparse option fails at load with the field and its allowed values, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/train/tiny.yaml", "model.attention.backend=radial",
         "model.attention.radial.block_size=100", "--print-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.attention.radial.block_size must be one of [16, 32, 64, 128, 256], got 100" in proc.stderr


# a two-level schema to check prefixes compose ("model.attention.radial.block_size", never doubled)
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class _Model:
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class _Section:
    model: _Model = field(default_factory=_Model)

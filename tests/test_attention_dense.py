"""Dense kernels against a float64 reference; the registry's honesty about what can run."""

import pytest
import torch

from vdiff.attention import AttentionContext, BackendUnavailable, available, dispatch, get_backend
from vdiff.attention.dense import reference_attention
from vdiff.config import AttentionConfig


def _qkv(b=2, seq=200, h=2, d=32, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, seq, h, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]


def _check(kernel, device="cpu", dtype=torch.float32, atol=2e-5, backward=True):
    q, k, v = _qkv(device=device, dtype=dtype)
    ctx = AttentionContext(grid=(2, 10, 10), config=AttentionConfig(kernel=kernel))
    with torch.set_grad_enabled(backward):
        out = dispatch(q, k, v, ctx)
    ref = reference_attention(q, k, v)
    assert out.shape == q.shape
    err = (out.double() - ref).abs().max().item()
    assert err < atol * ref.abs().max().item() * 10, f"{kernel}: max abs err {err}"
    if backward:
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for name, a, b in zip("qkv", got, want):
            rel = ((a.double() - b).norm() / b.norm()).item()
            assert rel < atol * 50, f"{kernel}: d{name} relative error {rel}"


def test_sdpa_matches_float64_reference_fwd_bwd():
    _check("sdpa")


@pytest.mark.slow
def test_flex_matches_float64_reference_forward_on_cpu():
    # compiled FlexAttention on CPU has no backward; the registry says so (next test)
    _check("flex", backward=False)


def test_flex_backward_on_cpu_is_refused_with_reason():
    status = available("cpu")["flex"]
    assert status.available and not status.backward and "no backward on CPU" in status.backward_reason
    q, k, v = _qkv(seq=16)
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        dispatch(q, k, v, AttentionContext(grid=(1, 4, 4), config=AttentionConfig(kernel="flex")))


def test_available_lists_every_dense_kernel_with_reasons():
    status = available("cpu")
    for name in ("sdpa", "flex", "xformers", "flash"):
        assert name in status
    assert status["sdpa"].available and status["sdpa"].backward
    assert not status["xformers"].available and "CUDA" in status["xformers"].reason
    assert not status["flash"].available and status["flash"].reason


def test_asking_for_a_backend_that_cannot_run_raises_the_reason():
    with pytest.raises(BackendUnavailable, match="xformers.*CUDA"):
        get_backend("xformers", "cpu")
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'nope'"):
        get_backend("nope", "cpu")
    q, k, v = _qkv(seq=16)
    with pytest.raises(BackendUnavailable, match="flash"):
        dispatch(q, k, v, AttentionContext(grid=(1, 4, 4), config=AttentionConfig(kernel="flash")))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa", "flex", "xformers", "flash"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernels_match_reference(kernel, dtype):
    status = available("cuda")[kernel]
    if not status.available:
        pytest.skip(f"{kernel}: {status.reason}")
    _check(kernel, device="cuda", dtype=dtype, atol=2e-3)


def _block_diagonal_run(length, block=16):
    """A block-diagonal BlockMask (full blocks, no mask_mod) through the compiled callable, and its dense reference."""
    from vdiff.attention.flex import block_mask_from_blocks, compiled_flex_attention

    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, 1, length, 16, generator=g) for _ in range(3))
    n = -(-length // block)
    mask = block_mask_from_blocks(torch.eye(n, dtype=torch.bool), block, length, "cpu")
    out = compiled_flex_attention()(q, k, v, block_mask=mask)
    same_block = (torch.arange(length)[:, None] // block) == (torch.arange(length)[None, :] // block)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=same_block)
    return out, ref


def test_compiled_flex_keeps_block_lists_past_torch_recompile_limit():
    """More shapes than torch's recompile limit (8 by default; 2 here, so that 4 compiles show it): every call still
    honours the block lists (an eager fallback would compute dense attention here)."""
    with torch._dynamo.config.patch(recompile_limit=2):  # (monkeypatch.setattr would leave the key hidden after)
        for length in range(40, 40 + 16 * 4, 16):  # 4 shapes
            out, ref = _block_diagonal_run(length)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_compiled_flex_fails_loudly_at_its_limit(monkeypatch):
    from vdiff.attention import flex

    monkeypatch.setattr(flex, "FLEX_RECOMPILE_LIMIT", 1)
    with pytest.raises(RuntimeError, match="VDIFF_FLEX_RECOMPILE_LIMIT"):
        for length in (27, 29):  # shapes no other test compiles: the second is past a limit of one graph
            _block_diagonal_run(length)


@pytest.mark.parametrize("works", [True, False])
@pytest.mark.parametrize("backend", ["xformers", "flash"])
def test_kernels_that_import_but_cannot_run_are_unavailable(monkeypatch, backend, works):
    """A wheel built for another torch/Python imports, yet every call raises: the backend says so instead of being
    picked and failing in the first forward (probed once per backend and device)."""
    import importlib.machinery
    import sys
    import types

    import vdiff.attention.dense as dense

    calls = []

    def attention(q, k, v, **kw):
        calls.append(q.shape)
        if not works:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")
        return q

    package, function = {"xformers": ("xformers", "memory_efficient_attention"),
                         "flash": ("flash_attn", "flash_attn_func")}[backend]
    pkg = types.ModuleType(package)
    pkg.__spec__ = importlib.machinery.ModuleSpec(package, None)
    monkeypatch.setitem(sys.modules, package, pkg)
    if backend == "xformers":
        ops = types.ModuleType("xformers.ops")
        ops.memory_efficient_attention, pkg.ops = attention, ops
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    else:
        pkg.flash_attn_func = attention
    monkeypatch.setattr(dense, "is_cuda", lambda device: True)  # the probe runs on CPU tensors here
    monkeypatch.setattr(dense, "_KERNEL_PROBED", {})
    impl = {"xformers": dense.XFormersBackend, "flash": dense.FlashBackend}[backend]()
    reason = impl.unavailable_reason("cpu")
    if works:
        assert reason is None
    else:
        assert f"{package} imports but its kernels do not run on cpu" in reason and "No operator found" in reason
        assert dense._KERNEL_PROBED[package, "cpu"] == reason
    assert impl.unavailable_reason("cpu") == reason and len(calls) == 1  # kept: the next call does not probe again

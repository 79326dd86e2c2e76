"""LoRA end to end: diffusers' LoRA files on VideoDiT and back, the pipeline's load / scale / fuse / unload / save,
and a LoRA trained on the tiny recipe (adapters only, resume exact, export in diffusers' format)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from tests.test_train import losses, run_train
from vdiff.config import model_preset
from vdiff.lora import LORA_WEIGHT_NAME, LoraConfig, add_lora, has_lora, load_lora, save_lora
from vdiff.models.dit import VideoDiT
from vdiff.pipeline import PipelineConfig, VideoPipeline

CFG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24, freq_dim=32,
           ffn_dim=48, num_layers=2, rope_max_seq_len=64)
SMALL = dict(num_frames=4, height=16, width=16, num_inference_steps=3, guidance_scale=3.0)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 6, 10, generator=g), torch.tensor([400.0]), torch.randn(1, 7, 24, generator=g)


def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _randomise_lora(model, seed=0):
    """Trained-looking adapters (PEFT starts lora_B at 0, which changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_a_diffusers_lora_on_wan_loads_into_videodit_and_back(tmp_path):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**CFG).eval()
    ours = VideoDiT(**CFG).eval()
    ours.load_state_dict(wan.state_dict())
    inputs = _inputs()
    base = _out(ours, inputs)
    base_state = {k: v.clone() for k, v in wan.state_dict().items()}

    # diffusers' conventions: a PEFT LoraConfig through add_adapter, saved by WanPipeline.save_lora_weights
    wan.add_adapter(PeftLoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "to_out.0", "ffn.net.0.proj"],
                                   init_lora_weights=False))
    WanPipeline.save_lora_weights(tmp_path / "wan", transformer_lora_layers=get_peft_model_state_dict(wan),
                                  transformer_lora_adapter_metadata=wan.peft_config["default"].to_dict())
    want = _out(wan, inputs)
    assert _rel(want, base) > 0.05

    name = load_lora(ours, tmp_path / "wan" / LORA_WEIGHT_NAME)
    assert _rel(_out(ours, inputs), want) <= 1e-5
    # ... and vdiff's file goes back into diffusers, through WanPipeline.load_lora_weights on a fresh Wan model
    save_lora(ours, tmp_path / "vdiff", name)
    torch.manual_seed(0)
    fresh = WanTransformer3DModel(**CFG).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=fresh, vae=None, scheduler=None)
    pipe.load_lora_weights(tmp_path / "vdiff")
    assert _rel(_out(fresh, inputs), want) <= 1e-5
    # a WanPipeline holding a VideoDiT loads it too
    other = VideoDiT(**CFG).eval()
    other.load_state_dict(base_state)
    WanPipeline(tokenizer=None, text_encoder=None, transformer=other, vae=None, scheduler=None) \
        .load_lora_weights(tmp_path / "wan")
    assert _rel(_out(other, inputs), want) <= 1e-5

    ours.unload_lora()
    assert not has_lora(ours) and torch.equal(_out(ours, inputs), base)  # unload restores the base exactly


@pytest.fixture(scope="module")
def pipe_and_lora(tmp_path_factory):
    cfg = PipelineConfig(num_frames=4, height=16, width=16, num_inference_steps=3, text_max_length=16)
    pipe = VideoPipeline.from_model_config(model_preset("tiny", num_layers=2), config=cfg, seed=0)
    folder = tmp_path_factory.mktemp("lora")
    donor = VideoDiT.from_config(pipe.transformer.config)
    for seed, sub in ((0, "a"), (1, "b")):
        add_lora(donor, LoraConfig(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        _randomise_lora(donor, seed)
        save_lora(donor, folder / sub)
        donor.unload_lora()
    return pipe, folder


def test_pipeline_load_scale_fuse_unload(pipe_and_lora):
    pipe, folder = pipe_and_lora
    base = pipe("a red circle", seed=0, **SMALL).videos
    try:
        name = pipe.load_lora_weights(folder / "a", adapter_name="a", scale=0.8)
        assert name == "a" and pipe.lora_adapters == {"a": 0.8}
        scaled = pipe("a red circle", seed=0, **SMALL).videos
        assert np.abs(scaled.astype(int) - base.astype(int)).mean() > 2  # the adapter changes the video
        pipe.set_adapters("a", 1.0)
        full = pipe("a red circle", seed=0, **SMALL).videos
        assert not np.array_equal(full, scaled)
        pipe.set_adapters("a", 0.8)
        assert np.array_equal(pipe("a red circle", seed=0, **SMALL).videos, scaled)

        pipe.fuse_lora()  # merged weights: the same video as the unfused adapter (fp32 rounding)
        fused = pipe("a red circle", seed=0, **SMALL).videos
        assert np.abs(fused.astype(int) - scaled.astype(int)).max() <= 1
        pipe.unfuse_lora()
        assert np.abs(pipe("a red circle", seed=0, **SMALL).videos.astype(int) - scaled.astype(int)).max() <= 1

        pipe.load_lora_weights(folder / "b", adapter_name="b", scale=0.5)
        assert pipe.lora_adapters == {"a": 0.8, "b": 0.5}
        both = pipe("a red circle", seed=0, **SMALL).videos
        assert not np.array_equal(both, scaled)
        with pytest.raises(ValueError, match="already loaded"):
            pipe.load_lora_weights(folder / "b", adapter_name="b")
    finally:
        pipe.unload_lora_weights()
    assert pipe.lora_adapters == {} and not has_lora(pipe.transformer)
    assert np.array_equal(pipe("a red circle", seed=0, **SMALL).videos, base)  # exactly the base model again


def test_pipeline_save_pretrained_keeps_base_and_adapter_apart(pipe_and_lora, tmp_path):
    pipe, folder = pipe_and_lora
    base = pipe("a blue square", seed=1, **SMALL).videos
    try:
        pipe.load_lora_weights(folder / "a", scale=0.7)
        want = pipe("a blue square", seed=1, **SMALL).videos
        pipe.save_pretrained(tmp_path / "p")
    finally:
        pipe.unload_lora_weights()
    config = json.loads((tmp_path / "p" / "vdiff.json").read_text())
    assert (config["lora"], config["lora_scale"]) == (LORA_WEIGHT_NAME, 0.7)
    loaded = VideoPipeline.from_pretrained(tmp_path / "p")
    assert loaded.lora_adapters == {"default_0": 0.7}
    assert np.array_equal(loaded("a blue square", seed=1, **SMALL).videos, want)
    loaded.unload_lora_weights()  # the saved transformer/ is the base model, untouched by the adapter
    assert np.array_equal(loaded("a blue square", seed=1, **SMALL).videos, base)


# --------------------------------------------------------------------------------------------------------------------
# Training a LoRA on the tiny recipe (real subprocesses)
# --------------------------------------------------------------------------------------------------------------------

LORA = ["train.lora.rank=4", "train.lora.alpha=8", "train.max_steps=4", "train.checkpoint_every=2",
        "train.batch_size=2", "data.num_samples=8", "train.ema_decay=0", "optim.lr=1e-2", "optim.warmup_steps=0"]


@pytest.mark.slow
def test_lora_training_trains_adapters_only_resumes_exactly_and_exports_diffusers_format(tmp_path):
    from safetensors.torch import load_file

    from tests.test_train import SMALL as TRAIN_SMALL
    from tests.test_train import TINY
    from train.config import load_recipe

    run = run_train([f"output_dir={tmp_path / 'a'}", *LORA])
    assert run.returncode == 0, run.stderr[-3000:]
    full = losses(tmp_path / "a")
    assert sorted(full) == [1, 2, 3, 4]

    # resume from step 2 in another folder: steps 3 and 4 log the same losses
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", tmp_path / "step-2")
    again = run_train([f"output_dir={tmp_path / 'b'}", *LORA, f"train.resume={tmp_path / 'step-2'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: v for s, v in losses(tmp_path / "b").items() if s > 2} == {3: full[3], 4: full[4]}

    # the export: the base transformer as initialised (frozen), the adapter in diffusers' format beside it
    export = tmp_path / "a" / "pipeline"
    recipe = load_recipe(TINY, [*TRAIN_SMALL, *LORA])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        init = VideoDiT.from_model_config(recipe.model.to_model_config())
    saved = VideoDiT.from_pretrained(export / "transformer")
    for key, value in init.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    adapter = load_file(export / LORA_WEIGHT_NAME)
    assert adapter and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # lora_B started at 0 and trained

    pipe = VideoPipeline.from_pretrained(export)
    call = dict(num_inference_steps=3, guidance_scale=1.0, seed=0)
    tuned = pipe("a red circle moving right", **call).videos
    pipe.fuse_lora()
    fused = pipe("a red circle moving right", **call).videos
    assert np.abs(fused.astype(int) - tuned.astype(int)).max() <= 1
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert np.abs(pipe("a red circle moving right", **call).videos.astype(int) - tuned.astype(int)).mean() > 0.5

    # diffusers reads the exported adapter onto its own Wan model: the same transformer output as vdiff's
    wan = WanTransformer3DModel(**recipe.model.to_model_config().to_diffusers()).eval()
    wan.load_state_dict(init.state_dict())
    WanPipeline(tokenizer=None, text_encoder=None, transformer=wan, vae=None, scheduler=None) \
        .load_lora_weights(export)
    ours = VideoDiT.from_pretrained(export / "transformer").eval()
    load_lora(ours, export)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 48, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 8, 384, generator=g))
    assert _rel(_out(ours, inputs), _out(wan, inputs)) <= 1e-5
    assert _rel(_out(ours, inputs), _out(init.eval(), inputs)) > 1e-4


@pytest.mark.parametrize("backend", ["dense", "radial", "sliding_tile"])
def test_adapters_train_under_every_attention_backend(backend):
    """The adapters wrap Linear layers; attention still goes through the seam: gradients reach the adapters (and
    only them) whichever backend runs."""
    torch.manual_seed(0)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=2))
    params = add_lora(model, LoraConfig(rank=4))
    model.set_attention(backend)
    x, t, text = torch.randn(1, 48, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 6, 384)
    model(x, t, text).sample.square().mean().backward()
    named = dict(model.named_parameters())
    assert params and all(p.grad is not None for p in params)
    assert all(p.grad.abs().max() > 0 for n, p in named.items() if "lora_B" in n)  # (lora_A: 0, as lora_B = 0)
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_with_deepspeed_two_processes_matches_one(tmp_path):
    """ZeRO-2 over 2 processes trains the same adapters as 1 process with the same global batch."""
    from safetensors.torch import load_file

    from tests.test_train_distributed import finish, launch

    lora = ["train.lora.rank=4", "train.ema_decay=0.0"]
    finish(launch([f"output_dir={tmp_path / 'one'}", "--nproc", "1", "train.batch_size=4", *lora]))
    finish(launch([f"output_dir={tmp_path / 'two'}", "--nproc", "2", "train.deepspeed=zero2", "train.batch_size=2",
                   *lora]))
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4] and list(got.values()) == pytest.approx(list(want.values()), rel=1e-4)
    a = load_file(tmp_path / "one" / "pipeline" / LORA_WEIGHT_NAME)
    b = load_file(tmp_path / "two" / "pipeline" / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_sample_cli_and_server_take_an_operator_lora(pipe_and_lora, tmp_path, capsys):
    from serve.worker import WorkerPool
    from vdiff.sample import main as sample_main

    pipe, folder = pipe_and_lora
    pipe.save_pretrained(tmp_path / "p")
    args = ["--checkpoint", str(tmp_path / "p"), "--prompt", "a red circle", "--out", str(tmp_path / "c.gif"),
            "num_inference_steps=2", "seed=0"]
    assert sample_main([*args, f"lora={folder / 'a'}", "lora_scale=0.5"]) == 0 and (tmp_path / "c.gif").is_file()
    assert sample_main([*args, "lora_scale=0.5"]) == 2
    assert sample_main([*args, f"lora={tmp_path / 'missing'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    with WorkerPool.from_pretrained(tmp_path / "p", ["cpu"], lora=folder / "a", lora_scale=0.5) as pool:
        assert pool.pipelines[0].lora_adapters == {"default_0": 0.5}

"""Training causal (long-video) models: the teacher-forcing and diffusion-forcing objectives are causal in the
chunks, resume exactly, export a pipeline that streams, and refuse a bidirectional model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_train import SMALL, losses, run_train
from train.config import load_recipe
from vdiff.config import ConfigError

CAUSAL = ["model.causal={chunk_frames: 2, sink_chunks: 1, window_chunks: 1}", "train.context_noise=0.1",
          "train.batch_size=2", "data.num_samples=8"]


def _trainer(tmp_path, objective, extra=()):
    from train.trainer import Trainer

    recipe = load_recipe("configs/train/tiny.yaml", [*SMALL, *CAUSAL, f"train.objective={objective}",
                                                     f"output_dir={tmp_path / objective}", "train.max_steps=1",
                                                     *extra])
    return Trainer(recipe)


SPARSE_TILES = ["model.attention.backend=sliding_tile", "model.attention.sliding_tile.tile=[1, 2, 2]",
                "model.attention.sliding_tile.window=[3, 1, 1]"]


@pytest.mark.parametrize("objective, extra", [("teacher_forcing", ()), ("diffusion_forcing", ()),
                                              ("teacher_forcing", SPARSE_TILES)])
def test_objective_is_causal_in_the_chunks(tmp_path, objective, extra):
    """The loss's prediction for chunk c depends on earlier chunks but never on later ones: change the clean latents of
    the last chunk and the predictions for the others do not move; change chunk 0 and later predictions do (dense,
    and sliding tile restricted to the attended chunks)."""
    trainer = _trainer(tmp_path, objective, extra)
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=2, collate_fn=_collate)))
    preds = {}

    def capture(x, t_tokens, text, chunks=None, text_switch=None):
        assert text_switch is None  # this recipe has no prompt switches
        v = trainer.model(x, t_tokens, text, return_dict=False, attention_kwargs={"chunks": chunks,
                                                                                  "mask_cache": trainer.mask_cache})[0]
        preds["v"] = v.detach()
        return v

    trainer.model_forward = capture
    x0, text = trainer.clean_inputs(batch)
    f = trainer.model_config.causal.chunk_frames
    loss = trainer.compute_loss(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    base = preds["v"][:, :, -x0.shape[2]:]
    for chunk, later_unchanged in ((x0.shape[2] // f - 1, True), (0, False)):
        changed = x0.clone()
        changed[:, :, chunk * f:(chunk + 1) * f] += 1.0
        trainer.clean_inputs = lambda b, x=changed: (x, text)
        trainer.compute_loss(batch, 0)
        v = preds["v"][:, :, -x0.shape[2]:]
        if later_unchanged:  # the last chunk moved: earlier chunks' predictions are exactly the same
            torch.testing.assert_close(v[:, :, :chunk * f], base[:, :, :chunk * f], atol=1e-6, rtol=0)
        else:  # chunk 0 moved: every later chunk sees it (the sink)
            assert (v[:, :, f:] - base[:, :, f:]).abs().max() > 1e-4


def _collate(items):
    from train.data import collate

    return collate(items)


@pytest.mark.slow
def test_teacher_forcing_resume_is_exact_and_the_export_streams(tmp_path):
    straight = run_train([*CAUSAL, "train.objective=teacher_forcing", "train.max_steps=4", "train.checkpoint_every=2",
                          f"output_dir={tmp_path / 'a'}"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_train([*CAUSAL, "train.objective=teacher_forcing", "train.max_steps=2", "train.checkpoint_every=2",
                       f"output_dir={tmp_path / 'b'}", "train.export=false"])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train([*CAUSAL, "train.objective=teacher_forcing", "train.max_steps=4", "train.checkpoint_every=2",
                         f"output_dir={tmp_path / 'b'}", "train.resume=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == [1, 2, 3, 4] and a == b

    from vdiff.pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(tmp_path / "a" / "pipeline")
    assert pipe.transformer.causal_config.window_chunks == 1 and "causal_kv" in pipe.caches
    assert pipe.config.context_noise == pytest.approx(0.1)
    chunks = list(pipe.stream("a red circle moving right", num_chunks=3, seed=0, num_inference_steps=2))
    assert [c.index for c in chunks] == [0, 1, 2] and chunks[2].frames.shape == (2, 16, 16, 3)

    # the long-video eval job on it: a per-chunk table, the seam ratio, the prompt-switch share
    import json

    from tests.test_train import run_python

    report_path = tmp_path / "eval-long.json"
    done = run_python(["-m", "vdiff.eval", "--checkpoint", str(tmp_path / "a" / "pipeline"), "--out", str(report_path),
                       "num_clips=4", "num_chunks=4", "steps=2", "batch_size=4", "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["kind"] == "long" and len(report["results"]["per_chunk"]) == 4
    assert report["settings"]["switch_clips"] == 1 and "switch_followed" in report["switch"]
    assert report["results"]["seam_ratio"] > 0 and "all-correct" in done.stdout
    # per clip, chunk by chunk, what was read; the per-chunk table is their mean
    from vdiff.data.shapes import parse_caption

    clips = report["per_clip"]
    assert [len(c["read"]) for c in clips] == [4] * 4 and all(len(r) == 3 for c in clips for r in c["read"])
    colours = [parse_caption(clip["prompt"])[0] for clip in clips]
    for c, row in enumerate(report["results"]["per_chunk"]):
        assert row["colour"] == sum(clip["read"][c][0] == want for clip, want in zip(clips, colours)) / 4
    assert len(report["switch_per_clip"]) == 1 and report["switch_per_clip"][0]["new_prompt"] != clips[0]["prompt"]


def test_causal_objectives_need_a_causal_model():
    with pytest.raises(ConfigError, match="train.objective=teacher_forcing trains a causal model: set model.causal"):
        load_recipe("configs/train/tiny.yaml", ["train.objective=teacher_forcing"])
    with pytest.raises(ConfigError, match=r"train.context_noise must be in \[0, 1\)"):
        load_recipe("configs/train/tiny.yaml", [*CAUSAL[:1], "train.context_noise=1.5"])


def test_shapes_world_turns_at_a_chunk_boundary():
    """data.switch_prob: a clip turns once at a multiple of switch_every frames; frames before the turn are the
    unturned clip's, the caption in force changes there; deterministic by (seed, index)."""
    from vdiff.data.shapes import ShapesWorld, parse_caption

    kw = dict(num_frames=16, height=16, width=16, boundary="wrap", seed=3)
    plain, world = ShapesWorld(40, **kw), ShapesWorld(40, switch_prob=0.5, switch_every=2, **kw)
    turned = [i for i in range(40) if world.switch(i) is not None]
    assert 8 <= len(turned) <= 32  # about half
    for i in turned[:5]:
        frame, direction = world.switch(i)
        assert frame % 2 == 0 and 2 <= frame <= 14 and world.switch(i) == (frame, direction)
        a, b = plain.clip(i), world.clip(i)
        np.testing.assert_array_equal(a[:frame], b[:frame])
        assert (a[frame:] != b[frame:]).any()
        before, after = parse_caption(world.caption_at(i, frame - 1)), parse_caption(world.caption_at(i, frame))
        assert before[:2] == after[:2] and before[2] != after[2] == direction
    with pytest.raises(ValueError, match="direction switches need boundary='wrap'"):
        ShapesWorld(4, num_frames=16, switch_prob=0.5, switch_every=2)


def test_text_switch_gives_each_chunk_its_caption():
    """The model's text_switch: no token on the second text == the first text alone; every token on it == the second
    text alone; block-causal, chunks before the turn do not see the second text at all."""
    from vdiff.config import CausalConfig, model_preset
    from vdiff.models.dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT.from_model_config(model_preset("tiny", num_layers=2, causal=CausalConfig(
        chunk_frames=2, sink_chunks=0, window_chunks=1))).eval()
    x, t = torch.randn(2, 48, 8, 4, 4), torch.tensor([500.0, 700.0])
    first, second = torch.randn(2, 6, 384), torch.randn(2, 6, 384)
    L = math.prod(model.token_grid((8, 4, 4)))  # 4 chunks of L / 4 tokens

    def run(text, switch=None):
        kwargs = {"text_switch": switch} if switch is not None else {}
        with torch.no_grad():
            return model(x, t, text, return_dict=False, attention_kwargs=kwargs)[0]

    none, every = torch.zeros(2, L, dtype=torch.bool), torch.ones(2, L, dtype=torch.bool)
    torch.testing.assert_close(run(first, (second, none)), run(first), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(first, (second, every)), run(second), atol=1e-6, rtol=0)
    from_chunk_2 = (torch.arange(L) // (L // 4) >= 2)[None].expand(2, -1)
    mixed = run(first, (second, from_chunk_2))
    torch.testing.assert_close(mixed[:, :, :4], run(first)[:, :, :4], atol=1e-6, rtol=0)  # chunks 0, 1
    assert (mixed[:, :, 4:] - run(first)[:, :, 4:]).abs().max() > 1e-3


def test_teacher_forcing_with_switches_marks_the_turned_chunks(tmp_path):
    trainer = _trainer(tmp_path, "teacher_forcing", ["data.switch_prob=1.0", "data.switch_every=2",
                                                     "data.boundary=wrap"])
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=2, collate_fn=_collate)))
    x0, text = trainer.clean_inputs(batch)
    n = x0.shape[2] // 2
    chunk_tokens = x0.shape[2] // n * math.prod(trainer.model.token_grid(x0.shape[2:])[1:])
    second, tokens, keep = trainer._text_switch(batch, text, n, chunk_tokens)
    for b, index in enumerate(batch["index"]):
        frame, _ = trainer.switch_world.switch(int(index))
        after = torch.arange(n) >= frame // 2  # noisy chunks from the turn on
        # as the sampler re-commits its cache at a switch: every context copy on the new caption, the noisy chunks
        # from the turn on
        want = torch.cat([torch.ones(n, dtype=torch.bool), after]).repeat_interleave(chunk_tokens)
        assert torch.equal(tokens[b], want) and torch.equal(keep[b], after)
        assert not torch.equal(second[b], text[b])

    seen = _capture_output(trainer)
    loss = trainer.compute_loss(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = seen["v"].grad[:, :, x0.shape[2]:]  # (B, C, F, H, W) of the noisy half
    per_chunk = grad.abs().sum((1, 3, 4)).unflatten(1, (n, -1)).sum(2)  # (B, n)
    assert torch.equal(per_chunk > 0, keep)  # the chunks before the turn are out of the loss, the others in it
    with pytest.raises(ConfigError, match="data.switch_prob > 0 trains prompt switches with train.objective"):
        _trainer(tmp_path / "df", "diffusion_forcing", ["data.switch_prob=1.0", "data.switch_every=2",
                                                        "data.boundary=wrap"])


def test_chunk_weights_scale_the_first_chunk_and_the_turn(tmp_path):
    """train.first_chunk_weight / train.switch_weight: the same batch and step with and without them; the loss
    gradient on the model's output is the unweighted one times the weight of its chunk (chunk 0 of a clip that keeps
    it, the first chunk after a turn), and 0 before a turn, as without weights."""
    trainer = _trainer(tmp_path, "teacher_forcing", ["data.switch_prob=0.5", "data.switch_every=2",
                                                     "data.boundary=wrap", "train.cfg_dropout=0.0"])
    batch = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=6, collate_fn=_collate)))
    turns = [trainer.switch_world.switch(int(i)) for i in batch["index"]]
    assert any(t is None for t in turns) and any(t is not None for t in turns)
    seen = _capture_output(trainer)

    def grads(first, turn):
        trainer.recipe.train.first_chunk_weight, trainer.recipe.train.switch_weight = first, turn
        trainer.compute_loss(batch, 0).backward()
        g = seen["v"].grad[:, :, seen["v"].shape[2] // 2:]  # (B, C, F, H, W) of the noisy half
        return g.unflatten(2, (-1, 2))  # (B, C, n, 2, H, W)

    plain, weighted = grads(1.0, 1.0), grads(2.0, 3.0)
    n = plain.shape[2]
    for b, turn in enumerate(turns):
        want = torch.ones(n)
        if turn is None:
            want[0] = 2.0
        else:
            want[: turn[0] // 2] = 0.0
            want[turn[0] // 2] = 3.0
        assert plain[b].abs().amax((0, 2, 3, 4)).gt(0).tolist() == want.gt(0).tolist()
        for c in range(n):
            torch.testing.assert_close(weighted[b, :, c], want[c] * plain[b, :, c], rtol=1e-5, atol=1e-9)
    with pytest.raises(ConfigError, match=r"train.switch_weight must be in \(0, 100\]"):
        load_recipe("configs/train/tiny.yaml", [*CAUSAL, "train.objective=teacher_forcing", "train.switch_weight=0"])
    with pytest.raises(ConfigError, match="train.first_chunk_weight weighs teacher-forcing chunks"):
        load_recipe("configs/train/tiny.yaml", [*CAUSAL, "train.first_chunk_weight=2"])


def _capture_output(trainer) -> dict:
    """Wrap trainer.model_forward so that its last output (with its gradient kept) lands in the returned dict's "v"."""
    forward, seen = trainer.model_forward, {}

    def capture(*args):
        out = forward(*args)
        out.retain_grad()
        seen["v"] = out
        return out

    trainer.model_forward = capture
    return seen

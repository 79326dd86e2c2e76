"""Training causal (long-video) models: the teacher-forcing and diffusion-forcing objectives are causal in the
chunks, resume exactly, export a pipeline that streams, and refuse a bidirectional model."""

from __future__ import annotations

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

    def capture(x, t_tokens, text, chunks=None):
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


def test_causal_objectives_need_a_causal_model():
    with pytest.raises(ConfigError, match="train.objective=teacher_forcing trains a causal model: set model.causal"):
        load_recipe("configs/train/tiny.yaml", ["train.objective=teacher_forcing"])
    with pytest.raises(ConfigError, match=r"train.context_noise must be in \[0, 1\)"):
        load_recipe("configs/train/tiny.yaml", [*CAUSAL[:1], "train.context_noise=1.5"])

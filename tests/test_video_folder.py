"""Video-folder dataset: real mp4 / gif / webm files written with imageio, captions from captions.jsonl and .txt
sidecars, stride sampling, resize + centre crop, broken files skipped and counted; and the latent cache."""

from __future__ import annotations

import json
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from vdiff.data.latents import LatentDataset, build_latent_cache
from vdiff.data.video_folder import VideoFolder, resize_center_crop


def ramp_video(n: int, h: int, w: int, offset: int = 0) -> np.ndarray:
    """Frame i is a flat grey of value 10 * i + offset, so decoded frames tell which source frame they were."""
    return np.stack([np.full((h, w, 3), min(255, 10 * i + offset), np.uint8) for i in range(n)])


@pytest.fixture
def folder(tmp_path):
    iio.imwrite(tmp_path / "a.mp4", ramp_video(12, 32, 48), fps=8, codec="libx264", macro_block_size=1)
    iio.imwrite(tmp_path / "b.gif", ramp_video(10, 24, 24, offset=5), duration=100, loop=0)
    (tmp_path / "b.txt").write_text("a grey gif\n")
    iio.imwrite(tmp_path / "c.webm", ramp_video(8, 16, 16), fps=8, codec="libvpx-vp9")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom not really a video")
    (tmp_path / "nocaption.mp4").write_bytes(b"")
    rows = [{"file": "a.mp4", "caption": "a grey mp4"}, {"file": "c.webm", "caption": "a grey webm"},
            {"file": "broken.mp4", "caption": "broken"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_video_folder_decodes_captions_stride_and_skips_broken(folder):
    with pytest.warns(UserWarning, match="nocaption.mp4: no caption"):
        ds = VideoFolder(folder, num_frames=4, height=16, width=16, frame_stride=2)
    assert [p.name for p, _ in ds.items] == ["a.mp4", "b.gif", "broken.mp4", "c.webm"]
    item = ds[0]
    assert item["caption"] == "a grey mp4" and item["video"].shape == (3, 4, 16, 16)
    # stride 2: source frames 0, 2, 4, 6 -> grey 0, 20, 40, 60 (lossy codec: within a few levels)
    levels = ((item["video"].mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
    assert levels == pytest.approx([0, 20, 40, 60], abs=4)
    gif = ds[1]
    assert gif["caption"] == "a grey gif"
    assert ((gif["video"].mean(dim=(0, 2, 3)) + 1) * 127.5).tolist() == pytest.approx([5, 25, 45, 65], abs=2)
    with pytest.warns(UserWarning, match="skipping unreadable video .*broken.mp4"):
        replaced = ds[2]
    assert replaced["index"] == 3 and replaced["caption"] == "a grey webm" and ds.skipped == {2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already counted: no second warning, no crash
        assert ds[2]["index"] == 3


def test_resize_center_crop_keeps_the_centre():
    x = torch.zeros(1, 1, 20, 40)
    x[..., 5:15, 15:25] = 1.0  # a centred square
    out = resize_center_crop(x, 10, 10)  # scale 0.5 -> 10 x 20, crop columns 5..15
    assert out.shape == (1, 1, 10, 10)
    assert out[0, 0, 4:6, 4:6].min() > 0.9 and out[0, 0, 0, 0] < 0.1


def test_latent_cache_written_once_and_reused(tmp_path):
    from vdiff.data.shapes import ShapesWorld
    from vdiff.models.vae import PixelPatchVAE

    data = ShapesWorld(5, num_frames=4, height=16, width=16)
    vae = PixelPatchVAE((1, 4, 4))
    calls = []

    def encode_text(prompts):
        calls.append(len(prompts))
        return torch.stack([torch.full((3, 8), float(len(p))) for p in prompts])

    fp = {"data": "shapes-5", "vae": "pixel"}
    build_latent_cache(data, tmp_path / "c", vae.encode, encode_text, fp, batch_size=2, show_progress=False)
    assert sum(calls) == 5
    cached = LatentDataset(tmp_path / "c")
    for i in range(5):
        torch.testing.assert_close(cached[i]["latents"], vae.encode(data[i]["video"][None])[0])
        assert cached[i]["caption"] == data[i]["caption"]
        assert cached[i]["text"][0, 0].item() == len(data[i]["caption"])
    build_latent_cache(data, tmp_path / "c", vae.encode, encode_text, fp, show_progress=False)
    assert sum(calls) == 5  # reused: no encoder call
    with pytest.raises(ValueError, match="latent cache was built for"):
        build_latent_cache(data, tmp_path / "c", vae.encode, encode_text, {"data": "other"}, show_progress=False)

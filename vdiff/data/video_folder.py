"""A folder of captioned videos: mp4 / webm / gif / mov / mkv files with captions in `captions.jsonl`
(`{"file": "a.mp4", "caption": "..."}` per line) or a `.txt` sidecar next to each video (`a.mp4` -> `a.txt`).

Each item is `num_frames` frames taken every `frame_stride` frames from the start of the clip, resized so the short
side covers (height, width) and centre-cropped: `{"video": float32 [3, T, H, W] in [-1, 1], "caption", "index"}`.
A file that cannot be decoded (or is too short) is skipped with a warning and counted in `skipped`, never a crash:
the item is replaced by the next readable one, deterministically.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")


def read_frames(path: str | Path, num_frames: int, stride: int = 1) -> np.ndarray:
    """Decode frames 0, stride, 2*stride, ... (num_frames of them) as uint8 [T, H, W, 3] with PyAV.
    Raises ValueError if the file has fewer frames."""
    import av

    wanted = [i * stride for i in range(num_frames)]
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i == wanted[len(frames)]:
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    if len(frames) < num_frames:
        raise ValueError(f"{path}: {len(frames)} frames at stride {stride}, need {num_frames}")
    return np.stack(frames)  # (T, H, W, 3)


def resize_center_crop(video_TCHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale so the frame covers (height, width), then crop the centre. float [T, C, H, W] -> [T, C, height, width]."""
    _, _, h, w = video_TCHW.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video_TCHW = F.interpolate(video_TCHW, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video_TCHW[:, :, top:top + height, left:left + width]


class VideoFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, *, num_frames: int = 16, height: int = 32, width: int = 32,
                 frame_stride: int = 1) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder not found: {self.root}")
        if min(num_frames, height, width, frame_stride) < 1:
            raise ValueError("num_frames, height, width and frame_stride must be >= 1")
        self.num_frames, self.height, self.width, self.frame_stride = num_frames, height, width, frame_stride
        self.items = self._index()
        if not self.items:
            raise ValueError(f"{self.root}: no captioned videos ({', '.join(VIDEO_SUFFIXES)} with captions.jsonl "
                             f"or .txt sidecars)")
        self.skipped: set[int] = set()  # indices found unreadable so far (per process)
        self._lock = threading.Lock()

    def _index(self) -> list[tuple[Path, str]]:
        captions: dict[str, str] = {}
        jsonl = self.root / "captions.jsonl"
        if jsonl.is_file():
            for n, line in enumerate(jsonl.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    captions[str(row["file"])] = str(row["caption"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{jsonl}:{n}: expected {{\"file\": ..., \"caption\": ...}}: {err}") from None
        items = []
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
            rel = str(path.relative_to(self.root))
            text = captions.get(rel)
            if text is None and path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_text().strip()
            if text is None:
                warnings.warn(f"{path}: no caption (captions.jsonl or {path.with_suffix('.txt').name}); skipped",
                              stacklevel=2)
                continue
            items.append((path, text))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> torch.Tensor:
        """Item `index` as float [3, T, H, W] in [-1, 1]; raises if unreadable."""
        clip = read_frames(self.items[index][0], self.num_frames, self.frame_stride)  # (T, H, W, 3) uint8
        video = torch.from_numpy(clip).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        video = resize_center_crop(video, self.height, self.width)
        return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        for attempt in range(n):
            i = (int(index) + attempt) % n
            if i in self.skipped:
                continue
            try:
                video = self.load(i)
            except Exception as err:  # any decode failure: warn, count, move on
                with self._lock:
                    self.skipped.add(i)
                warnings.warn(f"skipping unreadable video {self.items[i][0]}: {err} "
                              f"({len(self.skipped)} skipped so far)", stacklevel=2)
                continue
            return {"video": video, "caption": self.items[i][1], "index": i}
        raise RuntimeError(f"{self.root}: none of the {n} videos could be read")

"""Small facts about where vdiff runs, defined once: the default device, the bundled checkpoint, a free local port."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The tiny ShapesWorld model that ships with the repository (no download, runs on CPU).
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-tiny"
BUNDLED_CAUSAL_CHECKPOINT = BUNDLED_CHECKPOINT.parent / "shapes-causal"  # the long-video model (block-causal)


def bundled_causal_checkpoint() -> Path | None:
    """checkpoints/shapes-causal when the checkout holds it (a saved pipeline: its vdiff.json), else None."""
    return BUNDLED_CAUSAL_CHECKPOINT if (BUNDLED_CAUSAL_CHECKPOINT / "vdiff.json").is_file() else None


def default_device() -> torch.device:
    """CUDA where a GPU is visible, else CPU."""
    import torch  # here, not at the top: `--help` of the CLIs should not pay for importing torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (for a test server or a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

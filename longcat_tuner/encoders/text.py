"""The text encoder: whatever `text_encoder/config.json` declares (umT5-XXL for the official checkpoint).

Matches the official text path (MODEL.md section 2): the prompt is cleaned (ftfy, HTML unescaped twice,
whitespace collapsed), tokenized to exactly 512 tokens with padding and truncation, encoded with the
attention mask; the last hidden state is returned as is (padded positions are not zeroed here: the DiT
zeroes them after its caption projection).
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Sequence, Union

import torch

from longcat_tuner.errors import CheckpointError
from longcat_tuner.model.loading import find_component, verify_weight_files

MAX_TOKENS = 512


def clean_prompt(text: str) -> str:
    """ftfy fix, HTML unescape twice, strip, collapse whitespace (the official `prompt_clean`)."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def folder_identity(folder: Path) -> str:
    """A short fingerprint of a component folder: its config and the names and sizes of its weight files."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.suffix == ".json":
            digest.update(file.name.encode() + file.read_bytes())
        elif file.is_file():
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


class TextEncoder:
    """`TextEncoder.from_pretrained(root).encode(prompts) -> (embeds [B,512,C], mask [B,512])`."""

    def __init__(self, tokenizer, model, identity: str, max_length: int = MAX_TOKENS):
        self.tokenizer = tokenizer
        self.model = model
        self.identity = identity
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, root: Union[str, Path], *, dtype: torch.dtype = torch.float32, device="cpu", caption_channels: int | None = None
    ) -> "TextEncoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        encoder_dir = find_component(root, "text_encoder")
        tokenizer_dir = find_component(Path(root), "tokenizer", marker="tokenizer_config.json")
        config = AutoConfig.from_pretrained(encoder_dir)
        width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
        dit_config = Path(root) / "dit" / "config.json"
        if caption_channels is None and dit_config.exists():
            caption_channels = json.loads(dit_config.read_text()).get("caption_channels")
        if caption_channels is not None and width != caption_channels:
            raise CheckpointError(
                f"{encoder_dir}/config.json declares width {width}, but the DiT expects caption_channels="
                f"{caption_channels}: LongCat-Video uses umT5-XXL (d_model 4096), not Qwen2.5-VL; use the text "
                f"encoder shipped with the checkpoint"
            )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        architectures = getattr(config, "architectures", None) or []
        if config.model_type in ("umt5", "t5", "mt5"):
            # Encoder-only class: never builds (or needs weights for) the decoder.
            import transformers

            name = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}[config.model_type]
            model_cls = getattr(transformers, name)
        elif architectures and hasattr(__import__("transformers"), architectures[0]):
            model_cls = getattr(__import__("transformers"), architectures[0])
        else:
            model_cls = AutoModel
        verify_weight_files(encoder_dir, "model.safetensors", required=False)  # names a truncated file
        try:
            model = model_cls.from_pretrained(encoder_dir, torch_dtype=dtype)
        except OSError as err:
            raise CheckpointError(f"cannot load the text encoder from {encoder_dir}: {err}") from None
        model = model.to(device).eval().requires_grad_(False)
        return cls(tokenizer, model, identity=f"{config.model_type}-{folder_identity(encoder_dir)}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each cleaned prompt before truncation (special tokens included): above `max_length`,
        `encode` sees only the first `max_length`."""
        ids = self.tokenizer([clean_prompt(p) for p in prompts], add_special_tokens=True, truncation=False).input_ids
        return [len(row) for row in ids]

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = [clean_prompt(p) for p in prompts]
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        embeds = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return embeds, mask.long()

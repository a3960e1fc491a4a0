"""longcat-tuner: faithful LoRA and full fine-tuning for Meituan's LongCat-Video, image-to-video first.

Public API (see README, section "Python API"):
`load_dit`, `TextEncoder`, `VideoVAE`, `sample`, `load_lora`, `save_lora`, `inject_lora`.

Names are imported lazily, so light parts of the package (the web server, the config schema) never pull
in torch.
"""
from __future__ import annotations

from longcat_tuner.lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "load_dit": "longcat_tuner.model.loading",
    "LongCatDiT": "longcat_tuner.model.dit",
    "DiTConfig": "longcat_tuner.model.config",
    "TextEncoder": "longcat_tuner.encoders.text",
    "VideoVAE": "longcat_tuner.encoders.vae",
    "sample": "longcat_tuner.diffusion.sampler",
    "load_lora": "longcat_tuner.model.lora",
    "save_lora": "longcat_tuner.model.lora",
    "inject_lora": "longcat_tuner.model.lora",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)

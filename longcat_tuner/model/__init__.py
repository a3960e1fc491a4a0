"""The LongCat-Video DiT, its attention backends, loading and LoRA.

Names are imported lazily so that `longcat_tuner.model.inspect` and `longcat_tuner.model.config` (used by
`check` and the web UI) do not import torch.
"""
from __future__ import annotations

from longcat_tuner.lazy import lazy_getattr

_EXPORTS = {
    "DiTConfig": "longcat_tuner.model.config",
    "KVCache": "longcat_tuner.model.dit",
    "LongCatDiT": "longcat_tuner.model.dit",
    "load_dit": "longcat_tuner.model.loading",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)

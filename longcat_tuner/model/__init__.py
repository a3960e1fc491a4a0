"""The LongCat-Video DiT, its attention backends, loading and LoRA."""
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.dit import KVCache, LongCatDiT
from longcat_tuner.model.loading import load_dit

__all__ = ["DiTConfig", "KVCache", "LongCatDiT", "load_dit"]

"""The training-time dataset: reads cache entries only (never media, never a model).

Each item is a dict:
  `latents_mean`, `latents_std` [16, T, h, w]   clip posterior (sample = mean + std * randn)
  `cond_mean`, `cond_std` [16, 1, h, w] or None start-frame posterior (None: text-to-video item)
  `text_embeds` [512, C], `text_mask` [512]     caption embedding
  `sample_id`, `dataset_id`, `caption`, `bucket` (frames, height, width), `media_path`, `cond_media_path`.
Batch with `BucketBatchSampler(dataset.group_keys(), batch_size, repeats=dataset.repeats())` and
`collate_samples`, so a batch never mixes shapes or I2V with T2V items.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from longcat_tuner.data.cache import CachedSample, read_manifest
from longcat_tuner.errors import DataError


def _load(path: str, sample_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for truncated files
        raise DataError(f"sample '{sample_id}': cache entry {path} is missing or corrupt ({err}); rerun `longcat-tuner cache`") from None


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A latent sample `mean + std * randn` in float32 (what the official code's `latent_dist.sample()` gives)."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
    return mean.float() + std.float() * noise


class CachedVideoDataset(torch.utils.data.Dataset):
    """Cached samples of one or more datasets (see the module docstring for an item's keys)."""

    def __init__(self, samples: Sequence[CachedSample], empty_text_path: str | Path) -> None:
        self.samples = list(samples)
        self.empty_text_path = str(empty_text_path)

    @classmethod
    def from_manifests(cls, paths: Sequence[str | Path]) -> "CachedVideoDataset":
        """Read the `manifest.json` files `build_caches` wrote into clip datasets' cache_dir_vae."""
        samples: list[CachedSample] = []
        empty = None
        for path in paths:
            found, empty_path = read_manifest(Path(path))
            samples += found
            empty = empty or empty_path
        if empty is None:
            raise DataError("no cache manifest given; run `longcat-tuner cache --config config/config.json`")
        return cls(samples, empty)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        latents = _load(sample.latent_path, sample.sample_id)
        text = _load(sample.text_path, sample.sample_id)
        cond = _load(sample.cond_path, sample.sample_id) if sample.cond_path else None
        frames, height, width = sample.bucket
        expected = (1 + (frames - 1) // 4, height // 8, width // 8)
        if tuple(latents["mean"].shape[1:]) != expected:
            raise DataError(
                f"sample '{sample.sample_id}': cached latents {tuple(latents['mean'].shape)} do not match bucket "
                f"{frames}x{height}x{width}; rerun `longcat-tuner cache`"
            )
        if cond is not None and tuple(cond["mean"].shape[1:]) != (1, *expected[1:]):
            raise DataError(
                f"sample '{sample.sample_id}': cached start frame {sample.cond_path} {tuple(cond['mean'].shape)} does not "
                f"match bucket {frames}x{height}x{width}; rerun `longcat-tuner cache`"
            )
        return {
            "latents_mean": latents["mean"],
            "latents_std": latents["std"],
            "cond_mean": cond["mean"] if cond else None,
            "cond_std": cond["std"] if cond else None,
            "text_embeds": text["embeds"],
            "text_mask": text["mask"],
            "sample_id": sample.sample_id,
            "dataset_id": sample.dataset_id,
            "caption": sample.caption,
            "bucket": sample.bucket,
            "media_path": sample.media_path,
            "cond_media_path": sample.cond_media_path,
        }

    def group_keys(self) -> list[tuple[int, int, int, bool]]:
        """Per item: (frames, height, width, has start frame); the batch sampler groups by it."""
        return [s.group_key for s in self.samples]

    def repeats(self) -> list[int]:
        return [s.repeats for s in self.samples]

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [512, C], mask [512]) of the empty prompt: caption dropout and CFG negatives."""
        entry = _load(self.empty_text_path, "<empty prompt>")
        return entry["embeds"], entry["mask"]


def collate_samples(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a same-bucket batch: tensors get a batch dimension, metadata become lists."""
    if not items:
        raise DataError("empty batch")
    keys = {item["bucket"] for item in items}
    if len(keys) > 1:
        raise DataError(f"a batch mixes buckets {sorted(keys)}; use BucketBatchSampler")
    batch: dict[str, Any] = {}
    for name in ("latents_mean", "latents_std", "text_embeds", "text_mask"):
        batch[name] = torch.stack([item[name] for item in items])
    has_cond = [item["cond_mean"] is not None for item in items]
    if any(has_cond) and not all(has_cond):
        raise DataError("a batch mixes items with and without start frames; group by CachedVideoDataset.group_keys()")
    for name in ("cond_mean", "cond_std"):
        batch[name] = torch.stack([item[name] for item in items]) if all(has_cond) else None
    for name in ("sample_id", "dataset_id", "caption", "bucket", "media_path", "cond_media_path"):
        batch[name] = [item[name] for item in items]
    return batch

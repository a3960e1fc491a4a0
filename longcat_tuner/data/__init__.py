"""The data pipeline: scan and pair media, bucket, build latent/text caches, read them for training.

Names are imported lazily so that `longcat_tuner.data.backends` (used by `check` and the web UI) does
not import torch.
"""
from __future__ import annotations

from longcat_tuner.lazy import lazy_getattr

_EXPORTS = {
    "build_caches": "longcat_tuner.data.cache",
    "cache_plan": "longcat_tuner.data.cache",
    "CacheIndex": "longcat_tuner.data.cache",
    "CachedSample": "longcat_tuner.data.cache",
    "CachedVideoDataset": "longcat_tuner.data.dataset",
    "collate_samples": "longcat_tuner.data.dataset",
    "sample_posterior": "longcat_tuner.data.dataset",
    "BucketBatchSampler": "longcat_tuner.data.buckets",
    "Bucket": "longcat_tuner.data.buckets",
    "bucket_size": "longcat_tuner.data.buckets",
    "plan_data": "longcat_tuner.data.backends",
    "DataPlan": "longcat_tuner.data.backends",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)

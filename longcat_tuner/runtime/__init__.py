"""What training and sampling apply to a loaded DiT: checkpointing modes, compile, block swap, base
precision, placement (`apply`), the settings as one value (`settings`) and their automatic choice from
the planner (`auto`). The model knows nothing of this; `train`, `sample`, validation and the benchmarks
all go through `longcat_tuner.runtime.apply`.

Names are imported lazily: `settings` and `auto` are torch-free (`plan`, `check`, the web UI use them).
"""
from __future__ import annotations

from longcat_tuner.lazy import lazy_getattr

_EXPORTS = {
    "MemorySettings": "longcat_tuner.runtime.settings",
    "AppliedRuntime": "longcat_tuner.runtime.apply",
    "apply_runtime": "longcat_tuner.runtime.apply",
    "load_device": "longcat_tuner.runtime.apply",
    "prepare_base_weights": "longcat_tuner.runtime.apply",
    "refuse_trained_base": "longcat_tuner.runtime.apply",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)

"""PyTorch's CUDA allocator setting for `train`, `sample` and `cache`: expandable segments unless the user chose.

With the default allocator a training step reserves up to 1.25x what it allocates (blocks of one size cached
where another size is wanted: 11 GiB of a 79 GiB H100 held but unallocated by the whole-card plan, and a
48 GiB cap reached by validation after training; bench/results/product-2026-12-06-h100*.jsonl). Expandable
segments map physical pages into one growing address range, so freed pages serve any size and the reserve
stays close to what is allocated. The commands turn it on before CUDA starts unless `PYTORCH_CUDA_ALLOC_CONF`
(or `PYTORCH_ALLOC_CONF`) is set: a user's own setting always wins, `expandable_segments:False` included.
The planner sizes plans with the reserve factor of the allocator actually in use (`expandable_segments`).

Torch-free: `plan` and `check` ask what `train` would use without importing torch.
"""
from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

ENV_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the older name and the device-generic one
DEFAULT_SETTING = "expandable_segments:True"


def user_setting(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """The allocator setting in the environment (the device-generic name wins, as in PyTorch), or None."""
    environ = os.environ if environ is None else environ
    for key in reversed(ENV_KEYS):
        value = environ.get(key)
        if value is not None and value.strip():
            return value
    return None


def parse_expandable(setting: Optional[str]) -> bool:
    """Whether an allocator setting string (`key:value,key:value`) turns expandable segments on."""
    enabled = False
    for part in (setting or "").split(","):
        key, _, value = part.partition(":")
        if key.strip() == "expandable_segments":
            enabled = value.strip().lower() == "true"
    return enabled


def would_use_expandable(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """What `train`/`sample` would run with in this environment: the user's setting, else expandable segments."""
    setting = user_setting(environ)
    return True if setting is None else parse_expandable(setting)


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def use_default_allocator(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Set expandable segments unless the user set the allocator; returns whether the run has them.

    Call it before anything touches CUDA: once CUDA has started (a Python caller that used the GPU first),
    the allocator keeps what it started with, so nothing is set and only the user's own setting counts."""
    environ = os.environ if environ is None else environ
    setting = user_setting(environ)
    if setting is not None:
        return parse_expandable(setting)
    if _cuda_started():
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = DEFAULT_SETTING
    return True


def expandable_in_use(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether this process's allocator runs expandable segments (as far as the environment tells)."""
    return parse_expandable(user_setting(environ))

"""Shared gloo CPU ranks for the multi-rank tests: one spawn of 4 ranks runs every job, once per session.

Starting ranks costs most of such a test on a small CPU (each process imports torch; FSDP2's first wrap imports
more), so `test_sequence_parallel.py`, `test_dcp_checkpoint.py` and `test_distributed_phases.py` register their jobs here and 4 ranks are
spawned once; groups of 2 inside them cover the 2-rank cases. A job is
`module.function(rank, world, root, argument) -> picklable result`; `results()` returns
`[{job name: result} for each rank]`.
"""
from __future__ import annotations

import atexit
import functools
import importlib
import shutil
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 4
JOBS = [("sp", "test_sequence_parallel", "sp_job", None), ("wrappers", "test_sequence_parallel", "wrapper_job", None),
        ("dcp", "test_dcp_checkpoint", "dcp_job", None), ("phases", "test_distributed_phases", "phases_job", None)]


@functools.lru_cache(maxsize=None)
def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="gloo-ranks-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _worker(rank: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    out = {}
    for name, module, function, argument in JOBS:
        out[name] = getattr(importlib.import_module(module), function)(rank, WORLD, Path(folder), argument)
        dist.barrier()
    torch.save(out, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def results() -> list[dict]:
    mp.spawn(_worker, args=(str(root()),), nprocs=WORLD, join=True)
    return [torch.load(root() / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

"""`/api/system/gpu`: GPU memory and utilisation for the page's indicator, read from `nvidia-smi`.

The server imports no torch (CUDA would claim memory on the card a run trains on): it runs
`nvidia-smi --query-gpu=... --format=csv,noheader,nounits` and parses its lines. No nvidia-smi, a
failing one or output it cannot read give `available: false` with the reason, which the page shows
as "no GPU".
"""
from __future__ import annotations

import subprocess
from typing import Any, Optional

from fastapi import APIRouter

from longcat_tuner.server.deps import StateDep

router = APIRouter()
GPU_QUERY = ("index", "name", "memory.used", "memory.total", "utilization.gpu")
NVIDIA_SMI_TIMEOUT_S = 5.0


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]" on some cards (MIG slices, vGPUs)
        return None


def parse_gpu_lines(output: str) -> list[dict[str, Any]]:
    """`0, NVIDIA H100 80GB HBM3, 1234, 81559, 97` per line -> one dict per GPU (memory in MiB)."""
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != len(GPU_QUERY):
            raise ValueError(f"expected {len(GPU_QUERY)} comma-separated values, got {line!r}")
        index, name, used, total, utilization = parts
        gpus.append({
            "index": int(index), "name": name, "memory_used_mib": _number(used),
            "memory_total_mib": _number(total), "utilization_pct": _number(utilization),
        })  # fmt: skip
    return gpus


def query_gpus(nvidia_smi: str) -> dict[str, Any]:
    """`{available, gpus, message}` from one `nvidia-smi` call."""
    command = [nvidia_smi, f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except FileNotFoundError:
        return {"available": False, "gpus": [], "message": f"no GPU: {nvidia_smi} is not installed (no NVIDIA driver)"}
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"available": False, "gpus": [], "message": f"no GPU: {nvidia_smi} did not answer ({err})"}
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        return {"available": False, "gpus": [], "message": f"no GPU: {nvidia_smi} failed with code {result.returncode}"
                + (f" ({why[-1]})" if why else "")}  # fmt: skip
    try:
        gpus = parse_gpu_lines(result.stdout)
    except ValueError as err:
        return {"available": False, "gpus": [], "message": f"no GPU: cannot read the output of {nvidia_smi} ({err})"}
    if not gpus:
        return {"available": False, "gpus": [], "message": f"no GPU: {nvidia_smi} lists none"}
    return {"available": True, "gpus": gpus, "message": None}


@router.get("/api/system/gpu")
def gpu_status(state: StateDep) -> dict[str, Any]:
    """Memory used / total (MiB) and utilisation (%) of each GPU, or `available: false` and why."""
    return query_gpus(state.settings.nvidia_smi)

"""Multi-process training through `torchrun`: process group, per-rank seeds, DDP, and agreement.

`torchrun --nproc_per_node=N -m longcat_tuner.cli train --config ...` starts N copies of the trainer
with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` set. `init_distributed`
reads them and joins the process group: NCCL on CUDA (`LOCAL_RANK` picks the GPU), gloo on CPU.
Without those variables (or with `WORLD_SIZE=1`) it returns a single-process `Distributed` whose
collectives are no-ops, so the trainer runs exactly as it always has.

Besides the default group (NCCL on CUDA: DDP's gradient all-reduce), a gloo group with a long timeout
carries the small CPU-side agreements: "is any rank stopping?", the mean loss, the resume path, every
rank's RNG state for the checkpoint, and "rank 0 has finished the caches". Long waits happen there
(rank 0 caching a dataset or running validation while the others wait), so they never trip NCCL's
watchdog, and a wait for a stop flag costs no GPU synchronisation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from longcat_tuner.errors import CheckpointError, ConfigError

# How long ranks wait for each other on the CPU group: rank 0 alone builds the caches (can take hours
# for a large dataset) and runs validation while the others wait for its next agreement.
COORDINATION_TIMEOUT = datetime.timedelta(hours=12)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass
class Distributed:
    """Where this process sits in the run; `world_size == 1` means no process group at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    cpu_group: Any = None  # gloo group for agreements (None when single-process)
    owns_group: bool = False  # this object created the default group and destroys it in `close`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- agreements (no-ops when single-process) ---------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            # monitored_barrier (gloo only) takes its own timeout and names a rank that never arrived.
            dist.monitored_barrier(group=self.cpu_group, timeout=COORDINATION_TIMEOUT, wait_all_ranks=True)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one (e.g. a SIGTERM that reached one rank)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(value.item() > 0)

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks (NaN on any rank makes it NaN everywhere)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.cpu_group)
        return float(tensor.item() / self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.cpu_group)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others do (e.g. caches: built once, then only read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    @contextlib.contextmanager
    def in_turns(self, ranks_at_once: int) -> Iterator[None]:
        """Run the block on `ranks_at_once` ranks at a time, in rank order; the rest wait their turn.

        Every rank passes the same number of barriers (one per turn), before and after its own turn, so
        the turns line up, also when the block raises on some rank (it still finishes its barriers).
        `ranks_at_once` must be equal on every rank (take it from `broadcast`).
        """
        if not self.enabled or ranks_at_once >= self.world_size:
            yield
            return
        ranks_at_once = max(1, ranks_at_once)
        turns = -(-self.world_size // ranks_at_once)
        mine = self.rank // ranks_at_once
        for _ in range(mine):
            self.barrier()
        try:
            yield
        finally:
            for _ in range(turns - mine):
                self.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def launched_by_torchrun(environ: Optional[dict[str, str]] = None) -> bool:
    environ = os.environ if environ is None else environ
    return all(key in environ for key in _ENV_KEYS) and int(environ["WORLD_SIZE"]) > 1


def init_distributed(environ: Optional[dict[str, str]] = None) -> Distributed:
    """Join the torchrun process group, or return the single-process context when not launched by it."""
    environ = dict(os.environ if environ is None else environ)
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun(environ):
        return Distributed(device=torch.device("cuda" if cuda else "cpu"))
    rank, world_size, local_rank = (int(environ[key]) for key in _ENV_KEYS)
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "lower --nproc_per_node to the number of GPUs (or fix CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before NCCL starts, so each rank talks from its own GPU
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        kwargs = {"device_id": device} if cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ConfigError(
            f"an existing process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but the environment says rank {rank} of {world_size}"
        )
    cpu_group = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       cpu_group=cpu_group, owns_group=owns)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s noise/sigma stream: `seed` itself on rank 0 (as a single-process run)."""
    if rank == 0:
        return seed
    # A large odd multiplier spreads ranks far apart in seed space; different seeds give independent
    # Philox/MT streams in torch, so the ranks draw different noise for their different batches.
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63


def wrap_ddp(dit: torch.nn.Module, ctx: Distributed) -> torch.nn.Module:
    """DDP over the trainable parameters only (LoRA adapters, or every weight in a full fine-tune).

    Frozen weights are identical on every rank (loaded from the same files), so DDP is told to ignore
    them: it neither broadcasts 13.6B frozen weights at start nor touches quantized or host-streamed
    (block swap) storage. The trainable ones are broadcast from rank 0 at construction, so every rank
    starts from the same adapters, and their gradients are averaged in backward.
    """
    from torch.nn.parallel import DistributedDataParallel

    trainable = {name for name, p in dit.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError("nothing to train: no parameter requires grad (check model_type and lora_targets)")
    frozen = [name for name, p in dit.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in dit.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(dit, frozen)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Gradient checkpointing here is non-reentrant (memory.py), which DDP supports as is; every trainable
    # parameter takes part in each forward, so no unused-parameter search (it costs a graph walk per step).
    # Buffers are all ignored above, so DDP has none to broadcast before each forward.
    return DistributedDataParallel(dit, device_ids=device_ids, find_unused_parameters=False)


def wrap_fsdp(dit: torch.nn.Module) -> torch.nn.Module:
    """Shard the DiT with FSDP2 (`fully_shard`): each block is one unit, the embedders and final layer the root.

    Every parameter becomes a DTensor holding 1/N of it; a block's weights are gathered right before it runs
    (forward, and the checkpoint recompute in backward) and freed after, and gradients are reduce-scattered,
    so weights, gradients and optimizer states all take 1/N per GPU. LoRA adapters (float32 beside the
    bfloat16 block) belong to their block's unit: FSDP2 accepts mixed dtypes there as long as the trainable
    parameters share one. Returns `dit` itself, now sharded.
    """
    from torch.distributed.fsdp import fully_shard

    if not any(p.requires_grad for p in dit.parameters()):
        raise ConfigError("nothing to train: no parameter requires grad (check model_type and lora_targets)")
    for block in dit.blocks:
        fully_shard(block)
    fully_shard(dit)  # the default mesh: all ranks, on this rank's device
    return dit


def _gathered(named: Any, keep: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of `(name, tensor)` pairs, DTensors gathered one at a time (collective: every rank
    iterates the same names); only ranks with `keep` hold the result, the others get an empty dict."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in named:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
    return out


def full_trainable_state(dit: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """`{name: full tensor on the CPU}` of the trainable parameters (collective under FSDP); the peak is
    one full parameter on the GPU. Rank 0 passes `keep` and writes the result."""
    return _gathered(((n, p) for n, p in dit.named_parameters() if p.requires_grad), keep)


def full_model_state(dit: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """Every tensor of `dit.state_dict()` in full on the CPU (collective under FSDP; only `keep` ranks hold it)."""
    return _gathered(dit.state_dict().items(), keep)


def full_optimizer_state(dit: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, gathered in full (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(dit, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(dit: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Scatter full saved weights and optimizer state into a sharded model (collective).

    Rank 0 passes the full dicts, the other ranks empty ones: rank 0 broadcasts each tensor and every rank
    keeps its shard, so only one host holds the full checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(dit, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    set_optimizer_state_dict(dit, optimizer, optim_state_dict=optimizer_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


@contextlib.contextmanager
def adapters_from(dit: torch.nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, the LoRA adapters of a sharded `dit` hold the full weights in `full` (from
    `full_trainable_state`), so the LoRA writers, which read the adapters' tensors, see whole matrices.
    The shards come back after, before any forward. Local: no collective."""
    swapped = []
    try:
        for path, module in dit.named_modules():
            for adapter_name, adapter in getattr(module, "lora_adapters", {}).items():
                for name, param in list(adapter._parameters.items()):
                    key = f"{path}.lora_adapters.{adapter_name}.{name}".lstrip(".")
                    if key in full:
                        swapped.append((adapter, name, param))
                        adapter._parameters[name] = torch.nn.Parameter(full[key], requires_grad=False)
        yield
    finally:
        for adapter, name, param in swapped:
            adapter._parameters[name] = param


def check_resume_strategy(saved: str, current: str, source: Any) -> None:
    """A checkpoint's optimizer state is keyed by parameter index (ddp) or by name (fsdp): same strategy only."""
    if saved != current:
        raise CheckpointError(
            f"checkpoint {source} was saved with distributed_strategy '{saved}' but this run uses '{current}'; "
            f"resume with distributed_strategy '{saved}', or start a new run in a new output_dir"
        )


def check_resume_world_size(saved: Optional[int], ctx: Any, source: Any) -> None:
    """Exact resume needs the same number of ranks: each rank's batches and noise stream depend on it."""
    saved = 1 if saved is None else int(saved)
    if saved != ctx.world_size:
        raise CheckpointError(
            f"checkpoint {source} was saved by a run with {saved} process(es) but this run has {ctx.world_size}; "
            f"the data split and the per-rank noise streams depend on it, so the run cannot continue exactly. "
            f"Resume with the same count (torchrun --nproc_per_node={saved}"
            f"{'' if saved > 1 else ', or without torchrun'}), or start a new run in a new output_dir"
        )


def available_host_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes, None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ranks_per_host_assembly(model_bytes: int, available_bytes: Optional[int], world_size: int) -> int:
    """How many ranks may assemble the model in host memory at once (block swap / 8-bit weights).

    Each such rank holds a whole copy of the DiT in host RAM while it loads, quantizes and places it
    (27 GB in bf16), so eight ranks at once would want over 200 GB. Allow as many as fit in 80% of the
    available memory, at least one; one when the memory cannot be read.
    """
    if available_bytes is None or model_bytes <= 0:
        return 1
    return max(1, min(world_size, int(0.8 * available_bytes) // model_bytes))

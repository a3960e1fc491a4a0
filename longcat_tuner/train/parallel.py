"""How a training run is spread over processes: one strategy object the trainer calls, with no rank branches.

`parallel_strategy(config)` joins torchrun's process group (when launched by it) and returns one of

- `SingleProcess`: one process; every agreement is a no-op and this process writes everything;
- `DataParallel` (DDP): every rank holds the whole model, gradients are all-reduced in the last micro-batch's
  backward, rank 0 alone validates and writes;
- `FullySharded` (FSDP2): each rank holds 1/N of every weight, gradients are reduce-scattered, saving gathers
  the shards (collective), every rank takes part in validation (a sharded block needs all ranks to run)
  and rank 0 alone keeps and writes the files.

The strategy owns: wrapping the model (`wrap`), gradient sync (`gradient_sync`), the agreements between
ranks (`any`, `mean`, `gather`, `broadcast`, `barrier`, `decide`), how the data is dealt (`data_rank`,
`data_world_size`), gathering weights for a save (`full_state`, `write_checkpoint`), loading a checkpoint
into the model (`load`), who validates (`validate`) and who writes (`is_writer`, `decide`, `event_log`).
The low-level pieces (process group, DDP/FSDP wrappers, gathering) stay in `distributed.py`.

To extend it, subclass the nearest strategy: a sequence-parallel mesh overrides `wrap` (and `data_rank` /
`data_world_size`, so the ranks of one group draw the same batch and noise); sharded DCP checkpoints
override `write_checkpoint`, `load`, `loads_checkpoint_tensors` and `checkpoint_layout` (recorded in each
checkpoint and compared on resume). `parallel_strategy` picks the class from the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

from longcat_tuner.errors import CheckpointError, LongcatError
from longcat_tuner.train import distributed as dist_utils
from longcat_tuner.train.distributed import Distributed, init_distributed
from longcat_tuner.train.events import EventLog, SilentEventLog

T = TypeVar("T")


@dataclasses.dataclass
class FullState:
    """What a save writes, in full on the CPU: the trainable weights (or every weight of the model), the
    optimizer state. Only the writer holds them (the other ranks get empty dicts)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


class SingleProcess:
    """One process: the base strategy. Every agreement returns this process's own value."""

    distributed_strategy: Optional[str] = None  # the config value this strategy runs (None: one process)
    # What a checkpoint records as its layout: single-process and DDP checkpoints are the same (full tensors,
    # optimizer state by parameter index), so either resumes the other at the same world size.
    checkpoint_layout = "ddp"

    def __init__(self, dist: Optional[Distributed] = None) -> None:
        self.dist = dist or Distributed()

    # --- where this process sits ----------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def device(self) -> Optional[torch.device]:
        """The device of this rank (multi-process), None to let the trainer choose (single process)."""
        return self.dist.device if self.dist.enabled else None

    @property
    def data_rank(self) -> int:
        """Which share of each epoch's batches (and which noise stream) this rank takes: its rank here; ranks
        that split one sample between them (a sequence-parallel group) share one."""
        return self.dist.rank

    @property
    def data_world_size(self) -> int:
        """Into how many shares each epoch's batches are dealt."""
        return self.dist.world_size

    @property
    def is_writer(self) -> bool:
        """This process writes events, checkpoints, validation videos and the final weights."""
        return self.dist.is_main

    @property
    def validates(self) -> bool:
        """This process runs validation (and so needs its inputs: start frames, VAE, held-out batches)."""
        return self.is_writer

    @property
    def collective_backward(self) -> bool:
        """Backward exchanges gradients between ranks: every rank must run it, also on a non-finite loss."""
        return self.dist.enabled

    @property
    def cuda_rng_device(self) -> Optional[torch.device]:
        """The CUDA device whose RNG state a checkpoint keeps (a rank keeps its own GPU's only)."""
        return None

    # --- agreements -----------------------------------------------------------------------------------

    def any(self, flag: bool) -> bool:
        return self.dist.any(flag)

    def mean(self, value: float) -> float:
        return self.dist.mean(value)

    def gather(self, obj: Any) -> list[Any]:
        return self.dist.gather(obj)

    def broadcast(self, obj: Any) -> Any:
        return self.dist.broadcast(obj)

    def barrier(self) -> None:
        self.dist.barrier()

    def decide(self, decision: Callable[[], T], *, error: type[LongcatError] = LongcatError) -> T:
        """`decision()` run by the writer, its result (or its failure) on every rank: the writer raises its own
        exception, the others an `error` (the exception's own type when it is a `LongcatError`) with its message."""
        result, failure, kind = None, None, None
        if self.is_writer:
            try:
                result = decision()
            except Exception as err:
                failure = err
        outcome = self.broadcast((result, None, None) if failure is None else
                                 (None, str(failure), type(failure) if isinstance(failure, LongcatError) else error))
        if failure is not None:
            raise failure
        result, message, kind = outcome
        if message is not None:
            raise kind(message)
        return result

    def say(self, message: str, **kwargs: Any) -> None:
        """Print on the writer only (the others would repeat it)."""
        if self.is_writer:
            print(message, **kwargs)

    def writer_first(self) -> contextlib.AbstractContextManager:
        """The writer runs the block, then the others do (e.g. caches: built once, then only read)."""
        return self.dist.main_first()

    def in_turns(self, ranks_at_once: int) -> contextlib.AbstractContextManager:
        return self.dist.in_turns(ranks_at_once)

    def event_log(self, run_dir: Path, tensorboard_dir: Optional[Path] = None) -> EventLog:
        return EventLog(run_dir, tensorboard_dir=tensorboard_dir) if self.is_writer else SilentEventLog()

    def close(self) -> None:
        self.dist.close()

    # --- the model --------------------------------------------------------------------------------------

    def wrap(self, dit: torch.nn.Module) -> torch.nn.Module:
        """Before the optimizer is built: returns what the loss calls (`dit` itself, or its wrapper)."""
        return dit

    def gradient_sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: gradients are exchanged on the `last` one only."""
        return contextlib.nullcontext()

    def agree_problem(self, problem: Optional[str]) -> Optional[str]:
        """A problem found in this rank's weights, made every rank's (ranks hold equal weights here)."""
        return problem

    def rng_for_checkpoint(self, rng: dict[str, Any]) -> dict[str, Any]:
        return rng

    def rng_from_checkpoint(self, saved: dict[str, Any]) -> dict[str, Any]:
        return saved

    @contextlib.contextmanager
    def full_state(self, dit: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                   whole_model: bool = False) -> Iterator[FullState]:
        """The weights to save (trainable ones, or with `whole_model` every tensor of the DiT) and the optimizer
        state, in full; within the block the writer's LoRA adapters read as whole matrices (the LoRA writers
        read them there). Collective under FSDP: every rank enters it."""
        if whole_model:
            weights = dit.state_dict()
        else:
            weights = {name: p for name, p in dit.named_parameters() if p.requires_grad}
        yield FullState(weights=weights, optimizer=optimizer.state_dict() if optimizer is not None else {})

    def write_checkpoint(self, dit: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         write: Callable[[FullState], T]) -> T:
        """How a checkpoint's tensors reach the disk: gathered in full (`full_state`), `write(state)` run by the
        writer, its result (or failure) on every rank. A sharded-checkpoint strategy (DCP) overrides this."""
        with self.full_state(dit, optimizer) as state:
            return self.decide(lambda: write(state), error=CheckpointError)

    @property
    def loads_checkpoint_tensors(self) -> bool:
        """This rank reads a checkpoint's tensors (under FSDP only the writer does, then scatters them)."""
        return True

    def load(self, dit: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], source: Path,
             check: Callable[[], None]) -> None:
        """Put a checkpoint's weights and optimizer state into the model; `check()` (names, finite values)
        runs first where the tensors are, and its `CheckpointError` reaches every rank."""
        from longcat_tuner.train import checkpoint as ckpt

        check()
        ckpt.apply_weights(dit, state["weights"], source=source)
        optimizer.load_state_dict(state["optimizer"])

    # --- validation -------------------------------------------------------------------------------------

    def validate(self, run_validation: Callable[[Path], T], run_dir: Path, *, default: T) -> T:
        """`run_validation(folder)` on the ranks that validate; the writer's result, `default` elsewhere."""
        if not self.validates:
            return default  # the others go on to the next agreement and wait there
        if self.is_writer:
            return run_validation(run_dir)
        with tempfile.TemporaryDirectory() as scratch:  # a sampling rank that keeps no files
            run_validation(Path(scratch))
        return default

    def stop_validation(self, requested: bool) -> bool:
        """Whether the validation under way stops now (checked at each denoising step): the validating
        ranks must agree, as each step may be collective."""
        return requested


class DataParallel(SingleProcess):
    """DDP: replicas of the trainable weights on every rank, gradients all-reduced; rank 0 validates and writes."""

    distributed_strategy = "ddp"

    @property
    def cuda_rng_device(self) -> Optional[torch.device]:
        return self.dist.device if self.dist.device.type == "cuda" else None

    def wrap(self, dit: torch.nn.Module) -> torch.nn.Module:
        return dist_utils.wrap_ddp(dit, self.dist)

    def gradient_sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else model.no_sync()  # all-reduce in the last backward only

    def rng_for_checkpoint(self, rng: dict[str, Any]) -> dict[str, Any]:
        # Rank 0's state at the top level (what a single-process resume reads), every rank's under "ranks".
        ranks = self.gather(rng)
        return {**ranks[0], "ranks": ranks}

    def rng_from_checkpoint(self, saved: dict[str, Any]) -> dict[str, Any]:
        return saved["ranks"][self.rank]


class FullySharded(DataParallel):
    """FSDP2: every weight sharded over the ranks; saves gather (collective), every rank validates."""

    distributed_strategy = "fsdp"
    checkpoint_layout = "fsdp"  # optimizer state keyed by parameter name

    @property
    def validates(self) -> bool:
        return True  # each sharded block needs every rank to gather its weights

    def wrap(self, dit: torch.nn.Module) -> torch.nn.Module:
        return dist_utils.wrap_fsdp(dit)

    def gradient_sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch
        return contextlib.nullcontext()

    def agree_problem(self, problem: Optional[str]) -> Optional[str]:
        if self.any(problem is not None):  # shards differ: any rank's problem is everyone's
            problem = next(p for p in self.gather(problem) if p)
        return problem

    @contextlib.contextmanager
    def full_state(self, dit: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                   whole_model: bool = False) -> Iterator[FullState]:
        gather = dist_utils.full_model_state if whole_model else dist_utils.full_trainable_state
        weights = gather(dit, keep=self.is_writer)
        optimizer_state = dist_utils.full_optimizer_state(dit, optimizer) if optimizer is not None else {}
        with dist_utils.adapters_from(dit, weights if self.is_writer else {}):
            yield FullState(weights=weights, optimizer=optimizer_state)

    @property
    def loads_checkpoint_tensors(self) -> bool:
        return self.is_writer

    def load(self, dit: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], source: Path,
             check: Callable[[], None]) -> None:
        self.decide(check, error=CheckpointError)  # the others hold no weights to check; they learn the verdict
        dist_utils.load_full_state(dit, optimizer, state["weights"], state["optimizer"])

    def stop_validation(self, requested: bool) -> bool:
        return self.any(requested)


def parallel_strategy(config: Any, environ: Optional[dict[str, str]] = None) -> SingleProcess:
    """The strategy for this process: single-process unless launched by torchrun, then
    `config.distributed_strategy` ("ddp" or "fsdp")."""
    dist = init_distributed(environ)
    if not dist.enabled:
        return SingleProcess(dist)
    return FullySharded(dist) if config.distributed_strategy == "fsdp" else DataParallel(dist)

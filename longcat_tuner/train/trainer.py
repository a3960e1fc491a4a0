"""`train(config)`: a short training loop that owns its state.

Setup (precision, data, model, optimizer, resume) happens in small helpers; `train` itself reads like
the recipe: take a micro-batch, compute the flow loss, accumulate, clip, step, then the "once in a while"
blocks for logging, checkpoints and validation; the last step writes the final checkpoint and weights,
then validates. Everything needed to resume exactly (weights, optimizer, LR schedule, step, data-sampler
position, RNG states) goes into each checkpoint. SIGINT/SIGTERM ask the loop to save a checkpoint at the
next step boundary and exit cleanly; during validation they stop it after the current denoising step.

Under `torchrun` each rank runs this same loop on its share of the batches with its own noise stream. All
that differs between one process, DDP and FSDP (wrapping, gradient sync, gathering for a save, loading,
who validates and who writes, the agreements between ranks) is the strategy object `run.parallel`
(`parallel.py`): the trainer has no rank branches.

Faults (see README "Reliability"): the run holds a lock on `output_dir` (`run_lock.py`); a checkpoint
that cannot be written (disk full) is reported and training goes on; the end writes the final
checkpoint and weights before it validates, and a failing validation is a warning; weights that turn
NaN/inf or explode stop the run (`failed`, naming the last finite checkpoint) and are never saved.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from longcat_tuner import runtime
from longcat_tuner.config.training import TrainConfig
from longcat_tuner.devices import default_dtype
from longcat_tuner.errors import CheckpointError, ConfigError, GPUMemoryError, LongcatError
from longcat_tuner.fsutil import atomic_file, is_write_error, write_failure
from longcat_tuner.model.inspect import WEIGHTS_NAME, require_intact_model
from longcat_tuner.generate import SamplingProgress
from longcat_tuner.runtime.allocator import expandable_in_use, use_default_allocator
from longcat_tuner.train import checkpoint as ckpt
from longcat_tuner.train import run_lock
from longcat_tuner.train.outputs import (
    STEP_DATA_KEYS, checkpoint_weights_problem, earlier_run_problem, resume_seed_warning, resume_settings_problem,
    set_aside_earlier_run,
)
from longcat_tuner.train.distributed import (
    available_host_memory,
    check_resume_strategy,
    check_resume_world_size,
    rank_seed,
    ranks_per_host_assembly,
)
from longcat_tuner.train.events import EventLog
from longcat_tuner.data.buckets import validation_size_problem
from longcat_tuner.train.feed import TrainingData, prepare_data
from longcat_tuner.train.optim import build_lr_scheduler, build_optimizer
from longcat_tuner.train.parallel import SingleProcess, parallel_strategy
from longcat_tuner.train.step import heldout_loss, training_loss
from longcat_tuner.train.validate import ValidationStopped, run_validation

LORA_FILE = "longcat_lora.safetensors"
MAX_NONFINITE_IN_A_ROW = 3
# A trainable weight this large has blown up (LongCat's weights are O(1); two such layers in a row reach
# 1e12 and bf16/fp32 overflow soon after): the run is stopped as diverged before it is saved.
MAX_WEIGHT_MAGNITUDE = 1e6


class TrainingDivergedError(LongcatError):
    """The loss or gradient stayed non-finite (NaN/inf) for several steps in a row, or the trainable
    weights became non-finite or exploded."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted" (a failed run raises instead)
    step: int
    lora_path: Optional[Path] = None
    comfyui_lora_path: Optional[Path] = None
    validation_videos: list[Path] = dataclasses.field(default_factory=list)
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    checkpoint_path: Optional[Path] = None  # the final checkpoint (completed) or the one the stop wrote
    warnings: list[str] = dataclasses.field(default_factory=list)  # e.g. a failed validation: outputs are there
    dit: Optional[torch.nn.Module] = None  # the trained model, for callers that keep working in-process


@dataclasses.dataclass(frozen=True)
class Precision:
    device: torch.device
    base_dtype: torch.dtype  # frozen base weights
    autocast_dtype: Optional[torch.dtype]  # None: plain fp32 math


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries and validation at each denoising
    step (handlers restored on exit). A second signal stops at once (`KeyboardInterrupt`), except within
    `shielded()` (a checkpoint or the final weights being written): there it waits for the write to finish."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}
        self._shielded = 0
        self._deferred = False

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        # os.write, not print: a handler that re-enters a buffered stream mid-write raises.
        if self.signal_name is not None:  # a second Ctrl-C/kill: stop now, the saved files stay
            if self._shielded:
                self._deferred = True
                os.write(2, b"\nfinishing the file being written, then stopping\n")
                return
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        os.write(2, f"\n{self.signal_name}: stopping after this step (or this denoising step of a validation), saving "
                    "a checkpoint, then exiting (again to stop at once)\n".encode())

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A second signal within the block waits for its end (a file being written is finished first)."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        if self._deferred and not self._shielded:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


# --- setup helpers --------------------------------------------------------------------------------------


def choose_precision(config: TrainConfig, device: Optional[torch.device] = None) -> Precision:
    """bf16 base + bf16 autocast on CUDA; fp32 everywhere on CPU (bf16 matmuls there are slow and lossy)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.model_type == "full":
        base = torch.float32  # trained weights keep fp32 master copies; autocast does the bf16 math
    elif config.base_model_precision == "fp32":
        base = torch.float32
    elif config.base_model_precision == "bf16":
        base = torch.bfloat16
    else:  # no_change, and the layers a quantized format leaves alone
        base = default_dtype(device)
    autocast = torch.bfloat16 if device.type == "cuda" and config.mixed_precision == "bf16" else None
    return Precision(device=device, base_dtype=base, autocast_dtype=autocast)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def assembles_on_host(config: TrainConfig, precision: Precision) -> bool:
    """With block swap or 8-bit weights the full bf16 model may not fit the GPU: it is loaded on the host,
    quantized and given adapters there, then all but the swapped blocks' frozen weights move."""
    return runtime.load_device(runtime.MemorySettings.from_config(config), precision.device).type != precision.device.type


def host_assembly_bytes(config: TrainConfig, precision: Precision) -> int:
    """Host memory one rank needs to assemble the DiT: its parameters in the base dtype."""
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import build_dit, find_component

    folder = find_component(config.pretrained_model_name_or_path, "dit")
    meta = build_dit(DiTConfig.from_file(folder / "config.json"), device="meta")
    return sum(p.numel() for p in meta.parameters()) * precision.base_dtype.itemsize


def largest_clip(data: TrainingData, batch_size: int) -> Optional[Any]:
    """The training micro-batch with the most tokens (the one that sets the peak), from the cached buckets."""
    from longcat_tuner.runtime.auto import ClipShape

    keys = set(data.dataset.group_keys())
    if not keys:
        return None
    frames, height, width, has_start = max(keys, key=lambda k: (k[0] * k[1] * k[2], k[3]))
    return ClipShape(frames=frames, height=height, width=width, batch=batch_size, has_start_frame=has_start)


def largest_validation(data: TrainingData, config: TrainConfig) -> Optional[Any]:
    """The validation video with the most pixels, batch 2 when CFG batches its two passes (None: no videos)."""
    from longcat_tuner.runtime.auto import ClipShape

    sizes = []
    for item in data.validation_items:
        if item.start_frame is not None:
            sizes.append((tuple(item.start_frame.shape[-2:]), True))
        elif item.size is not None:
            sizes.append((tuple(item.size), False))
    if not sizes:
        return None
    (height, width), has_start = max(sizes, key=lambda s: (s[0][0] * s[0][1], s[1]))
    height, width = (-(-side // 16) * 16 for side in (height, width))  # the token grid's size (sampling checks it)
    return ClipShape(frames=config.validation_num_video_frames, height=height, width=width,
                     batch=2 if config.validation_guidance > 1 else 1, has_start_frame=has_start)


def plan_memory(config: TrainConfig, data: TrainingData, precision: Precision, parallel: SingleProcess) -> Any:
    """The run's memory settings (`runtime.auto.choose_plan`) for this card, cap and largest bucket; on
    CUDA the cap is enforced with PyTorch's per-process memory fraction."""
    from importlib.util import find_spec

    from longcat_tuner.runtime.auto import choose_plan, is_calibrated, uses_block_sparse
    from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

    from longcat_tuner.runtime.apply import gpu_budget

    cuda = precision.device.type == "cuda"
    card_gib, others_gib = gpu_budget(precision.device, config.max_gpu_memory_gib) if cuda else (None, 0.0)
    dit_config = _dit_config(config)
    shape, triton = largest_clip(data, config.train_batch_size), find_spec("triton") is not None
    return choose_plan(
        config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS),
        shape=shape, cuda=cuda, card_gib=card_gib, others_gib=others_gib,
        compile_ok=triton, calibrated_model=is_calibrated(dit_config),
        distributed_strategy=parallel.distributed_strategy, validation=largest_validation(data, config),
        expandable_segments=cuda and expandable_in_use(),
        block_sparse=uses_block_sparse(config.attention_implementation, shape, enable_bsa=dit_config.enable_bsa,
                                       chunk=tuple(dit_config.bsa_chunk_k), triton=triton),
        bsa_sparsity=dit_config.bsa_sparsity,
    )


def build_model_in_turns(config: TrainConfig, precision: Precision, parallel: SingleProcess) -> tuple[torch.nn.Module, Any]:
    """`build_model_and_runtime` on every rank; host-side assembly runs on as many ranks at once as host memory allows
    (the writer measures it, every rank follows)."""
    ranks_at_once = parallel.world_size
    if parallel.world_size > 1 and assembles_on_host(config, precision):
        ranks_at_once = parallel.decide(lambda: _host_assembly_turns(config, precision, parallel.world_size))
    with parallel.in_turns(ranks_at_once):
        return build_model_and_runtime(config, precision)


def _host_assembly_turns(config: TrainConfig, precision: Precision, world_size: int) -> int:
    need, available = host_assembly_bytes(config, precision), available_host_memory()
    ranks_at_once = ranks_per_host_assembly(need, available, world_size)
    if ranks_at_once < world_size:
        free = "unknown" if available is None else f"{available / 2**30:.0f} GiB"
        print(f"assembling the DiT in host memory {ranks_at_once} rank(s) at a time "
              f"({need / 2**30:.1f} GiB each, {free} available)")
    return ranks_at_once


def build_model(config: TrainConfig, precision: Precision) -> torch.nn.Module:
    """Load the DiT, attach adapters (or unfreeze it for a full fine-tune), apply the memory settings
    through `runtime.apply_runtime`, the code path `sample` and the benchmarks share."""
    return build_model_and_runtime(config, precision)[0]


def build_model_and_runtime(config: TrainConfig, precision: Precision) -> tuple[torch.nn.Module, Any]:
    """`build_model`, and the `runtime.AppliedRuntime` (what a revised memory plan removes and applies anew)."""
    from longcat_tuner.model import load_dit

    if config.enable_group_offload:
        # diffusers' group offloading swaps parameter storage between devices, trainable adapters included,
        # which breaks their gradients (seen on an H100: "mat1 is on cuda:0 ... other tensors on cpu").
        raise ConfigError(
            "enable_group_offload is not available for training; set it to false and use musubi_blocks_to_swap "
            "(e.g. 8) to stream the frozen block weights from host memory instead"
        )
    settings = runtime.MemorySettings.from_config(config)
    if config.model_type == "full":
        runtime.refuse_trained_base(settings)  # before minutes of loading
    dit = load_dit(
        config.pretrained_model_name_or_path,
        dtype=precision.base_dtype,
        device=runtime.load_device(settings, precision.device),
        attention_backend=config.attention_implementation,
    )
    runtime.prepare_base_weights(dit, settings)  # before the adapters, so only frozen base weights are quantized
    if config.model_type == "lora":
        from longcat_tuner.model.lora import inject_lora

        # Adapters in fp32 over a (possibly bf16) base: small, and fp32 keeps AdamW updates exact.
        inject_lora(dit, rank=config.lora_rank, alpha=config.effective_lora_alpha, targets=config.lora_targets, dtype=torch.float32)
        if config.init_lora:
            from longcat_tuner.model.lora import init_lora_from_file

            init_lora_from_file(dit, config.init_lora)  # a resumed checkpoint's weights replace these later
    else:
        dit.requires_grad_(True)
    applied = runtime.apply_runtime(dit, settings, precision.device)
    return dit.train(), applied


def total_optimizer_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_train_steps is not None:
        return config.max_train_steps
    return max(1, math.ceil(config.num_train_epochs * batches_per_epoch / config.gradient_accumulation_steps))


def trainable_state(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in dit.named_parameters() if p.requires_grad}


DIT_WEIGHTS = WEIGHTS_NAME  # a full fine-tune's weights, in the hub's dit/ layout


def save_outputs(dit: torch.nn.Module, config: TrainConfig, run_dir: Path, metadata: dict[str, Any],
                 state: Optional[dict[str, torch.Tensor]] = None, *, weights_written: bool = False
                 ) -> tuple[Path, Optional[Path]]:
    """The final weights: one LoRA file per `lora_export_formats` entry (returned: the official file, else the
    first, and the ComfyUI-WanVideoWrapper file or None), or the full DiT (`state`: its gathered weights when
    it is sharded)."""
    if config.model_type == "lora":
        from longcat_tuner.model.lora import save_lora_formats

        written = save_lora_formats(dit, run_dir, config.lora_export_formats, metadata=metadata)
        return written.get("official", next(iter(written.values()))), written.get("comfyui-wanvideowrapper")
    import json

    from safetensors.torch import save_file

    folder = run_dir / "dit"
    if not weights_written:  # (a sharded model's were streamed into `folder` by every rank, `write_final_outputs`)
        state = {k: v.detach().cpu().contiguous() for k, v in (dit.state_dict() if state is None else state).items()}
        # Weights first, each file complete or absent: a folder with config.json is a loadable DiT.
        with atomic_file(folder / DIT_WEIGHTS) as temporary:
            save_file(state, str(temporary))
    with atomic_file(folder / "config.json") as temporary:
        temporary.write_text(json.dumps(dit.config.to_dict(), indent=2))
    # dit/ alone cannot sample (no text encoder, tokenizer, VAE): record the base they come from, so
    # `sample --model output_dir` (and the web preview) finds them there without copying anything.
    from longcat_tuner.model.sources import write_base_pointer

    write_base_pointer(run_dir, config.pretrained_model_name_or_path, dit=folder.name,
                       extra={"step": metadata.get("step"), "attention_implementation": metadata.get("attention_implementation")})
    return folder, None


# --- the loop -------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train as `config` says; returns where the outputs are. Raises `LongcatError` on user errors."""
    use_default_allocator()  # expandable segments unless the user set the allocator, before CUDA starts
    parallel = parallel_strategy(config)  # single-process unless launched by torchrun
    with claimed_output_dir(config, parallel) as events, reported_end(events):
        run = start_run(config, Path(config.output_dir), events, progress and parallel.is_writer, parallel)
        result = TrainResult(run_dir=run.run_dir, status="completed", step=run.step, dit=run.dit)
        if run.step >= run.total_steps:  # resumed at or past the end: say so instead of ending without a word
            parallel.say(f"nothing to train: the checkpoint is at step {run.step} and this run ends at step "
                         f"{run.total_steps} (max_train_steps / num_train_epochs); raise it (e.g. --max_train_steps "
                         f"{run.step + max(run.step, 1)}) to train further; its checkpoints and LoRA files are left as "
                         "they are.")
        bar = _progress_bar(run.progress, run.step, run.total_steps)
        batches = ReplayableBatches(run.data.batches())
        with StopRequest() as run.stop:
            # A signal may reach one rank only, or the ranks at different steps: they agree at every step
            # boundary, so all stop after the same step and none waits alone in a collective.
            while run.step < run.total_steps and not parallel.any(run.stop.requested):
                started = time.perf_counter()
                batches.start_step()
                noise_state = run.generator.get_state()
                try:
                    loss, grad_norm, skipped = optimizer_step(run, batches)
                except torch.OutOfMemoryError as err:  # a message with the settings and the fix, not a traceback
                    fallback = oom_fallback(run)
                    if fallback is None:
                        raise out_of_memory_error(run, err) from err
                    failure = _first_line(err)
                else:
                    fallback = None
                if fallback is not None:  # outside the handler: its traceback no longer holds the step's tensors
                    revise_memory_plan(run, result, fallback, failure)
                    batches.repeat_step()  # the same batches and noise again: the step as it would have run
                    run.generator.set_state(noise_state)
                    continue
                run.step += 1
                check_diverged(run, loss, grad_norm, skipped)
                # Once in a while: log, checkpoint, validate; the last step's checkpoint and final weights are
                # written before its validation, so a failing or interrupted validation loses nothing.
                log_step(run, result, bar, loss, grad_norm, skipped, seconds=time.perf_counter() - started)
                final = run.step == run.total_steps
                if final or _every(config.checkpoint_step_interval, run.step):
                    checkpoint(run, result)
                if final:
                    write_final_outputs(run, result)
                if final or _every(config.validation_step_interval, run.step):
                    validate_or_warn(run, result, final=final)
            if bar is not None:
                bar.close()
            return end_run(run, result)


@contextlib.contextmanager
def claimed_output_dir(config: TrainConfig, parallel: SingleProcess) -> Iterator[EventLog]:
    """The run's hold on `output_dir`, yielding its event log; on the way out (also on errors) the log is
    closed, the lock released and the process group left.

    The writer holds the folder's lock for the whole run, refuses an earlier run's outputs (with
    `overwrite_output_dir`, moves them into a `superseded-run-*` folder there) and removes stale checkpoint
    temporaries; a refusal stops every rank before anything is written there (the other run's events,
    checkpoints and temporaries stay untouched)."""
    run_dir = Path(config.output_dir)
    held: list[run_lock.RunLock] = []

    def claim() -> Optional[Path]:
        held.append(run_lock.acquire(run_dir))
        # Before the earlier-run check: a checkpoint left only as `.old-`/`.tmp-` is put back first, so it counts as
        # the earlier run's (a new run from step 0 would otherwise save over it and prune it).
        for restored in ckpt.remove_stale_temporaries(run_dir / "checkpoints"):
            print(f"{restored.name}: a save over it was interrupted between its two renames; the complete copy was "
                  f"put back as {restored}")
        refuse_finished_outputs(config, run_dir)
        if config.resume_from_checkpoint or not config.overwrite_output_dir:
            return None
        # Step 0 again: the earlier run is moved aside, so `latest`, the pruning and the events see this run only.
        return set_aside_earlier_run(run_dir)

    with contextlib.ExitStack() as stack:
        stack.callback(parallel.close)
        stack.callback(lambda: [lock.release() for lock in held])
        aside = parallel.decide(claim, error=ConfigError)  # the others list checkpoints only after the cleanup
        if aside is not None:
            parallel.say(f"overwrite_output_dir: this run starts from step 0; the earlier run's outputs (checkpoints, "
                         f"final weights, validation, events) were moved, untouched, to {aside}")
        tensorboard = run_dir / "tensorboard" if config.report_to == "tensorboard" else None
        events = parallel.event_log(run_dir, tensorboard_dir=tensorboard)
        stack.callback(events.close)
        yield events


@contextlib.contextmanager
def reported_end(events: EventLog) -> Iterator[None]:
    """An `end` event for a run that raises: failed, or interrupted by a signal outside the loop's handler
    (cache stage, loading) or by a second one (the files saved before stay)."""
    try:
        yield
    except KeyboardInterrupt:
        events.emit("end", status="interrupted", step=None, lora_path=None)
        raise
    except Exception as err:
        message = str(err) if isinstance(err, LongcatError) else f"{type(err).__name__}: {err}"
        events.emit("error", message=message)
        events.emit("end", status="failed", step=None, lora_path=None)
        raise


def refuse_finished_outputs(config: TrainConfig, run_dir: Path) -> None:
    """A new run (no resume) into an output_dir holding checkpoints or final weights is refused, naming the
    ways on, unless `overwrite_output_dir` says to start from step 0 there anyway (`check` reports the same)."""
    problem = earlier_run_problem(run_dir, resume_from_checkpoint=config.resume_from_checkpoint,
                                  overwrite_output_dir=config.overwrite_output_dir)
    if problem:
        raise ConfigError(problem)


@dataclasses.dataclass
class Run:
    """The state a run owns; everything needed to resume it goes into each checkpoint."""

    config: TrainConfig
    run_dir: Path
    precision: Precision
    data: TrainingData
    dit: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator  # sigmas, noise, posterior samples, caption dropout
    events: EventLog
    total_steps: int
    step: int = 0
    parallel: SingleProcess = dataclasses.field(default_factory=SingleProcess)
    model: Optional[torch.nn.Module] = None  # what the loss calls: the DDP wrapper of `dit`, or `dit` itself
    progress: bool = False  # console bars (the writer's)
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)  # installed by the loop
    gradients_checked: bool = False  # multi-GPU: every trainable parameter got a gradient (first step)
    saved_at: Optional[int] = None  # the newest step with a checkpoint
    nonfinite_in_a_row: int = 0
    seconds_avg: Optional[float] = None  # smoothed s/step for the ETA
    memory: Optional["MemoryPeaks"] = None  # the run's peak GPU memory (set from the device)
    plan: Any = None  # runtime.auto.Plan: the memory settings in use and who chose each
    applied: Any = None  # runtime.AppliedRuntime of those settings on `dit`
    updating: bool = False  # inside the optimizer's update

    def __post_init__(self) -> None:
        self.model = self.model or self.dit
        self.memory = self.memory or MemoryPeaks(self.precision.device)

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def start_run(config: TrainConfig, run_dir: Path, events: EventLog, progress: bool,
              parallel: Optional[SingleProcess] = None) -> Run:
    """Precision, caches, model, optimizer, schedule; then the saved state when resuming."""
    parallel = parallel or SingleProcess()
    # The writer picks the checkpoint, so every rank resumes from the same one; a world-size mismatch is
    # reported now, before minutes of caching and model loading.
    resume_path = parallel.decide(lambda: ckpt.resolve_resume_path(config.resume_from_checkpoint, run_dir / "checkpoints"),
                                  error=CheckpointError)
    if resume_path is not None:  # train_batch_size or gradient_accumulation_steps changed since: before caching
        parallel.decide(lambda: _refuse(resume_settings_problem(resume_path, config)), error=ConfigError)
    saved_world_size = ckpt.saved_world_size(resume_path) if resume_path is not None else None
    if saved_world_size is not None and not ckpt.is_sharded_checkpoint(resume_path):  # sharded ones reshard
        check_resume_world_size(saved_world_size, parallel, resume_path)
    # A damaged config or tokenizer file is named as `check` names it, not met by a loader as a traceback.
    parallel.decide(lambda: require_intact_model(config.pretrained_model_name_or_path), error=CheckpointError)
    # A lora_rank wider than an adapted layer, or a fixed validation_resolution the DiT's patch cannot take, refused as
    # `check` refuses them (the same functions), before minutes of caching and model loading.
    parallel.decide(lambda: _refuse(model_settings_problem(config)), error=ConfigError)
    if config.init_lora:  # a missing or broken file is named now, before minutes of caching and model loading
        from longcat_tuner.model.lora_formats import check_init_lora

        def read_init_lora() -> None:  # no tensors sent
            problem = checkpoint_weights_problem(config.init_lora)
            if problem:
                raise CheckpointError(f"init_lora: {problem}")
            # A LoRA for another model or size, or on layers without a trainable adapter: named as
            # `init_lora_from_file` names them, but before the caches are built and the model is loaded
            # (`check` reports the same, through the same function).
            check_init_lora(config.init_lora, config.lora_targets, config.pretrained_model_name_or_path,
                            config.lora_rank)

        parallel.decide(read_init_lora, error=CheckpointError)
    precision = choose_precision(config, parallel.device)
    seed_everything(config.seed)  # the same on every rank: adapters start identical
    data = prepare_data(config, device=precision.device, progress=progress, parallel=parallel)
    # The validation videos as sized from their start frames (a resolution class), before the model loads.
    parallel.decide(lambda: _refuse(validation_size_problem(
        config.validation_resolution, [(*validation_size(item), f"eval sample {item.name}" if item.start_frame is not None else None)
         for item in data.validation_items],
        _dit_config(config).patch_size)), error=ConfigError)
    plan = plan_memory(config, data, precision, parallel)  # before the model loads: a pinned key that cannot fit stops here
    config = config.model_copy(update=plan.settings.config_values())  # the snapshot in `start` holds what runs
    parallel.say(plan.summary())
    dit, applied = build_model_in_turns(config, precision, parallel)
    model = parallel.wrap(dit)  # before the optimizer: under FSDP it must hold the sharded parameters
    params = list(trainable_state(dit).values())
    optimizer = build_optimizer(
        params, kind=config.optimizer, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    total_steps = total_optimizer_steps(config, data.batches_per_epoch)
    scheduler = build_lr_scheduler(optimizer, name=config.lr_scheduler, warmup_steps=config.lr_warmup_steps, total_steps=total_steps)
    # Each rank draws its own sigmas/noise/posterior samples (its batches differ too); rank 0's stream
    # is the single-process one.
    generator = torch.Generator(device="cpu").manual_seed(rank_seed(config.seed, parallel.data_rank))
    run = Run(config, run_dir, precision, data, dit, params, optimizer, scheduler, generator, events, total_steps,
              parallel=parallel, model=model, progress=progress, plan=plan, applied=applied)
    if resume_path is not None:
        resume(run, resume_path)
        # Resumed from an earlier checkpoint than the newest: the later ones are kept, not saved over.
        aside = parallel.decide(lambda: ckpt.set_aside_newer_checkpoints(run.checkpoints_dir, run.step),
                                error=CheckpointError)
        if aside is not None:
            parallel.say(f"this run goes on from step {run.step}; the later checkpoints of the earlier training were "
                         f"moved, untouched, to {aside}")
    elif config.resume_from_checkpoint == "latest":
        parallel.say(f"no complete checkpoint in {run.checkpoints_dir} yet: starting at step 0")
    events.emit(
        "start", run_dir=str(run_dir), config=config.model_dump(mode="json"), total_steps=total_steps,
        pid=os.getpid(), resumed_from=str(resume_path) if resume_path else None, start_step=run.step,
        world_size=parallel.world_size,
    )
    events.emit("memory_plan", **plan.to_event())
    return run


def _refuse(problem: Optional[str]) -> None:
    if problem:
        raise ConfigError(problem)


def _dit_config(config: TrainConfig) -> Any:
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import find_component

    return DiTConfig.from_file(find_component(config.pretrained_model_name_or_path, "dit") / "config.json")


def model_settings_problem(config: TrainConfig) -> Optional[str]:
    """What `check` refuses about the settings against the model's dit/config.json (no weights read): a lora_rank
    above the narrowest adapted layer, a fixed validation_resolution that is not a multiple of the patch's pixels."""
    from longcat_tuner.config.resolution import parse_resolution
    from longcat_tuner.model.inspect import lora_rank_problem

    dit_config = _dit_config(config)
    if config.model_type == "lora":
        problem = lora_rank_problem(dit_config, config.lora_rank, config.lora_targets)
        if problem:
            return problem
    fixed = parse_resolution(config.validation_resolution)
    if isinstance(fixed, tuple) and (config.validation_using_datasets or config.validation_prompt):
        return validation_size_problem(config.validation_resolution, [(*fixed, None)], dit_config.patch_size)
    return None


def validation_size(item: Any) -> tuple[int, int]:
    """(height, width) of a validation item's video (`run_validation` sizes it the same way)."""
    if item.start_frame is not None:
        return int(item.start_frame.shape[1]), int(item.start_frame.shape[2])
    return item.size


def resume(run: Run, path: Path) -> None:
    """Weights, optimizer, schedule, sampler position, RNG and step from the checkpoint at `path`."""
    parallel = run.parallel
    state = ckpt.load_checkpoint(path, tensors=parallel.loads_checkpoint_tensors)
    if "sampler" not in state["state"]:  # before any weight is loaded
        raise CheckpointError(f"checkpoint {path}: its {ckpt.STATE_FILE} holds no data-sampler position (a training "
                              "run writes one); resume from another checkpoint, or 'latest'")
    saved_ranks = int(state["state"].get("world_size", 1))
    # A sharded (DCP) checkpoint is keyed by name and resharded on load: any strategy, any number of processes.
    resharded = state["sharded"] and saved_ranks != parallel.world_size
    if not resharded:
        check_resume_world_size(saved_ranks, parallel, path)
    if not state["sharded"]:
        check_resume_strategy(state["state"].get("distributed_strategy", "ddp"), parallel.checkpoint_layout, path)
    parallel.load(run.dit, run.optimizer, state, path, check=lambda: _require_finite_resume(state, path))
    run.scheduler.load_state_dict(state["scheduler"])
    sampler = state["state"]["sampler"]
    if resharded:  # the epoch goes on after the batches all ranks took, dealt over the new ranks
        sampler = ckpt.rescale_sampler_state(sampler, int(state["state"].get("data_world_size", saved_ranks)),
                                             parallel.data_world_size)
    seed_warning = resume_seed_warning(path, run.config)
    if seed_warning:  # the saved random state wins over a changed `seed` (`check` says the same)
        parallel.say(seed_warning, file=sys.stderr)
    run.data.sampler.load_state_dict(sampler)
    rng = state["rng"] if resharded else parallel.rng_from_checkpoint(state["rng"])
    ckpt.restore_rng_state(rng, {"train": run.generator}, cuda_device=parallel.cuda_rng_device)
    run.step = int(state["state"]["step"])
    if Path(path).resolve() == (run.checkpoints_dir / ckpt.checkpoint_name(run.step)).resolve():
        # This run's own checkpoint of this step: a stop before the next step has nothing new to save, and saving it
        # again would replace the folder just loaded (two renames: a kill between them leaves no `checkpoint-X`).
        run.saved_at = run.step
    if resharded:
        # The per-rank noise streams of the old ranks do not map onto the new ones: fresh ones, from the step.
        run.generator.manual_seed(rank_seed(run.config.seed + run.step, parallel.data_rank))
        parallel.say(f"resumed from {path} at step {run.step}, saved by {saved_ranks} process(es), now "
                     f"{parallel.world_size}: weights, optimizer, schedule and step exactly; the data order goes on "
                     "from the batches already taken, and each rank's noise stream starts afresh")
    else:
        parallel.say(f"resumed from {path} at step {run.step}")


def _require_finite_resume(state: dict[str, Any], path: Path) -> None:
    """A checkpoint with NaN/inf weights (written before this version refused them) cannot be resumed."""
    bad = ckpt.nonfinite_tensors(state["weights"]) + ckpt.nonfinite_tensors(state["optimizer"])
    if bad:
        earlier = ckpt.last_finite_checkpoint(Path(path).parent, before=int(state["state"]["step"]))
        where = (f"resume from {earlier} (--resume_from_checkpoint {earlier})" if earlier is not None
                 else "no earlier finite checkpoint exists there: start a new run")
        raise CheckpointError(
            f"checkpoint {path} holds NaN/inf values ({len(bad)} tensors, e.g. {bad[0]}); {where}, "
            "with a lower learning_rate"
        )


def optimizer_step(run: Run, batches: Iterator[list[int]]) -> tuple[float, float, bool]:
    """Accumulate micro-batches, clip, step. Returns (loss, grad norm, skipped: non-finite)."""
    config, parallel = run.config, run.parallel
    run.optimizer.zero_grad(set_to_none=True)
    losses = []
    for micro in range(config.gradient_accumulation_steps):
        batch = run.data.to_flow_batch(next(batches), generator=run.generator, caption_dropout=config.caption_dropout_probability)
        # Multi-GPU: gradients are exchanged in the last micro-batch's backward only.
        with parallel.gradient_sync(run.model, micro == config.gradient_accumulation_steps - 1):
            loss = training_loss(
                run.model, batch, generator=run.generator, shift=config.flow_schedule_shift,
                distribution=config.flow_sigma_distribution, continuation_latents=config.video_continuation_latents,
                autocast_dtype=run.precision.autocast_dtype,
            )
            losses.append(float(loss.detach()))
            # Multi-GPU: every rank must join the gradient exchange, so a non-finite loss is backpropagated
            # too; its NaN reaches every rank's averaged gradient and all ranks skip the step together.
            if math.isfinite(losses[-1]) or parallel.collective_backward:
                (loss / config.gradient_accumulation_steps).backward()  # the sum of scaled losses is the mean
    if parallel.collective_backward and not run.gradients_checked:  # once per process, on its first step
        _require_all_trainable_used(run)
        run.gradients_checked = True
    loss_value = parallel.mean(float(np.mean(losses)))  # the same value, and the same skip decision, on every rank
    grad_norm = float("nan")
    if math.isfinite(loss_value):
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)  # a NaN update would poison the weights: skip it
        return loss_value, grad_norm, True
    run.updating = True  # from here a failure may have changed weights: never retried (`oom_fallback`)
    run.optimizer.step()
    run.scheduler.step()
    run.updating = False
    return loss_value, grad_norm, False


def _require_all_trainable_used(run: Run) -> None:
    """DDP averages a gradient only once every trainable parameter has one; a parameter the forward never
    uses would leave its bucket un-averaged (ranks drift apart) and fail the next step deep inside DDP."""
    unused = [name for name, param in trainable_state(run.dit).items() if param.grad is None]
    if unused:
        raise ConfigError(
            f"{len(unused)} trainable parameter(s) got no gradient in the first step (e.g. {unused[0]}), which "
            "multi-GPU (DDP) training cannot average; narrow lora_targets to layers the DiT uses "
            "(the default targets do)"
        )


def weights_problem(params: list[torch.nn.Parameter]) -> Optional[str]:
    """What is wrong with the trainable weights (NaN/inf, or a magnitude beyond MAX_WEIGHT_MAGNITUDE), or
    None. One reduction per device and dtype, one host sync: cheap next to a training step."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for param in params:
        local = param.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # FSDP: this rank's shard
        if local.numel():
            groups.setdefault((local.device, local.dtype), []).append(local)
    if not groups:
        return None
    largest = max(float(torch.stack(torch._foreach_norm(group, float("inf"))).max()) for group in groups.values())
    if not math.isfinite(largest):
        return "non-finite (NaN/inf)"
    if largest > MAX_WEIGHT_MAGNITUDE:
        return f"exploded (largest |weight| {largest:.3g} > {MAX_WEIGHT_MAGNITUDE:g})"
    return None


def agreed_weights_problem(run: Run) -> Optional[str]:
    """`weights_problem` with every rank's verdict (FSDP shards differ; DDP replicas are equal)."""
    return run.parallel.agree_problem(weights_problem(run.params))


def check_diverged(run: Run, loss: float, grad_norm: float, skipped: bool) -> None:
    """Raise `TrainingDivergedError` after MAX_NONFINITE_IN_A_ROW skipped steps, or when an update left the
    weights NaN/inf (learning_rate inf) or exploded (1e30) with a finite loss: before such weights are
    checkpointed or become the final LoRA."""
    if skipped:
        run.nonfinite_in_a_row += 1
        run.events.emit("error", message=f"step {run.step}: non-finite loss {loss} or grad norm {grad_norm}; step skipped",
                        step=run.step)
        if run.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingDivergedError(
                f"loss or gradient was NaN/inf for {run.nonfinite_in_a_row} steps in a row (last at step {run.step}); "
                f"{resume_advice(run)}"
            )
        return
    run.nonfinite_in_a_row = 0
    problem = agreed_weights_problem(run)
    if problem is not None:
        raise TrainingDivergedError(
            f"the trainable weights are {problem} after step {run.step} (learning_rate "
            f"{run.scheduler.get_last_lr()[0]:g}); {resume_advice(run)}"
        )


def log_step(run: Run, result: TrainResult, bar: Any, loss: float, grad_norm: float, skipped: bool, *,
             seconds: float) -> None:
    """The step event, the console bar and the result's loss curve (s/step measures training only)."""
    run.seconds_avg = seconds if run.seconds_avg is None else 0.9 * run.seconds_avg + 0.1 * seconds
    result.losses[run.step] = loss
    run.events.emit(
        "step", step=run.step, total_steps=run.total_steps, loss=loss, lr=run.scheduler.get_last_lr()[0],
        s_per_step=seconds, eta_s=run.seconds_avg * (run.total_steps - run.step),
        **run.memory.read(), grad_norm=grad_norm, skipped=skipped,
    )
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", s_per_step=f"{seconds:.2f}")


def _every(interval: Optional[int], step: int) -> bool:
    return bool(interval) and step % interval == 0


def resume_advice(run: Run) -> str:
    """Where to resume a poisoned run from: the newest checkpoint with finite weights (never a newer,
    poisoned one; this run saves none of those)."""
    last = _last_good_checkpoint(run)
    if last is None:
        return (f"no finite checkpoint was saved in {run.checkpoints_dir}: start again with a lower learning_rate "
                f"(e.g. 10x lower), lr_warmup_steps > 0 and max_grad_norm 1.0{_HYPERPARAMETER_HINT}")
    return (f"the last finite checkpoint is {last}: resume from it (--resume_from_checkpoint {last}) with a lower "
            f"learning_rate, lr_warmup_steps > 0 and max_grad_norm 1.0{_HYPERPARAMETER_HINT}")


_HYPERPARAMETER_HINT = " (and check that lora_alpha and flow_schedule_shift are ordinary finite numbers)"


def checkpoint(run: Run, result: TrainResult) -> None:
    """`save` at this step unless it is saved already; keeps track of the newest step saved and its folder."""
    if run.saved_at == run.step:
        return
    with run.stop.shielded():
        path = save(run)
    if path is not None:
        run.saved_at, result.checkpoint_path = run.step, path


def save(run: Run) -> Optional[Path]:
    """A checkpoint at the current step; a failed save (disk full) is reported and training goes on.
    Weights that are non-finite or exploded are never saved (refused with an error event).

    Multi-GPU: every rank calls this (its RNG state goes in, FSDP gathers the shards), the writer writes,
    and every rank returns the writer's result so they all agree on whether the step is saved.
    """
    parallel = run.parallel
    problem = agreed_weights_problem(run)
    if problem is not None:
        message = f"refusing to save checkpoint for step {run.step}: the trainable weights are {problem}"
        run.events.emit("error", message=message, step=run.step)
        parallel.say(f"warning: {message}", file=sys.stderr)
        return None
    rng = parallel.rng_for_checkpoint(ckpt.capture_rng_state({"train": run.generator}, cuda_device=parallel.cuda_rng_device))
    try:
        return parallel.write_checkpoint(
            run.dit, run.optimizer, lambda state: _write_checkpoint(run, rng, state.weights, state.optimizer, state.sharded),
            checkpoints_dir=run.checkpoints_dir, step=run.step)
    except ckpt.ShardedSaveError as err:  # every rank learns it: older checkpoints stay, training goes on
        message = f"{err} Training goes on."
        run.events.emit("error", message=message, step=run.step)
        parallel.say(f"warning: {message}", file=sys.stderr)
        return None


def _write_checkpoint(run: Run, rng_state: dict[str, Any], weights: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any], sharded: Optional[Path] = None) -> Optional[Path]:
    extra = {}
    if run.config.model_type == "lora":
        from longcat_tuner.model.lora import save_lora

        extra[LORA_FILE] = lambda path: save_lora(run.dit, path, format="official")
    try:
        path = ckpt.save_checkpoint(
            run.checkpoints_dir, step=run.step, weights=weights, optimizer_state=optimizer_state,
            scheduler_state=run.scheduler.state_dict(), rng_state=rng_state, extra_files=extra, sharded=sharded,
            trainer_state={"sampler": run.data.sampler.state_dict(), "total_steps": run.total_steps,
                           **{key: getattr(run.config, key) for key in STEP_DATA_KEYS},
                           "world_size": run.parallel.world_size, "data_world_size": run.parallel.data_world_size,
                           "distributed_strategy": run.parallel.checkpoint_layout},
        )
    except LongcatError as err:  # older checkpoints stay intact; the next interval tries again
        message = f"{err} Training goes on."
        run.events.emit("error", message=message, step=run.step)
        print(f"warning: {message}", file=sys.stderr)
        return None
    ckpt.prune_checkpoints(run.checkpoints_dir, run.config.checkpoints_total_limit, keep=path)
    run.events.emit("checkpoint", step=run.step, path=str(path))
    return path


def _last_good_checkpoint(run: Run) -> Optional[Path]:
    """The newest finite checkpoint up to this step (the writer looks, every rank learns it)."""
    return run.parallel.decide(lambda: ckpt.last_finite_checkpoint(run.checkpoints_dir, before=run.step + 1))


def write_final_outputs(run: Run, result: TrainResult) -> None:
    """The final weights (`save_outputs`), with the checks of the end: finite weights only; a failed write
    (disk full) removes its partial files and raises a `CheckpointError` naming the last good checkpoint, on
    every rank; a final checkpoint that could not be written is an error too, once the weights are out."""
    config = run.config
    metadata = {"step": run.step, "lora_rank": config.lora_rank, "lora_alpha": config.effective_lora_alpha,
                "lora_targets": config.lora_targets, "base_model": str(config.pretrained_model_name_or_path),
                # `sample` defaults to the attention the LoRA was trained with.
                "attention_implementation": config.attention_implementation}
    problem = agreed_weights_problem(run)
    if problem is not None:
        raise TrainingDivergedError(f"refusing to write the final weights: they are {problem}; {resume_advice(run)}")
    whole_model = config.model_type == "full"
    if whole_model and run.parallel.streams_full_model:
        # FSDP2: every rank gathers one tensor at a time and the writer writes the hub's safetensors shards, so
        # no host ever holds the whole model; a failed write reaches every rank through `decide`.
        with run.stop.shielded():
            failure = None
            try:
                run.parallel.write_full_model(run.dit, run.run_dir / "dit", base_name=DIT_WEIGHTS)
            except Exception as err:  # the writer's disk; the gathers went on to the end on every rank
                failure = err
            result.lora_path, result.comfyui_lora_path = run.parallel.decide(
                lambda: _save_final(run, metadata, weights_failure=failure), error=CheckpointError)
    else:
        with run.stop.shielded(), run.parallel.full_state(run.dit, whole_model=whole_model) as state:
            result.lora_path, result.comfyui_lora_path = run.parallel.decide(
                lambda: _save_final(run, metadata, state=state.weights if whole_model else None), error=CheckpointError)
    if run.saved_at != run.step:  # the weights are out, but the run cannot be continued from its end
        raise CheckpointError(
            f"the final checkpoint (step {run.step}) could not be written (see the error above); the final weights "
            f"are {result.lora_path}, the last good checkpoint is {_last_good_checkpoint(run) or 'none'}. Free "
            f"space in {run.checkpoints_dir} and rerun with --resume_from_checkpoint latest to write it"
        )
    run.parallel.barrier()  # the final outputs exist before anyone validates or leaves


def _save_final(run: Run, metadata: dict[str, Any], state: Optional[dict[str, torch.Tensor]] = None,
                weights_failure: Optional[Exception] = None) -> tuple[Optional[Path], Optional[Path]]:
    """`weights_failure`: the weights were streamed by every rank (None: they are written; else why not)."""
    try:
        if weights_failure is not None:
            raise weights_failure
        return save_outputs(run.dit, run.config, run.run_dir, metadata, state=state,
                            weights_written=run.parallel.streams_full_model and run.config.model_type == "full")
    except Exception as err:
        for partial in run.run_dir.glob("*.safetensors.tmp*"):  # a LoRA file cut short
            partial.unlink(missing_ok=True)
        if not is_write_error(err):
            raise
        last = ckpt.last_finite_checkpoint(run.checkpoints_dir, before=run.step + 1)
        lora = run.config.model_type == "lora"
        kept = (f"the last good checkpoint {last} is kept" + (f" (its {LORA_FILE} is usable as is)" if lora else "")
                if last is not None else "no checkpoint was saved before")
        what = "LoRA" if lora else "weights"
        raise CheckpointError(
            f"could not write the final {what} in {run.run_dir}: {write_failure(err, run.run_dir)}; {kept}. Free space "
            "there (or set output_dir to a disk with room) and rerun with --resume_from_checkpoint latest to write them"
        ) from err


def validate(run: Run) -> list[Path]:
    """Validation videos, early-frame drift and the held-out loss (one `validation` event); returns the video
    paths (on the writer). A stop request ends it after the current denoising step (`ValidationStopped`,
    after the event for the videos finished before)."""

    def validation(out_root: Path) -> list[Path]:
        stopped = None
        with run.memory.phase() as phase:  # the allocator's cache is handed back before and after
            try:
                items, held = _validation_results(run, out_root)
            except ValidationStopped as err:
                stopped, items, held = err, err.items, None
        run.events.emit("validation", step=run.step, items=items, heldout_loss=held, **run.memory.read(),
                        **{f"validation_{key}": value for key, value in phase.items()},
                        **({"stopped": str(stopped)} if stopped else {}))
        overflowed = sum(item.get("finite") is False for item in items)
        if overflowed:
            run.parallel.say(f"warning: validation at step {run.step}: {overflowed} of {len(items)} video(s) sampled NaN/inf "
                             "latents (black or noise): the weights overflow; lower learning_rate and resume from an "
                             "earlier checkpoint", file=sys.stderr)
        if stopped:
            raise stopped
        return [out_root / item["video"] for item in items]

    return run.parallel.validate(validation, run.run_dir, default=[])


def _validation_results(run: Run, out_root: Path) -> tuple[list[dict[str, Any]], Optional[float]]:
    config, data = run.config, run.data
    items = []
    if data.validation_items:
        items = run_validation(
            run.dit, data.vae, data.validation_items, step=run.step, run_dir=out_root,
            num_frames=config.validation_num_video_frames, steps=config.validation_num_inference_steps,
            guidance=config.validation_guidance, shift=config.flow_schedule_shift,
            negative_embeds=data.negative_embeds, negative_mask=data.negative_mask,
            seed=config.validation_seed, device=run.precision.device,
            progress=lambda index, count: validation_progress(run, index, count),
        )
    held = None
    if data.heldout_batches:
        run.dit.eval()
        try:
            held = float(np.mean([
                heldout_loss(run.dit, batch, config.validation_loss_sigmas, seed=config.validation_seed,
                             continuation_latents=config.video_continuation_latents,
                             autocast_dtype=run.precision.autocast_dtype)
                for batch in data.heldout_batches
            ]))
        finally:
            run.dit.train()
    return items, held


def validation_progress(run: Run, index: int, count: int) -> SamplingProgress:
    """Video `index` of `count`: a `validation_progress` event per denoising step and for the decode, a
    console bar, and a stop (SIGINT/SIGTERM) after the current denoising step, agreed between the ranks
    that sample together."""

    def report(phase: str, denoise_step: int, of: int) -> None:
        run.events.emit("validation_progress", step=run.step, video=index + 1, videos=count, phase=phase,
                        denoise_step=denoise_step, of=of)

    return SamplingProgress(label=f"validation {index + 1}/{count}", bar=run.progress, report=report,
                            should_stop=lambda: run.parallel.stop_validation(run.stop.requested))


def validate_or_warn(run: Run, result: TrainResult, *, final: bool) -> None:
    """`validate`, where a failure (unwritable folder, out of memory, a resolution too large) is an error
    event and a warning of the run, not the end of it: training goes on, or (final) the outputs written
    before it stay the run's result. A stop request ends it early: a warning, then the loop stops (saving
    a checkpoint) or, after the final step, the run ends with its outputs written."""
    where = f"{'final ' if final else ''}validation at step {run.step}"
    try:
        result.validation_videos = validate(run)
    except ValidationStopped as err:
        message = f"{where} stopped ({run.stop.signal_name or 'stop requested'}): {err}"
        if final:
            message += f"; the final weights ({result.lora_path}) and checkpoint ({result.checkpoint_path}) are saved"
        result.warnings.append(message)
        run.parallel.say(message, file=sys.stderr)
    except Exception as err:
        message = f"{where} failed: {_validation_failure(run, err)}"
        if final:
            message += (f"; the final weights ({result.lora_path}) and checkpoint ({result.checkpoint_path}) are saved, "
                        "the run counts as completed; fix that and use `longcat-tuner sample` to see the result")
        else:
            message += "; training goes on"
        run.events.emit("error", message=message, step=run.step)
        result.warnings.append(message)
        run.parallel.say(f"warning: {message}", file=sys.stderr)
    if final:
        run.parallel.barrier()  # no rank leaves (and tears down the group) before the writer has validated


def _validation_failure(run: Run, err: Exception) -> str:
    if isinstance(err, torch.cuda.OutOfMemoryError) or isinstance(err, MemoryError) or "out of memory" in str(err):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"out of memory ({type(err).__name__}); lower validation_resolution, validation_num_video_frames "
                "or validation_max_samples")
    if is_write_error(err) and not isinstance(err, LongcatError):
        return f"{write_failure(err, run.run_dir / 'validation')}; free space there or make it writable"
    if isinstance(err, LongcatError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class ReplayableBatches:
    """The loop's batch iterator, able to give one step's batches again (a step retried under a revised plan)."""

    def __init__(self, batches: Iterator[list[int]]) -> None:
        self._batches = iter(batches)
        self._taken: list[list[int]] = []
        self._again: list[list[int]] = []

    def __iter__(self) -> "ReplayableBatches":
        return self

    def __next__(self) -> list[int]:
        batch = self._again.pop(0) if self._again else next(self._batches)
        self._taken.append(batch)
        return batch

    def start_step(self) -> None:
        self._taken = []

    def repeat_step(self) -> None:
        """The batches taken since `start_step` come again, in order, before any new one."""
        self._again = self._taken + self._again
        self._taken = []


def oom_fallback(run: Run) -> Optional[Any]:
    """The memory settings to retry a step with after it ran out of GPU memory, or None (the run stops with
    `out_of_memory_error`). Only the plan's own choice of blocks left out of checkpointing is undone (its
    memory is the planner's least measured term): every block is checkpointed again, as the plans measured
    on every card run. Not when you set that key, with swapped blocks (removing the runtime would bring
    them onto the GPU), with several processes (they would have to agree), or when the failure came inside
    the optimizer's update (some weights may have moved: a retry would move them twice)."""
    plan, applied = run.plan, run.applied
    if plan is None or applied is None or run.parallel.world_size != 1 or run.updating:
        return None
    settings = applied.settings
    if (not settings.uncheckpointed_blocks or settings.blocks_to_swap
            or plan.chosen_by.get("uncheckpointed_blocks") != "auto"):
        return None
    return dataclasses.replace(settings, uncheckpointed_blocks=0)


def revise_memory_plan(run: Run, result: TrainResult, settings: Any, failure: str) -> None:
    """Free what the failed step left, run the DiT under `settings` from now on, and say so (console, a
    second `memory_plan` event, the run's warnings)."""
    import gc

    run.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if run.precision.device.type == "cuda":
        torch.cuda.empty_cache()
    run.applied.remove()
    run.applied = runtime.apply_runtime(run.dit, settings, run.precision.device)
    before = run.plan.settings.uncheckpointed_blocks
    run.config = run.config.model_copy(update=settings.config_values())
    message = (f"step {run.step + 1} ran out of GPU memory ({failure}) with {before} block(s) left out of "
               f"checkpointing by the memory plan; retrying it with every block checkpointed "
               "(gradient_checkpointing_uncheckpointed_blocks 0; set that key in the config to choose yourself)")
    run.plan = dataclasses.replace(
        run.plan, settings=settings, reason=f"{run.plan.reason}; revised: {message}",
        predicted_step_s=None, predicted_peak_gib=None,
    )
    run.events.emit("memory_plan", **run.plan.to_event(), revised=True)
    result.warnings.append(message)
    run.parallel.say(f"warning: {message}", file=sys.stderr)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def out_of_memory_error(run: Run, err: BaseException) -> GPUMemoryError:
    """What a user reads when a training step runs out of GPU memory: the settings, what held the memory,
    and the keys that make room (the run resumes from its last checkpoint)."""
    from longcat_tuner.runtime.settings import MemorySettings

    device = run.precision.device
    held = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        mine = torch.cuda.memory_reserved(device)
        held = (f" This process held {mine / 2**30:.1f} GiB, other processes about "
                f"{max(0.0, (total - free - mine) / 2**30):.1f} GiB of the {total / 2**30:.0f} GiB card.")
    first_line = _first_line(err)
    return GPUMemoryError(
        f"step {run.step + 1} ran out of GPU memory ({first_line}) with {MemorySettings.from_config(run.config).describe()}."
        f"{held} Free the card of other work, or set max_gpu_memory_gib a few GiB below what is free so the memory "
        "plan leaves room, or set musubi_blocks_to_swap higher or gradient_checkpointing_mode offload_inputs "
        "(`longcat-tuner plan` lists settings that fit); then rerun with --resume_from_checkpoint latest "
        f"(last checkpoint: {ckpt.last_finite_checkpoint(run.checkpoints_dir, before=run.step + 1) or 'none yet'})."
    )


def end_run(run: Run, result: TrainResult) -> TrainResult:
    """The `end` event. Stopped before the last step: a checkpoint at this step (unless saved), status
    interrupted. Otherwise completed (the final outputs are written; a signal during the final validation
    only cut it short)."""
    result.step = run.step
    signal_name = next((name for name in run.parallel.gather(run.stop.signal_name) if name), None)
    if run.step < run.total_steps:
        checkpoint(run, result)
        if result.checkpoint_path is None and run.saved_at == run.step:  # stopped right after resuming: the one loaded
            result.checkpoint_path = run.checkpoints_dir / ckpt.checkpoint_name(run.step)
        result.status = "interrupted"
        run.events.emit("end", status="interrupted", step=run.step, lora_path=None, signal=signal_name)
        return result
    def text(path: Optional[Path]) -> Optional[str]:  # null, not the string "None", when there is none
        return None if path is None else str(path)

    run.events.emit("end", status="completed", step=run.step, lora_path=text(result.lora_path),
                    checkpoint=text(result.checkpoint_path), warnings=result.warnings,
                    **({"signal": signal_name} if signal_name else {}))
    return result


def _progress_bar(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


class MemoryPeaks:
    """The run's peak GPU memory (`peak_mem_gib`: tensors, `peak_reserved_gib`: the caching allocator), and
    the peaks of one phase on its own (`phase()`, used for validation). None off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.earlier = {"peak_mem_gib": 0.0, "peak_reserved_gib": 0.0}  # peaks before the last phase reset

    def _current(self) -> dict[str, float]:
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30}

    def read(self) -> dict[str, Optional[float]]:
        """The run's peaks so far."""
        if self.device.type != "cuda":
            return {key: None for key in self.earlier}
        return {key: max(value, self.earlier[key]) for key, value in self._current().items()}

    @contextlib.contextmanager
    def phase(self) -> Iterator[dict[str, Optional[float]]]:
        """Measure a phase from a clean allocator: cached blocks of the training step (activations of other
        sizes) are handed back first, so the phase's peak is its own and fits the cap; the yielded dict
        holds the phase's peaks afterwards. The cache is handed back again at the end, for the next step."""
        peaks: dict[str, Optional[float]] = {key: None for key in self.earlier}
        if self.device.type != "cuda":
            yield peaks
            return
        self.earlier = self.read()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield peaks
        finally:
            peaks.update(self._current())
            torch.cuda.empty_cache()

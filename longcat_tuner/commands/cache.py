"""`longcat-tuner cache`: build (or bring up to date) the VAE latent and text-embedding caches.

Only entries whose fingerprint changed are rebuilt; an interrupted build resumes where it stopped.
`train` runs the same step automatically.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from typing import Any, Iterator

from longcat_tuner.commands.argtypes import bounded_int
from longcat_tuner.commands.check import add_data_arguments, data_settings, format_summary
from longcat_tuner.errors import ConfigError


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the build as Ctrl-C does (`KeyboardInterrupt`: the CLI prints `interrupted`, exit 130, as
    `train` does for either signal); finished entries are kept either way. Without it a `kill` ended the process
    silently (exit 143). The previous handler is restored on exit."""
    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: signals stay with the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from longcat_tuner.runtime.allocator import use_default_allocator

    use_default_allocator()  # before CUDA starts (runtime/allocator.py)
    import torch

    from longcat_tuner.data.backends import plan_summary
    from longcat_tuner.data.cache import build_caches
    from longcat_tuner.devices import chosen_device, default_dtype

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.no_progress:
        from longcat_tuner.commands import quiet_library_progress

        quiet_library_progress()
    settings = data_settings(args)
    model_root = args.model or settings.model_root
    if model_root is None:
        raise ConfigError("give --config config/config.json (pretrained_model_name_or_path) or --model FOLDER")
    device = chosen_device(args.device)
    encoder_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.encoder_dtype] if args.encoder_dtype else default_dtype(device)
    index = build_caches(
        settings.data_backend_config,
        model_root=model_root,
        eval_dataset_id=settings.eval_dataset_id,
        alignment=settings.alignment,
        seed=settings.seed,
        device=device,
        encoder_dtype=encoder_dtype,
        progress=not args.no_progress,
        decode_workers=args.decode_workers,
    )
    print(format_summary(plan_summary(index.plan)))
    report = index.report
    for problem in report.failed:
        print(f"failed: {problem}")
    for problem in report.warnings:
        print(f"warning: {problem}")
    print(
        f"cache: built {report.built['clip']} clips, {report.built['start_frame']} start frames, "
        f"{report.built['text']} captions; reused {report.reused['clip']} / {report.reused['start_frame']} / "
        f"{report.reused['text']}; {len(report.failed)} failed; {report.seconds:.1f} s. "
        f"{len(index.train)} training and {len(index.eval)} eval samples ready."
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="build the latent and text-embedding caches", description=__doc__)
    add_data_arguments(parser)
    parser.add_argument("--model", help="checkpoint folder (overrides pretrained_model_name_or_path)")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--encoder_dtype", choices=["bf16", "fp32"], help="encoder precision (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--decode_workers", type=bounded_int(1, 64), default=2, help="clips decoded ahead of the VAE (threads)")
    parser.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)

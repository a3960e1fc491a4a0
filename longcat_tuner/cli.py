"""The `longcat-tuner` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module that exposes `register(subparsers)`; the module adds its
parser and sets `func` to a callable taking the parsed namespace and returning an exit code. Modules
are imported lazily so `longcat-tuner --help` stays fast and the server never imports torch.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from longcat_tuner.errors import LongcatError

# subcommand -> module that implements it (see each module's `register`).
COMMANDS: dict[str, str] = {
    "sample": "longcat_tuner.commands.sample",
    "check": "longcat_tuner.commands.check",
    "cache": "longcat_tuner.commands.cache",
    "train": "longcat_tuner.commands.train",
    "export-lora": "longcat_tuner.commands.export_lora",
    "server": "longcat_tuner.commands.server",
    "plan": "longcat_tuner.commands.plan",
    "demo": "longcat_tuner.commands.demo",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-tuner",
        description="Fine-tune LongCat-Video LoRAs (image-to-video first) and sample from them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # subcommand not shipped in this build
                continue
            raise
        module.register(subparsers)
    return parser


# Loggers of dependencies whose warnings say nothing a user can act on. diffusers imports bitsandbytes when
# it is installed (for adamw8bit), and on CPUs with AVX512-BF16 bitsandbytes then warns that an optional
# 4-bit CPU kernel package ("kernels") is missing: we never run 4-bit matmuls.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Import only the requested subcommand's module (keeps `server` free of torch).
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LongcatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from longcat_tuner.fsutil import NotRegularFileError

        if isinstance(err, NotRegularFileError):
            # An output path that exists as a device, pipe, socket or folder, met by a writer no command-level check
            # caught first: its message names the path and says to give a file name; a user error, not a traceback.
            print(f"error: {err}", file=sys.stderr)
            return 2
        # A path the file system refuses as too long (`OSError: [Errno 36]`) where no flag check caught it first
        # (a path inside config.json): one line, as other bad paths, not a traceback.
        if err.errno != errno.ENAMETOOLONG:
            raise
        from longcat_tuner.commands.argtypes import shown_path

        print(f"error: {shown_path(str(err.filename))} is too long for the file system; give a shorter path",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

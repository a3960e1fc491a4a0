"""`longcat-tuner export-lora IN OUT --format FORMAT`: convert a LoRA file to the layout a client loads.

Works on the tensors alone (no model needed) and reads every layout `load_lora` reads. The layouts and the
exact splitting/merging rules live in `longcat_tuner.model.lora_formats`; this module only parses arguments
(torch is imported when the command runs, so `longcat-tuner --help` stays light).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from longcat_tuner.commands.argtypes import refuse_long_path
from longcat_tuner.errors import ConfigError, LongcatError
from longcat_tuner.model.lora_names import LORA_FILE_FORMATS

CLIENTS = {
    "official": "LongCat-Video's own loader (dit.load_lora)",
    "comfyui-wanvideowrapper": "ComfyUI with kijai's ComfyUI-WanVideoWrapper",
    "wan2gp": "Wan2GP",
    "diffusers": "diffusers/PEFT (SimpleTuner's layout, alpha in the header)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora",
        help="convert a LoRA file to the layout of LongCat-Video, ComfyUI-WanVideoWrapper, Wan2GP or diffusers",
        description="Convert a LoRA file (any layout load_lora reads: official LongCat, ComfyUI-WanVideoWrapper/kijai, "
        "Wan2GP/kohya, diffusers/PEFT/SimpleTuner, DiffSynth-Studio, musubi-tuner, VideoX-Fun) to another layout. "
        "Every layer's delta weight is unchanged. Formats: "
        + "; ".join(f"{name}: {client}" for name, client in CLIENTS.items())
        + ". `comfyui` is accepted for comfyui-wanvideowrapper.",
    )
    parser.add_argument("input", type=Path, help="LoRA .safetensors file to convert")
    parser.add_argument("output", type=Path, help="where to write the converted file: a .safetensors name other than INPUT")
    parser.add_argument(
        "--format", choices=LORA_FILE_FORMATS + ("comfyui",), default="comfyui-wanvideowrapper",
        help="output layout (default: comfyui-wanvideowrapper)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists (without it an existing file is never replaced)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.model.lora_formats import resolve_format

    from longcat_tuner.fsutil import is_write_error, write_failure

    name = resolve_format(args.format)
    refuse_long_path("INPUT", args.input)  # one line naming the argument, not an OSError traceback
    refuse_long_path("OUTPUT", args.output)
    check_output(args.input, args.output, overwrite=args.overwrite, format=name)
    try:
        path = convert_lora_file(args.input, args.output, format=name)
    except Exception as err:  # the disk filled up: name the file and the cause (no partial file is left)
        if isinstance(err, LongcatError) or not is_write_error(err):
            raise
        raise ConfigError(f"cannot write {args.output}: {write_failure(err, args.output.parent)}") from None
    print(f"wrote {path} ({name} format, for {CLIENTS[name]})")
    return 0


def convert_lora_file(source: Path, target: Path, *, format: str) -> Path:
    """Convert `source` (any supported layout) to `format`; see `lora_formats.convert_lora_file`."""
    from longcat_tuner.model.lora_formats import convert_lora_file as convert
    from longcat_tuner.train.outputs import checkpoint_weights_problem

    problem = checkpoint_weights_problem(source)
    if problem:
        raise ConfigError(problem)
    return convert(source, target, format)


def same_file(source: Path, target: Path) -> bool:
    """True when `target` names `source` (after resolving links and `..`; a hard link counts too)."""
    try:
        if Path(source).exists() and Path(target).exists() and os.path.samefile(source, target):
            return True
        return Path(target).resolve() == Path(source).resolve()
    except OSError:
        return False


def check_output(source: Path, target: Path, *, overwrite: bool, format: str = "comfyui-wanvideowrapper") -> None:
    """Refuse an OUTPUT that is a folder, lies under a file or in a folder that cannot be written, is not a
    .safetensors name, is the input file itself (even with --overwrite: the input would be replaced by another
    layout under its own name), or is an existing file without --overwrite."""
    from longcat_tuner.fsutil import folder_problem

    suggestion = suggested_name(source, format)
    if target.is_dir():
        raise ConfigError(f"output {target} is a folder; give a file name, e.g. {target / suggestion}")
    if target.suffix.lower() != ".safetensors":
        try:
            example = target.with_suffix(".safetensors")
        except ValueError:  # no name to put a suffix on
            example = Path(suggestion)
        raise ConfigError(f"output {target} must end in .safetensors (the file is a safetensors LoRA), e.g. {example}")
    if same_file(source, target):
        raise ConfigError(f"output {target} is the input file; converting in place would replace it with the "
                          f"{format} layout under the same name: give another OUTPUT, e.g. "
                          f"{Path(source).with_name(suggestion)}")
    problem = folder_problem(target.parent, "the folder of OUTPUT", "the command line")
    if problem:
        raise ConfigError(problem)
    if target.exists() and not overwrite:
        raise ConfigError(f"output {target} already exists; choose another name, or pass --overwrite to replace it")


def suggested_name(source: Path, format: str) -> str:
    """An OUTPUT name for `source` in `format`, named as `train` names its files: `longcat_lora_comfyui.safetensors`
    for a run's `longcat_lora*.safetensors`, else `<name>_comfyui.safetensors` (`_wan2gp`, `_diffusers`; the official
    layout adds nothing); `_converted` is added where that would be the input's own name."""
    from longcat_tuner.model.lora_formats import FILE_NAMES

    base, extension = "longcat_lora", ".safetensors"
    tail = FILE_NAMES[format][len(base):-len(extension)]  # "_comfyui", "_wan2gp", "_diffusers", "" (official)
    name = Path(source).name
    stem = base if name in FILE_NAMES.values() else Path(source).stem
    suggestion = stem + tail + extension
    return stem + tail + "_converted" + extension if suggestion == name else suggestion

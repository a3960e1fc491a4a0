"""Cheap checks of a checkpoint folder in the official hub layout, without torch and without reading weights.

`longcat-tuner check` calls `inspect_model` so that a broken download is named before any cache or
training work starts: every component's config parses, the shard index lists files that exist, every
safetensors file is complete (its size equals the end of the last tensor its header describes), and the
DiT's tensor names and shapes are the ones `dit/config.json` implies. Only the JSON headers are read
(a few KB per file), so this takes milliseconds even for the 13.6B release.

safetensors layout: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`), then the tensor bytes;
offsets are relative to the end of the header, and the data must cover the rest of the file exactly.
"""
from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from longcat_tuner.errors import CheckpointError
from longcat_tuner.model.config import DiTConfig

PathLike = Union[str, Path]
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # dit/ and vae/
TEXT_WEIGHTS_NAME = "model.safetensors"  # text_encoder/ (transformers' name)
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too
_REDOWNLOAD = "the download or copy was interrupted or damaged: download it again"
# How a pickle starts: torch.save's zip archive, or a raw pickle (protocol 2+ opcode PROTO).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")

# Bytes per element of each safetensors dtype (sub-byte types are checked by offsets only).
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path


# --- component folders and weight files -------------------------------------------------------------
def find_component(path: PathLike, component: str, marker: str = "config.json") -> Path:
    """`path` may be the checkpoint root or the component folder itself; returns the component folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: point pretrained_model_name_or_path / --model at a LongCat-Video folder "
            f"in the official layout (dit/ text_encoder/ tokenizer/ vae/ scheduler/)"
        )
    if (path / component / marker).exists():
        return path / component
    if path.name == component and (path / marker).exists():
        return path
    raise CheckpointError(f"{path} has no {component}/{marker}: expected the official layout with a {component}/ folder")


DIT_CLASS_NAME = "LongCatVideoTransformer3DModel"  # `_class_name` of dit/config.json (the hub's and ours)


def config_class(folder: PathLike) -> Optional[str]:
    """What `folder/config.json` declares it configures: its `_class_name` (diffusers), else its `model_type`
    (transformers), else None (also when it cannot be read)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    declared = raw.get("_class_name") or raw.get("model_type")
    if declared is None and "caption_channels" in raw:
        return DIT_CLASS_NAME  # the DiT's own key (neither the VAE's nor the text encoder's config has it)
    return declared if isinstance(declared, str) else None


def find_dit(path: PathLike) -> Path:
    """The DiT folder of `path`: as `find_component(path, "dit")` finds it (a checkpoint root, a full fine-tune's
    output_dir, a folder named `dit`), or `path` itself when its config.json declares the LongCat-Video DiT
    (`config_class`: a DiT folder under another name; the VAE folder has a config.json and
    diffusion_pytorch_model.safetensors too, so the declared class is what tells them apart)."""
    folder = Path(path).expanduser()
    if not (folder / "dit" / "config.json").exists() and config_class(folder) == DIT_CLASS_NAME:
        return folder
    return find_component(folder, "dit")


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a `*.safetensors.index.json`."""
    try:
        payload = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index} is not a valid safetensors index (not JSON: {err}); {_REDOWNLOAD}") from None
    except OSError as err:
        raise CheckpointError(f"{index} cannot be read ({err})") from None
    weight_map = payload.get("weight_map") if isinstance(payload, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map' object); {_REDOWNLOAD}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(
                f"{index}: tensor {name!r} maps to {shard!r}, not a file name beside the index; {_REDOWNLOAD}"
            )
    return weight_map


def weight_files(folder: Path, base_name: str = WEIGHTS_NAME) -> list[Path]:
    """The safetensors files of a component: the index's shards (all must exist), or the single file."""
    folder = Path(folder)
    index = folder / f"{base_name}.index.json"
    if index.exists():
        files = [folder / name for name in sorted(set(read_index(index).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is missing shards listed in {index.name}: {', '.join(missing)}; download them again"
            )
        return files
    single = folder / base_name
    if single.exists():
        return [single]
    candidates = sorted(folder.glob("*.safetensors"))
    if candidates:
        return candidates
    raise CheckpointError(f"{folder} has no {base_name} (nor an index.json, nor any *.safetensors file)")


# --- safetensors headers ------------------------------------------------------------------------------
def read_safetensors_header(path: PathLike) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, from its header alone.

    Raises `CheckpointError` naming the file when it is truncated (shorter than the header says), has
    trailing bytes, or its header is not the safetensors format.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is {size} bytes, too short for a safetensors file (no header); {_REDOWNLOAD}"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                if prefix.startswith(_PICKLE_MAGIC):  # (a valid header length may start with these bytes too)
                    raise CheckpointError(
                        f"{path} is a PyTorch pickle (torch.save: .pt/.ckpt/.bin), not a safetensors file, whatever "
                        "its name; longcat-tuner never unpickles files (unpickling can run code). Use the "
                        ".safetensors release of it, or convert it yourself with a tool you trust"
                    )
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: its header length is {length} bytes but the "
                    f"file has {size} bytes; {_REDOWNLOAD}"
                )
            raw = handle.read(length)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a damaged safetensors header ({err}); {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a damaged safetensors header (not a JSON object); {_REDOWNLOAD}")
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_entry(path, name, entry)
        data_end = max(data_end, entry["data_offsets"][1])
    expected = 8 + length + data_end
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, but its header describes {expected} bytes "
            f"({expected - size} missing); {_REDOWNLOAD}"
        )
    if size > expected:
        raise CheckpointError(
            f"{path} has {size - expected} bytes after the last tensor its header describes (expected {expected} "
            f"bytes, found {size}); the file is damaged: download it again"
        )
    return tensors


def _tensor_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: header entry for tensor {name!r} {why}; {_REDOWNLOAD}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"has no dtype (got {dtype!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"has bad data_offsets {offsets!r}")
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise bad(
            f"spans {offsets[1] - offsets[0]} bytes but {dtype} {tuple(shape)} needs {math.prod(shape) * itemsize}"
        )
    return TensorInfo(dtype, tuple(shape), path)


def read_headers(files: Iterable[Path], folder: Path, base_name: str) -> dict[str, TensorInfo]:
    """Union of the headers of a component's files; a tensor in two files, or not where the index says, is an error."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise CheckpointError(
                    f"{folder}: tensor {name} is in both {tensors[name].file.name} and {file.name}; "
                    "the folder mixes two checkpoints: download it again into an empty folder"
                )
            tensors[name] = info
    index = folder / f"{base_name}.index.json"
    if index.exists():
        weight_map = read_index(index)
        wrong = [n for n, shard in weight_map.items() if n not in tensors or tensors[n].file.name != shard]
        if wrong:
            raise CheckpointError(
                f"{index}: {len(wrong)} tensor(s) are not in the shard the index names ({', '.join(wrong[:5])}"
                f"{' ...' if len(wrong) > 5 else ''}); {_REDOWNLOAD}"
            )
    return tensors


def verify_weight_files(folder: PathLike, base_name: str = WEIGHTS_NAME, *, required: bool = True) -> list[Path]:
    """`weight_files`, each checked complete by its header: call before loading, so a truncated file is named.

    `required=False`: a folder without any safetensors file (e.g. `.bin` weights) is left to its loader.
    """
    folder = Path(folder)
    if not required and not (folder / f"{base_name}.index.json").exists() and not any(folder.glob("*.safetensors")):
        return []
    files = weight_files(folder, base_name)
    read_headers(files, folder, base_name)
    return files


# --- configs ----------------------------------------------------------------------------------------
def read_json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the {what} needs it; download the checkpoint again")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {_REDOWNLOAD}") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a JSON object of settings; {_REDOWNLOAD}")
    return payload


def _positive_int(config: dict, key: str, path: Path) -> Optional[int]:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{path}: key '{key}' must be a positive whole number, got {value!r}; {_REDOWNLOAD}")
    return value


def _shape_mismatch(folder: Path, expected: dict[str, tuple[int, ...]], tensors: dict[str, TensorInfo], source: str) -> Optional[str]:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [n for n in sorted(set(expected) & set(tensors)) if tensors[n].shape != expected[n]]
    if not (missing or unexpected or wrong):
        return None

    def listed(names: list[str], describe=lambda n: n) -> str:
        return ", ".join(describe(n) for n in names[:6]) + (" ..." if len(names) > 6 else "")

    parts = []
    if wrong:
        parts.append(f"{len(wrong)} with other shapes ("
                     + listed(wrong, lambda n: f"{n} {tensors[n].shape} in {tensors[n].file.name}, expected {expected[n]}") + ")")
    if missing:
        parts.append(f"{len(missing)} missing ({listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({listed(unexpected)})")
    return (
        f"{folder}: the weights do not match {source}: {'; '.join(parts)}. The config and the weights do not belong "
        "together, or a shard is from another checkpoint: download the folder again"
    )


# --- the whole folder -------------------------------------------------------------------------------
@dataclass
class ModelReport:
    """What `inspect_model` found: `problems` stop training; `notes` describe each good component."""

    root: Path
    problems: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    dit_config: Optional[DiTConfig] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "problems": list(self.problems), "components": dict(self.notes)}


def _inspect_dit(root: Path, report: ModelReport, folder: Optional[Path] = None) -> None:
    folder = root / "dit" if folder is None else Path(folder)
    config = DiTConfig.from_file(folder / "config.json")
    report.dit_config = config
    files = weight_files(folder, WEIGHTS_NAME)
    tensors = read_headers(files, folder, WEIGHTS_NAME)
    mismatch = _shape_mismatch(folder, config.expected_shapes(), tensors, f"{folder / 'config.json'}")
    if mismatch:
        raise CheckpointError(mismatch)
    report.notes["dit"] = (
        f"{config.depth} blocks, hidden {config.hidden_size}, {len(tensors)} tensors in {len(files)} file(s)"
    )


def _inspect_text_encoder(root: Path, report: ModelReport) -> None:
    folder = root / "text_encoder"
    path = folder / "config.json"
    config = read_json_object(path, "text encoder")
    width = _positive_int(config, "d_model", path) or _positive_int(config, "hidden_size", path)
    vocab = _positive_int(config, "vocab_size", path)
    if width is None:
        raise CheckpointError(f"{path} has no 'd_model' (umT5 width); {_REDOWNLOAD}")
    files = weight_files(folder, TEXT_WEIGHTS_NAME)
    tensors = read_headers(files, folder, TEXT_WEIGHTS_NAME)
    embedding = tensors.get("shared.weight") or tensors.get("encoder.embed_tokens.weight")
    if embedding is not None and vocab is not None and embedding.shape != (vocab, width):
        raise CheckpointError(
            f"{embedding.file}: the token embedding is {embedding.shape}, {path.name} implies ({vocab}, {width}); "
            "the config and the weights do not belong together: download text_encoder/ again"
        )
    if report.dit_config is not None and width != report.dit_config.caption_channels:
        raise CheckpointError(
            f"{path} declares width {width}, but the DiT expects caption_channels={report.dit_config.caption_channels}: "
            "LongCat-Video uses umT5-XXL (d_model 4096); use the text encoder shipped with the checkpoint"
        )
    report.notes["text_encoder"] = f"{config.get('model_type', '?')} width {width}, {len(tensors)} tensors in {len(files)} file(s)"


def _inspect_vae(root: Path, report: ModelReport) -> None:
    folder = root / "vae"
    path = folder / "config.json"
    config = read_json_object(path, "VAE")
    z_dim = _positive_int(config, "z_dim", path)
    for key in ("latents_mean", "latents_std"):
        values = config.get(key)
        if (
            not isinstance(values, list)
            or (z_dim is not None and len(values) != z_dim)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        ):
            raise CheckpointError(
                f"{path}: key '{key}' must list {z_dim or 'z_dim'} finite numbers (got {str(values)[:60]}); {_REDOWNLOAD}"
            )
    if any(v <= 0 for v in config["latents_std"]):
        raise CheckpointError(f"{path}: key 'latents_std' holds a value <= 0; {_REDOWNLOAD}")
    files = weight_files(folder, WEIGHTS_NAME)
    tensors = read_headers(files, folder, WEIGHTS_NAME)
    quant = tensors.get("quant_conv.weight")
    if quant is not None and z_dim is not None and quant.shape[:1] != (2 * z_dim,):
        raise CheckpointError(
            f"{quant.file}: quant_conv.weight is {quant.shape}, {path.name} (z_dim {z_dim}) implies {2 * z_dim} "
            "output channels; the config and the weights do not belong together: download vae/ again"
        )
    report.notes["vae"] = f"z_dim {z_dim}, {len(tensors)} tensors in {len(files)} file(s)"


def _inspect_tokenizer(root: Path, report: ModelReport) -> None:
    folder = root / "tokenizer"
    read_json_object(folder / "tokenizer_config.json", "tokenizer")
    fast = folder / "tokenizer.json"
    if fast.is_file():
        data = read_json_object(fast, "tokenizer")
        if not isinstance(data.get("model"), dict) or not isinstance(data.get("added_tokens"), list):
            # transformers would stop on it with a bare KeyError ('added_tokens') while loading the encoder
            raise CheckpointError(f"{fast} is JSON but not a tokenizer (no 'model' object or 'added_tokens' list); "
                                  f"{_REDOWNLOAD}")
    elif not any((folder / name).is_file() for name in ("spiece.model", "tokenizer.model")):
        raise CheckpointError(f"{folder} has neither tokenizer.json nor spiece.model; download tokenizer/ again")
    report.notes["tokenizer"] = "ok"


def _inspect_scheduler(root: Path, report: ModelReport) -> None:
    path = root / "scheduler" / "scheduler_config.json"
    if path.exists():  # optional: the trainer uses its own flow-matching schedule
        read_json_object(path, "scheduler")
        report.notes["scheduler"] = "ok"


def adapted_linears(config: DiTConfig, targets: Iterable[str]) -> dict[str, tuple[int, int]]:
    """`{module path: (in, out)}` of the DiT's linear layers that `targets` (lora_targets) adapt, by the rule
    `inject_lora` applies (a path equal to a target or ending with `.` + target): block layers (`attn.qkv`), one
    block's (`blocks.3.attn.qkv`) and top-level ones (`final_layer.linear`) alike. Torch-free."""
    from longcat_tuner.model.lora_names import BLOCK_LINEARS, TOP_LINEARS, matching_target

    targets = tuple(targets)
    shapes = config.expected_shapes()
    paths = [f"blocks.{i}.{name}" for i in range(config.depth) for name in BLOCK_LINEARS] + list(TOP_LINEARS)
    found = {}
    for path in paths:
        if matching_target(path, targets) is not None:
            out_features, in_features = shapes[f"{path}.weight"]
            found[path] = (in_features, out_features)
    return found


def lora_rank_problem(config: DiTConfig, rank: int, targets: Iterable[str]) -> Optional[str]:
    """Why `rank` does not fit the adapted layers (rank above min(in, out) adds nothing), or None. `check` reports
    it and `train` refuses it before caching, both through this function."""
    from longcat_tuner.model.lora_names import matching_target

    narrowest: Optional[tuple[int, str, int, int]] = None
    targets = tuple(targets)
    for path, (in_features, out_features) in adapted_linears(config, targets).items():
        width = min(in_features, out_features)
        if narrowest is None or width < narrowest[0]:
            narrowest = (width, matching_target(path, targets), in_features, out_features)  # as lora_targets says it
    if narrowest is not None and rank > narrowest[0]:
        width, target, in_features, out_features = narrowest
        return (
            f"lora_rank {rank} is larger than the narrowest adapted layer ({target}: {in_features} in, {out_features} "
            f"out): a rank above min(in, out) = {width} adds no capacity; set lora_rank to at most {width}"
        )
    return None


def inspect_model(
    root: PathLike, *, lora_rank: Optional[int] = None, lora_targets: Optional[Iterable[str]] = None,
    dit: Optional[PathLike] = None,
) -> ModelReport:
    """Check a checkpoint folder cheaply (configs, shard index, safetensors headers, DiT shapes); never raises
    for a broken component: each problem is collected, naming the file and the fix. `dit`: a DiT folder used
    instead of `root/dit` (a full fine-tune's weights, `model/sources.py`): the text encoder is checked against it."""
    root = Path(root).expanduser()
    report = ModelReport(root)
    inspect_dit = functools.partial(_inspect_dit, folder=None if dit is None else Path(dit).expanduser())
    for inspect_component in (inspect_dit, _inspect_text_encoder, _inspect_vae, _inspect_tokenizer, _inspect_scheduler):
        try:
            inspect_component(root, report)
        except CheckpointError as err:
            report.problems.append(str(err))
    if report.dit_config is not None and lora_rank is not None and lora_targets is not None:
        problem = lora_rank_problem(report.dit_config, lora_rank, lora_targets)
        if problem:
            report.problems.append(problem)
    return report


def require_intact_model(root: PathLike, *, dit: Optional[PathLike] = None) -> None:
    """Raise `CheckpointError` naming every problem `inspect_model` finds (what `check` reports) before a loader
    meets it as a traceback (a config of the wrong type, a damaged tokenizer or scheduler file). Headers only.
    `dit`: the DiT folder to use instead of `root/dit` (see `inspect_model`)."""
    # A missing or wrong folder: the one sentence that says so, not one per component.
    find_component(root, "dit") if dit is None else find_dit(dit)
    report = inspect_model(root, dit=dit)
    if report.problems:
        raise CheckpointError("; ".join(report.problems))

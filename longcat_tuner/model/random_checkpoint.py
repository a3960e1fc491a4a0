"""Write a small random LongCat-Video checkpoint in the official hub layout.

Used by the demo, tests and benchmarks: `dit/` (our DiT, official key names), `text_encoder/` (a tiny umT5
encoder through transformers), `tokenizer/` (a character-level T5 fast tokenizer that appends `</s>` and pads
with id 0, like umT5's), `vae/` (diffusers' AutoencoderKLWan with the real latent mean/std) and `scheduler/`.
Nothing is downloaded. The loading code is the same one that reads the real 13.6B checkpoint.
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.loading import WEIGHTS_NAME, build_dit

LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]

SIZES = {
    # hidden, depth, heads, caption width, adaln width
    "tiny": DiTConfig(hidden_size=128, depth=2, num_heads=2, caption_channels=32, adaln_tembed_dim=32),
    "small": DiTConfig(hidden_size=256, depth=4, num_heads=2, caption_channels=64, adaln_tembed_dim=64),
    "full": DiTConfig(),
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 12.0,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}


def _random_dit_state(config: DiTConfig, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = build_dit(config, device="meta")  # only names and shapes are needed
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            fan_in = param[0].numel() if param.ndim > 1 else param.shape[0]
            state[name] = torch.randn(param.shape, generator=generator) / max(fan_in, 1) ** 0.5
    return state


def write_dit(folder: Path, config: DiTConfig, *, seed: int = 0, num_shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    state = _random_dit_state(config, seed)
    if num_shards <= 1:
        save_file(state, str(folder / WEIGHTS_NAME))
        return
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[i::num_shards]
        save_file({n: state[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(folder: Path) -> None:
    """A character-level unigram tokenizer with T5 conventions: pad 0, eos 1 (`</s>` appended), unk 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ".,!?'-"]
    model = models.Unigram(pieces, unk_id=2)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    fast.save_pretrained(folder)


def write_text_encoder(folder: Path, d_model: int, *, seed: int = 0) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=64, d_model=d_model, d_kv=max(d_model // 2, 8), d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    UMT5EncoderModel(config).save_pretrained(folder)


def write_vae(folder: Path, *, seed: int = 0, base_dim: int = 16, wan21: bool = False) -> None:
    """diffusers' AutoencoderKLWan with random weights: a narrow one (`base_dim`, one residual block per
    level), or with `wan21` the Wan 2.1 VAE's own shape (diffusers' defaults: base 96, two residual blocks)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    shape = {} if wan21 else {"base_dim": base_dim, "num_res_blocks": 1}
    vae = AutoencoderKLWan(
        z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD, **shape,
    )
    vae.save_pretrained(folder)


def write_random_checkpoint(
    root: Union[str, Path], size: str = "tiny", *, seed: int = 0, num_shards: int = 1
) -> Path:
    """Create `root` with `dit/ text_encoder/ tokenizer/ vae/ scheduler/`; returns `root`.

    `size` "full" writes the release's shapes as the hub ships them: the 13.6B DiT and a umT5-XXL encoder
    in sharded bf16 files with their `*.index.json` (drawn on the GPU when there is one, host memory bounded
    to two shards; `num_shards` applies to the DiT) and the Wan 2.1 VAE."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    config = SIZES[size]
    root = Path(root)
    if size == "full":
        write_dit_sharded(root / "dit", config, num_shards=max(num_shards, 6), seed=seed)
        write_text_encoder_sharded(root / "text_encoder", **UMT5_XXL, seed=seed)
    else:
        write_dit(root / "dit", config, seed=seed, num_shards=num_shards)
        write_text_encoder(root / "text_encoder", config.caption_channels, seed=seed)
    write_tokenizer(root / "tokenizer")
    write_vae(root / "vae", seed=seed, wan21=size == "full")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    return root


# --- full-size checkpoints: sharded, written shard by shard ----------------------------------------------
# The 13.6B DiT (27 GB in bf16) and umT5-XXL (~11 GB) cannot be built in fp32 on the host and saved whole:
# names and shapes come from the model built on the meta device, each shard's tensors are drawn on `device`
# (a GPU when there is one) in `dtype`, copied to the host and written while the next shard is drawn, so
# host memory holds at most two shards.

UMT5_XXL = {  # google/umt5-xxl's encoder, the text encoder LongCat-Video ships
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
}


# Output projections of the residual branches, drawn 5x smaller in the full-size DiT (as bench/common.py's
# `random_dit`): with every branch at unit gain the residual stream of 48 random blocks grows until bf16
# losses stop being useful numbers.
DAMPED_SUFFIXES = ("attn.proj.weight", "ffn.w2.weight")
DAMPING = 0.2


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator, *, device, dtype, std: Optional[float],
          damped: tuple[str, ...] = ()) -> torch.Tensor:
    """One random tensor: norm weights near 1; others N(0, std) (std None: 1/sqrt(fan_in), as `write_dit`),
    names ending in one of `damped` scaled by DAMPING."""
    if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
        value = 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        scale = std if std is not None else 1.0 / max(fan_in, 1) ** 0.5
        if name.endswith(damped):
            scale *= DAMPING
        value = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(scale)
    return value.to(dtype)


def _split_by_size(shapes: dict[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """Names (sorted) cut into at most `num_shards` consecutive groups of about equal element count."""
    names = sorted(shapes)
    total = sum(math.prod(shapes[n]) for n in names)
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        size = math.prod(shapes[name])
        if groups[-1] and len(groups) < num_shards and filled + size / 2 > total * len(groups) / num_shards:
            groups.append([])
        groups[-1].append(name)
        filled += size
    return groups


def write_sharded_safetensors(
    folder: Path, shapes: dict[str, tuple[int, ...]], *, base_name: str, num_shards: int,
    dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device, None] = None, seed: int = 0,
    std: Optional[float] = None, damped: tuple[str, ...] = (),
) -> list[Path]:
    """Random tensors of `shapes` as `<stem>-0000i-of-0000n.safetensors` + `<base_name>.index.json` (the hub
    layout of diffusers and transformers); `device` draws them (default: CUDA when available)."""
    import queue
    import threading

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    groups = _split_by_size(shapes, max(1, num_shards))
    stem = base_name.removesuffix(".safetensors")
    files = [folder / f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    pending: "queue.Queue[Optional[tuple[Path, dict[str, torch.Tensor]]]]" = queue.Queue(maxsize=1)
    failure: list[BaseException] = []

    def writer() -> None:
        while (item := pending.get()) is not None:
            if not failure:
                try:
                    save_file(item[1], str(item[0]))
                except BaseException as err:  # reported by the caller's thread
                    failure.append(err)

    thread = threading.Thread(target=writer, name="shard-writer", daemon=True)
    thread.start()
    weight_map, total_bytes = {}, 0
    try:
        for path, names in zip(files, groups):
            shard = {}
            for name in names:
                value = _draw(name, tuple(shapes[name]), generator, device=device, dtype=dtype, std=std, damped=damped)
                shard[name] = value.cpu() if value.device.type != "cpu" else value
                total_bytes += shard[name].numel() * shard[name].element_size()
                weight_map[name] = path.name
            if failure:
                break
            pending.put((path, shard))
            del shard
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / f"{base_name}.index.json").write_text(json.dumps(index, indent=2))
    return files


def write_dit_sharded(
    folder: Path, config: DiTConfig, *, num_shards: int = 6, dtype: torch.dtype = torch.bfloat16,
    device: Union[str, torch.device, None] = None, seed: int = 0,
) -> list[Path]:
    """`write_dit` for any size: sharded `dtype` safetensors drawn on `device`, host memory bounded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    model = build_dit(config, device="meta")
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return write_sharded_safetensors(folder, shapes, base_name=WEIGHTS_NAME, num_shards=num_shards, dtype=dtype,
                                     device=device, seed=seed, damped=DAMPED_SUFFIXES)


def write_text_encoder_sharded(
    folder: Path, *, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
    num_shards: int = 5, dtype: torch.dtype = torch.bfloat16, device: Union[str, torch.device, None] = None,
    seed: int = 0,
) -> list[Path]:
    """A umT5 encoder of any size (`**UMT5_XXL` for the real one) in transformers' layout, never initialized
    on the host: names/shapes from the meta device, values N(0, 0.02) (norm weights near 1), `dtype` shards."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    config.architectures = ["UMT5EncoderModel"]
    config.torch_dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    # named_parameters drops tied duplicates (encoder.embed_tokens is `shared`), as save_pretrained does.
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    return write_sharded_safetensors(folder, shapes, base_name="model.safetensors", num_shards=num_shards,
                                     dtype=dtype, device=device, seed=seed, std=0.02)

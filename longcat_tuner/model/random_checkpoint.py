"""Write a small random LongCat-Video checkpoint in the official hub layout.

Used by the demo, tests and benchmarks: `dit/` (our DiT, official key names), `text_encoder/` (a tiny umT5
encoder through transformers), `tokenizer/` (a character-level T5 fast tokenizer that appends `</s>` and pads
with id 0, like umT5's), `vae/` (diffusers' AutoencoderKLWan with the real latent mean/std) and `scheduler/`.
Nothing is downloaded. The loading code is the same one that reads the real 13.6B checkpoint.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Union

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


def write_vae(folder: Path, *, seed: int = 0, base_dim: int = 16) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
    )
    vae.save_pretrained(folder)


def write_random_checkpoint(
    root: Union[str, Path], size: str = "tiny", *, seed: int = 0, num_shards: int = 1
) -> Path:
    """Create `root` with `dit/ text_encoder/ tokenizer/ vae/ scheduler/`; returns `root`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    config = SIZES[size]
    root = Path(root)
    write_dit(root / "dit", config, seed=seed, num_shards=num_shards)
    write_text_encoder(root / "text_encoder", config.caption_channels, seed=seed)
    write_tokenizer(root / "tokenizer")
    write_vae(root / "vae", seed=seed)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    return root

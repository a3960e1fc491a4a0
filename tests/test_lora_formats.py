"""LoRA file layouts: every written format round-trips exactly, the ComfyUI-WanVideoWrapper file is applied
in full by ComfyUI's key mapping, and every peer trainer's layout loads with the right strength."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_tuner import inject_lora, load_dit, load_lora, save_lora
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model import lora_formats as lf
from longcat_tuner.model.lora import DEFAULT_TARGETS, lora_modules

ALL_TARGETS = list(DEFAULT_TARGETS) + ["adaLN_modulation.1", "final_layer.linear", "final_layer.adaLN_modulation.1",
                                       "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.y_proj.0", "y_embedder.y_proj.2"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _run(dit, cases):
    with torch.no_grad():
        return dit(cases["x"], cases["i2v_timestep"], cases["encoder_hidden_states"],
                   cases["encoder_attention_mask"], num_cond_latents=1)


def _trained(tiny_checkpoint, *, rank=4, alpha=6.0, seed=0):
    """The tiny DiT with random (trained-looking) adapters on every linear layer; alpha != rank."""
    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=rank, alpha=alpha, targets=ALL_TARGETS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.down.copy_(torch.randn(adapter.down.shape, generator=gen) * 0.1)
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen) * 0.1)
    return dit


def _deltas(dit, name=None) -> dict[str, torch.Tensor]:
    return {path: adapter.delta_weight().detach().float() for path, adapter in lora_modules(dit, name).items()}


def _assert_same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-6, worst


# --- tables ------------------------------------------------------------------------------------------------


def test_official_linear_table_is_the_models(tiny_checkpoint):
    dit = load_dit(tiny_checkpoint)
    linears = {path for path, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(lf.official_linears(dit.config.depth)) == linears
    assert lf.wrapper_names("blocks.3.attn.qkv") == ("blocks.3.self_attn.q", "blocks.3.self_attn.k", "blocks.3.self_attn.v")
    assert lf.wrapper_names("final_layer.adaLN_modulation.1") == ("head.modulation.1",)


# --- round trips -------------------------------------------------------------------------------------------

KEY_SHAPE = {
    "official": "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.lora_up.blocks.2.weight",
    "comfyui-wanvideowrapper": "diffusion_model.blocks.0.self_attn.v.lora_up.weight",
    "wan2gp": "diffusion_model.blocks.0.attn.qkv.lora_up.weight",
    "diffusers": "transformer.blocks.0.attn.qkv.lora_B.weight",
}


@pytest.mark.parametrize("fmt", lf.LORA_FILE_FORMATS)
def test_each_format_round_trips_deltas_and_dit_output(tiny_checkpoint, dit_cases, tmp_path, fmt):
    dit = _trained(tiny_checkpoint)
    want, expected = _deltas(dit), _run(dit, dit_cases)
    path = save_lora(dit, tmp_path / f"{fmt}.safetensors", format=fmt, metadata={"attention_implementation": "sdpa"})
    assert KEY_SHAPE[fmt] in _tensors(path)
    assert _header(path)["attention_implementation"] == "sdpa"  # the trainer's header survives every layout
    fresh = load_dit(tiny_checkpoint)
    load_lora(fresh, path, dtype=torch.float32)
    _assert_same_deltas(_deltas(fresh), want)
    torch.testing.assert_close(_run(fresh, dit_cases), expected, atol=1e-5, rtol=1e-5)
    assert (expected - dit_cases["i2v_out"]).abs().max() > 1e-3  # the LoRA does change the output


def test_conversions_between_all_formats_are_exact(tiny_checkpoint, tmp_path):
    from longcat_tuner.cli import main

    dit = _trained(tiny_checkpoint, seed=1)
    want = _deltas(dit)
    first = save_lora(dit, tmp_path / "start.safetensors", format="official")
    current = first
    for i, fmt in enumerate(["comfyui-wanvideowrapper", "wan2gp", "diffusers", "comfyui", "official"]):
        target = tmp_path / f"{i}-{fmt}.safetensors"
        assert main(["export-lora", str(current), str(target), "--format", fmt]) == 0
        adapters, header = lf.read_lora_file(target)
        _assert_same_deltas({p: a.delta() for p, a in adapters.items()}, want)
        assert header["longcat_tuner_format"] == lf.resolve_format(fmt)
        current = target
    # Back in the official layout after the split/merge trip: the very same keys, block structure restored.
    original, final = _tensors(first), _tensors(current)
    assert original.keys() == final.keys()
    assert all(torch.allclose(original[k], final[k], atol=1e-7) for k in original)
    assert lf.PEFT_METADATA_KEY not in _header(current)  # no stale layout header after conversion


def test_train_writes_the_configured_formats(tiny_checkpoint, tmp_path):
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.train.trainer import save_outputs

    base = {"pretrained_model_name_or_path": str(tiny_checkpoint), "data_backend_config": str(tmp_path / "d.json"),
            "output_dir": str(tmp_path / "out"), "max_train_steps": 1}
    assert TrainConfig.from_dict(base).lora_export_formats == ["official", "comfyui-wanvideowrapper"]
    with pytest.raises(ConfigError, match="lora_export_formats"):
        TrainConfig.from_dict({**base, "lora_export_formats": ["comfyui"]})  # config takes the exact names
    with pytest.raises(ConfigError, match="lora_export_formats"):
        TrainConfig.from_dict({**base, "lora_export_formats": []})
    import argparse

    from longcat_tuner.config import add_config_arguments, config_overrides

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    overrides = config_overrides(parser.parse_args(["--lora_export_formats", "wan2gp", "diffusers"]))
    assert TrainConfig.from_dict({**base, **overrides}).lora_export_formats == ["wan2gp", "diffusers"]
    dit = _trained(tiny_checkpoint)
    config = SimpleNamespace(model_type="lora", lora_export_formats=["wan2gp", "diffusers", "comfyui-wanvideowrapper"])
    main, wrapper = save_outputs(dit, config, tmp_path, {"step": 1})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "longcat_lora_comfyui.safetensors", "longcat_lora_diffusers.safetensors", "longcat_lora_wan2gp.safetensors"]
    assert main.name == "longcat_lora_wan2gp.safetensors" and wrapper.name == "longcat_lora_comfyui.safetensors"
    config.lora_export_formats = ["official", "comfyui-wanvideowrapper"]
    main, wrapper = save_outputs(dit, config, tmp_path / "b", {"step": 1})
    assert (main.name, wrapper.name) == ("longcat_lora.safetensors", "longcat_lora_comfyui.safetensors")


def test_export_lora_help_does_not_import_torch():
    code = ("import sys; from longcat_tuner.cli import build_parser; build_parser('export-lora'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- ComfyUI + ComfyUI-WanVideoWrapper, reimplemented here -------------------------------------------------


def wrapper_longcat_linears(depth, *, dim, ffn, adaln, text_dim, freq, out) -> dict[str, tuple[int, int]]:
    """`{module path: (out, in)}` of every linear of the wrapper's `WanModel(is_longcat=True)` (text-to-video
    cross-attention): per block `self_attn.q/k/v/o`, `cross_attn.q/k/v/o`, `ffn.w1/w2/w3` (its SwiGLU),
    `modulation.1` (SiLU + Linear(512, 6*dim)); outside `text_embedding.0/.2`, `time_embedding.mlp.0/.2`,
    `head.head`, `head.modulation.1` (SiLU + Linear(512, 2*dim)). Written from its `wanvideo/modules/model.py`
    (`WanModel`, `WanAttentionBlock`, `Head_adaLN`) and `LongCat/layers.py` (`FeedForwardSwiGLU`,
    `TimestepEmbedder`)."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(depth):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{i}.{attn}.{proj}"] = (dim, dim)
        shapes[f"blocks.{i}.ffn.w1"] = shapes[f"blocks.{i}.ffn.w3"] = (ffn, dim)
        shapes[f"blocks.{i}.ffn.w2"] = (dim, ffn)
        shapes[f"blocks.{i}.modulation.1"] = (6 * dim, adaln)
    shapes.update({"text_embedding.0": (dim, text_dim), "text_embedding.2": (dim, dim),
                   "time_embedding.mlp.0": (adaln, freq), "time_embedding.mlp.2": (adaln, adaln),
                   "head.head": (out, dim), "head.modulation.1": (2 * dim, adaln)})
    return shapes


def wrapper_state_dict_keys(linears: dict[str, tuple[int, int]], depth: int) -> list[str]:
    """The wrapper model's state-dict keys as ComfyUI sees them: linears (weight + bias) plus norms and the conv."""
    keys = [f"diffusion_model.{p}.{w}" for p in linears for w in ("weight", "bias")]
    for i in range(depth):
        keys += [f"diffusion_model.blocks.{i}.{n}.weight" for n in
                 ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k", "norm3")]
    return keys + ["diffusion_model.patch_embedding.weight", "diffusion_model.patch_embedding.bias"]


def comfy_key_map(state_dict_keys: list[str]) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` rule (the wrapper uses the same one): every `diffusion_model.X.weight`
    is the target of LoRA names `lora_unet_X_with_underscores` and `diffusion_model.X`."""
    key_map = {}
    for k in state_dict_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + path.replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
    return key_map


def wrapper_standardize(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The prefix rules of the wrapper's `standardize_lora_key_format` that apply to plain LoRA keys."""
    out = {}
    for k, v in lora.items():
        for old, new in (("transformer.", "diffusion_model."), ("pipe.dit.", "diffusion_model."),
                         ("blocks.", "diffusion_model.blocks."), ("base_model.model.", "diffusion_model.")):
            if k.startswith(old):
                k = new + k[len(old):]
        out[k.replace(".default.", ".")] = v
    return out


def comfy_apply(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """ComfyUI's LoRA loading for plain LoRAs: `{x}.lora_up.weight` + `{x}.lora_down.weight` (+ `{x}.alpha`) for
    each name x of the key map; returns ({target weight: delta}, keys not loaded). delta = alpha/rank * up @ down."""
    loaded, patches = set(), {}
    for x, target in key_map.items():
        up_name, down_name, alpha_name = f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"
        if up_name not in lora:
            continue
        up, down = lora[up_name].float(), lora[down_name].float()
        alpha = float(lora[alpha_name]) if alpha_name in lora else None
        loaded.update({up_name, down_name} | ({alpha_name} if alpha is not None else set()))
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        patches[target] = (up, down, scale)
    return patches, [k for k in lora if k not in loaded]


def _official_shapes(depth, *, dim, ffn, adaln, text_dim, freq, out) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(depth):
        shapes.update({f"blocks.{i}.attn.qkv": (3 * dim, dim), f"blocks.{i}.attn.proj": (dim, dim),
                       f"blocks.{i}.cross_attn.q_linear": (dim, dim), f"blocks.{i}.cross_attn.kv_linear": (2 * dim, dim),
                       f"blocks.{i}.cross_attn.proj": (dim, dim), f"blocks.{i}.ffn.w1": (ffn, dim),
                       f"blocks.{i}.ffn.w2": (dim, ffn), f"blocks.{i}.ffn.w3": (ffn, dim),
                       f"blocks.{i}.adaLN_modulation.1": (6 * dim, adaln)})
    shapes.update({"t_embedder.mlp.0": (adaln, freq), "t_embedder.mlp.2": (adaln, adaln),
                   "y_embedder.y_proj.0": (dim, text_dim), "y_embedder.y_proj.2": (dim, dim),
                   "final_layer.adaLN_modulation.1": (2 * dim, adaln), "final_layer.linear": (out, dim)})
    return shapes


REAL = {"dim": 4096, "ffn": 11008, "adaln": 512, "text_dim": 4096, "freq": 256, "out": 64}


def test_48_block_wrapper_export_is_applied_in_full_by_comfyui():
    """The released model's sizes: 48 blocks, every linear adapted (block-diagonal on fused layers, rank 1)."""
    depth = 48
    shapes = _official_shapes(depth, **REAL)
    assert set(shapes) == set(lf.official_linears(depth))
    gen = torch.Generator().manual_seed(0)
    adapters = {}
    for path, (out, inp) in shapes.items():
        parts = lf.fused_parts(path)
        adapters[path] = lf.Adapter(torch.randn(parts, inp, generator=gen),
                                    [torch.randn(out // parts, 1, generator=gen) for _ in range(parts)], 0.5)
    lora, _ = lf.format_tensors(adapters, "comfyui-wanvideowrapper")
    linears = wrapper_longcat_linears(depth, **REAL)
    patches, not_loaded = comfy_apply(wrapper_standardize(lora), comfy_key_map(wrapper_state_dict_keys(linears, depth)))
    assert not_loaded == [] and len(lora) == 48 * 12 * 3 + 6 * 3  # 100% applied: no "lora key not loaded"
    assert len(patches) == len(linears)  # every linear of the wrapper's LongCat model gets its patch
    for target, (up, down, scale) in patches.items():
        out, inp = linears[target[len("diffusion_model."):-len(".weight")]]
        assert up.shape[0] == out and down.shape[1] == inp and up.shape[1] == down.shape[0] and scale == 0.5


def test_wrapper_deltas_as_comfyui_computes_them_equal_ours(tiny_checkpoint, tmp_path):
    """Structured (trained) adapters and dense foreign ones on qkv/kv: the rows ComfyUI adds to each wrapper
    linear, stacked back in the fused order, are our delta."""
    dit = _trained(tiny_checkpoint, alpha=3.0)
    adapters = {path: lf.Adapter(a.down.detach(), list(a.up.detach().unbind(0)), float(a.alpha_scale))
                for path, a in lora_modules(dit).items()}
    gen = torch.Generator().manual_seed(3)
    adapters["blocks.1.attn.qkv"] = lf.Adapter(torch.randn(5, 256, generator=gen) * 0.1,
                                               [torch.randn(768, 5, generator=gen) * 0.1], 0.7)
    adapters["blocks.1.cross_attn.kv_linear"] = lf.Adapter(torch.randn(3, 256, generator=gen) * 0.1,
                                                           [torch.randn(512, 3, generator=gen) * 0.1], 1.3)
    cfg = dit.config
    sizes = {"dim": cfg.hidden_size, "ffn": dit.blocks[0].ffn.w1.out_features, "adaln": cfg.adaln_tembed_dim,
             "text_dim": cfg.caption_channels, "freq": cfg.frequency_embedding_size, "out": 4 * cfg.out_channels}
    lora, _ = lf.format_tensors(adapters, "comfyui-wanvideowrapper")
    linears = wrapper_longcat_linears(cfg.depth, **sizes)
    patches, not_loaded = comfy_apply(wrapper_standardize(lora), comfy_key_map(wrapper_state_dict_keys(linears, cfg.depth)))
    assert not not_loaded and len(patches) == len(linears)
    for path, adapter in adapters.items():
        rows = [patches[f"diffusion_model.{name}.weight"] for name in lf.wrapper_names(path)]
        comfy_delta = torch.cat([scale * up @ down for up, down, scale in rows])
        assert float((comfy_delta - adapter.delta()).abs().max()) <= 1e-6, path


# --- the official loader's expectations, reimplemented -----------------------------------------------------


def test_official_file_fits_the_official_loader_with_one_rank(tiny_checkpoint, tmp_path):
    """LongCat's lora_utils builds every module with one `lora_network_dim` and loads strictly: adapters of
    different ranks (here q/k/v merged from a kijai-named file) are zero-padded to one rank, exactly."""
    gen = torch.Generator().manual_seed(5)
    tensors, want = {}, torch.zeros(768, 256)
    for j, (proj, rank, alpha) in enumerate([("q", 2, 4.0), ("k", 3, 1.0), ("v", 5, 5.0)]):
        down, up = torch.randn(rank, 256, generator=gen), torch.randn(256, rank, generator=gen)
        base = f"diffusion_model.blocks.0.self_attn.{proj}"
        tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(alpha)})
        want[j * 256 : (j + 1) * 256] = alpha / rank * up @ down
    down, up = torch.randn(2, 256, generator=gen), torch.randn(256, 2, generator=gen)
    tensors.update({"diffusion_model.blocks.1.ffn.w2.lora_down.weight": torch.randn(2, 1024, generator=gen),
                    "diffusion_model.blocks.1.ffn.w2.lora_up.weight": up})
    save_file(tensors, str(tmp_path / "kijai.safetensors"))
    out_path = lf.convert_lora_file(tmp_path / "kijai.safetensors", tmp_path / "official.safetensors", "official")
    dim = int(_header(out_path)["lora_network_dim"])
    assert dim == 10  # the merged qkv adapter: 2 + 3 + 5, scales folded into its up
    _assert_official_loader_shapes(_tensors(out_path), dim)
    adapters, _ = lf.read_lora_file(out_path)
    assert float((adapters["blocks.0.attn.qkv"].delta() - want).abs().max()) <= 1e-6


def _assert_official_loader_shapes(official: dict[str, torch.Tensor], dim: int) -> None:
    """The module shapes LongCat's lora_utils builds and then loads strictly: rank `dim` for every layer (the
    `lora_network_dim` given at load), and as many up blocks as the file has `lora_up.blocks.*` keys for that
    layer (it counts them: `n_seperate`), else one up matrix; nothing else in the file."""
    downs = [key for key in official if key.endswith(".lora_down.weight")]
    assert downs
    for key in downs:
        base = key[: -len(".lora_down.weight")]
        n = sum(k.startswith(base + ".lora_up.blocks.") for k in official) or 1
        assert official[key].shape[0] == n * dim, key
        ups = [official.pop(f"{base}.lora_up.blocks.{j}.weight") for j in range(n)] if n > 1 \
            else [official.pop(f"{base}.lora_up.weight")]
        assert all(u.shape[1] == dim for u in ups), key
        assert official.pop(f"{base}.alpha_scale").ndim == 0
        del official[key]
    assert not official, f"keys the official loader would not expect: {sorted(official)[:4]}"


# --- foreign layouts ---------------------------------------------------------------------------------------


def _foreign(kind: str, gen: torch.Generator):
    """(tensors, header, {official path: expected delta}) of a file as `kind` writes it, alpha != rank."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    tensors, header, want = {}, {}, {}
    modules = {"blocks.0.attn.qkv": (768, 256), "blocks.1.cross_attn.kv_linear": (512, 256),
               "blocks.0.ffn.w2": (256, 768), "blocks.1.adaLN_modulation.1": (1536, 64)}
    if kind == "kijai":  # wrapper names, separate q/k/v with their own ranks and alphas, v missing
        specs = [("blocks.0.self_attn.q", 3, 6.0), ("blocks.0.self_attn.k", 2, 1.0), ("blocks.1.cross_attn.k", 4, 2.0),
                 ("blocks.1.cross_attn.v", 4, 2.0), ("blocks.0.ffn.w2", 2, 8.0), ("blocks.1.modulation.1", 3, 1.5)]
        want = {"blocks.0.attn.qkv": torch.zeros(768, 256), "blocks.1.cross_attn.kv_linear": torch.zeros(512, 256)}
        for name, rank, alpha in specs:
            official, j, _ = lf._normalise_module(name)
            out, inp = modules[official]
            rows = 256 if j is not None else out
            down, up = rnd(rank, inp), rnd(rows, rank)
            tensors.update({f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up,
                            f"diffusion_model.{name}.alpha": torch.tensor(alpha)})
            delta = alpha / rank * up @ down
            if j is None:
                want[official] = delta
            else:
                want[official][j * rows : (j + 1) * rows] = delta
        return tensors, header, want
    rank, alpha = 4, 2.0
    for path, (out, inp) in modules.items():
        down, up = rnd(rank, inp), rnd(out, rank)
        if kind == "diffsynth":  # PEFT with the adapter name, no alpha anywhere: alpha = rank
            tensors.update({f"{path}.lora_A.default.weight": down, f"{path}.lora_B.default.weight": up})
            want[path] = up @ down
        elif kind in ("musubi", "videox-fun"):
            name = ("lora_unet_" if kind == "musubi" else "lora_unet__") + path.replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(alpha, dtype=torch.bfloat16)})
            want[path] = alpha / rank * up @ down
        elif kind == "videox-fun-peft":  # its lora_diffusion_pytorch_model.safetensors from --use_peft_lora
            tensors.update({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up})
            want[path] = up @ down
        elif kind == "simpletuner":  # diffusers save_lora_weights: alpha only in the header, one module patterned
            tensors.update({f"transformer.{path}.lora_A.weight": down, f"transformer.{path}.lora_B.weight": up})
            module_alpha = 12.0 if path == "blocks.0.ffn.w2" else alpha
            want[path] = module_alpha / rank * up @ down
    if kind == "simpletuner":
        header = {"format": "pt", lf.PEFT_METADATA_KEY: json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.alpha_pattern": {"ffn.w2": 12.0},
             "transformer.rank_pattern": {}, "transformer.target_modules": ["qkv", "kv_linear", "w2", "adaLN_modulation.1"]})}
    return tensors, header, want


@pytest.mark.parametrize("kind", ["diffsynth", "musubi", "videox-fun", "videox-fun-peft", "simpletuner", "kijai"])
def test_foreign_layout_loads_with_the_right_strength(tiny_checkpoint, dit_cases, tmp_path, kind):
    tensors, header, want = _foreign(kind, torch.Generator().manual_seed(11))
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata=header or None)
    dit = load_dit(tiny_checkpoint)
    load_lora(dit, path, dtype=torch.float32, multiplier=0.5)
    got = {p: a.delta_weight().detach() for p, a in lora_modules(dit).items()}
    _assert_same_deltas(got, {p: 0.5 * d for p, d in want.items()})
    merged = load_dit(tiny_checkpoint)
    with torch.no_grad():
        for p, delta in want.items():
            merged.get_submodule(p).weight += 0.5 * delta
    torch.testing.assert_close(_run(dit, dit_cases), _run(merged, dit_cases), atol=1e-5, rtol=1e-5)


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_the_known_layouts(tiny_checkpoint, tmp_path):
    dit = load_dit(tiny_checkpoint)
    good = {"diffusion_model.blocks.0.ffn.w1.lora_down.weight": torch.zeros(2, 256),
            "diffusion_model.blocks.0.ffn.w1.lora_up.weight": torch.zeros(768, 2)}
    bad = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
           "diffusion_model.blocks.0.attn.qkvv.lora_up.weight": torch.zeros(8, 2),
           "diffusion_model.blocks.0.ffn.w1.dora_scale": torch.zeros(1, 768)}
    save_file({**good, **bad}, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_lora(dit, tmp_path / "mixed.safetensors")
    message = str(err.value)
    assert all(k in message for k in bad) and "3 keys" in message and "DoRA" in message
    assert all(name in message for name in (*lf.LORA_FILE_FORMATS, "DiffSynth-Studio", "musubi-tuner", "VideoX-Fun"))
    assert not lora_modules(dit)  # nothing half-attached


def test_one_layer_under_two_naming_schemes_is_refused(tmp_path):
    tensors = {}
    for name in ("diffusion_model.blocks.0.ffn.w1", "lora_unet_blocks_0_ffn_w1"):
        tensors.update({f"{name}.lora_down.weight": torch.zeros(2, 256), f"{name}.lora_up.weight": torch.zeros(768, 2)})
    save_file(tensors, str(tmp_path / "twice.safetensors"))
    with pytest.raises(CheckpointError, match="two adapters"):
        lf.read_lora_file(tmp_path / "twice.safetensors")


def test_wan_lora_of_another_size_is_refused(tiny_checkpoint, tmp_path):
    """Wan2.1 names at Wan sizes: the names resolve, the shapes tell it is not for this DiT."""
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 5120),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 2)}, str(tmp_path / "wan.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit the layer"):
        load_lora(load_dit(tiny_checkpoint), tmp_path / "wan.safetensors")


@pytest.mark.parametrize("kind", ["diffsynth", "musubi", "simpletuner", "kijai"])
@pytest.mark.parametrize("fmt", lf.LORA_FILE_FORMATS)
def test_peer_files_convert_to_every_format(tmp_path, kind, fmt):
    """PEFT, DiffSynth and musubi train one adapter on attn.qkv / kv_linear. Converting such a file to the
    ComfyUI layout failed to write: q, k and v shared the one down matrix, and safetensors refuses shared tensors."""
    tensors, header, want = _foreign(kind, torch.Generator().manual_seed(3))
    source = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(source), metadata=header or None)
    target = lf.convert_lora_file(source, tmp_path / f"out-{fmt}.safetensors", fmt)
    adapters, _ = lf.read_lora_file(target)
    _assert_same_deltas({p: a.delta() for p, a in adapters.items() if p in want}, want)
    assert all(float(a.delta().abs().max()) == 0 for p, a in adapters.items() if p not in want)
    if fmt == "official":
        _assert_official_loader_shapes(_tensors(target), int(_header(target)["lora_network_dim"]))


def test_a_damaged_peft_header_is_refused_only_where_the_alpha_comes_from_it(tmp_path):
    """A header that is not JSON used to be ignored: alpha silently became the rank, another strength."""
    down, up = torch.randn(2, 256), torch.randn(768, 2)
    peft = tmp_path / "peft.safetensors"
    save_file({"transformer.blocks.0.attn.qkv.lora_A.weight": down, "transformer.blocks.0.attn.qkv.lora_B.weight": up},
              str(peft), metadata={lf.PEFT_METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=f"{peft}: the header's {lf.PEFT_METADATA_KEY} is not a JSON object"):
        lf.read_lora_file(peft)
    own_alpha = tmp_path / "musubi.safetensors"
    save_file({"lora_unet_blocks_0_attn_qkv.lora_down.weight": down, "lora_unet_blocks_0_attn_qkv.lora_up.weight": up,
               "lora_unet_blocks_0_attn_qkv.alpha": torch.tensor(1.0)}, str(own_alpha),
              metadata={lf.PEFT_METADATA_KEY: "[1, 2]"})
    adapters, _ = lf.read_lora_file(own_alpha)  # its alpha is its own: the header is not needed
    assert adapters["blocks.0.attn.qkv"].scale == 0.5


def test_a_pipe_given_as_a_lora_is_named_as_one(tmp_path):
    import os

    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="is not a regular file"):
        lf.read_lora_file(fifo)


def test_written_lora_files_are_readable_by_other_users(tiny_checkpoint, tmp_path):
    """safetensors creates its files 0600: a ComfyUI service running as another user could not read a LoRA."""
    import os

    from longcat_tuner.fsutil import _umask

    dit = _trained(tiny_checkpoint)
    config = SimpleNamespace(model_type="lora", lora_export_formats=list(lf.LORA_FILE_FORMATS))
    from longcat_tuner.train.trainer import save_outputs

    save_outputs(dit, config, tmp_path, {"step": 1})
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(lf.LORA_FILE_FORMATS)
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask(), path.name


def test_train_names_every_lora_file_it_wrote(tiny_checkpoint, tmp_path):
    """`train` printed the official and ComfyUI paths only: the Wan2GP and diffusers files went unnamed."""
    from longcat_tuner.commands.train import other_lora_files
    from longcat_tuner.train.trainer import save_outputs

    config = SimpleNamespace(model_type="lora", lora_export_formats=list(lf.LORA_FILE_FORMATS))
    main, wrapper = save_outputs(_trained(tiny_checkpoint), config, tmp_path, {"step": 1})
    result = SimpleNamespace(lora_path=main, comfyui_lora_path=wrapper)
    assert other_lora_files(config, result) == [("Wan2GP", tmp_path / "longcat_lora_wan2gp.safetensors"),
                                                ("diffusers/PEFT (SimpleTuner)", tmp_path / "longcat_lora_diffusers.safetensors")]
    config.lora_export_formats = ["official", "comfyui-wanvideowrapper"]
    assert other_lora_files(config, result) == []

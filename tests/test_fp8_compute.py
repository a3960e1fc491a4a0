"""float8 compute of the frozen linears (`base_model_precision: fp8-compute`, runtime/fp8_compute.py).

Tolerances (relative L2 error against float32 math, measured on the CPU build): one 256->768 layer
with random weights, forward and input gradient ~0.036 (float8 e4m3 rounds to 3 mantissa bits; bf16 gives
~0.003 on the same layer); the tiny reference DiT's output ~0.008 (fp32 activations) / ~0.013 (bf16
autocast, where bf16 alone gives ~0.010).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_tuner.errors import ConfigError
from longcat_tuner.model.lora import inject_lora, lora_modules
from longcat_tuner.runtime import MemorySettings, apply_runtime, prepare_base_weights
from longcat_tuner.runtime.fp8_compute import (
    GRAD_DTYPE,
    Fp8ComputeLinear,
    convert_to_fp8_compute,
    quantize_per_row,
)
from longcat_tuner.runtime.quantize import QuantizedLinear

FP8 = MemorySettings(base_precision="fp8-compute")
LAYER_BOUND = 0.06  # one layer, forward and input gradient, vs float32
DIT_BOUND = 0.03  # the tiny DiT's output and input gradient, vs float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _layer_pair(in_features=256, out_features=768, seed=0):
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features).requires_grad_(False)
    fp8 = nn.Linear(in_features, out_features).requires_grad_(False)
    fp8.load_state_dict(plain.state_dict())
    layer = nn.Sequential(fp8)
    assert convert_to_fp8_compute(layer, targets=("0",)) == 1
    assert type(fp8) is Fp8ComputeLinear and fp8.weight.dtype == torch.float8_e4m3fn
    return plain, fp8


def test_forward_and_input_gradient_against_float32_and_the_float8_emulation():
    plain, fp8 = _layer_pair()
    x = torch.randn(3, 37, 256)  # 111 rows: no multiple of 16 needed there
    grad = torch.randn(3, 37, 768)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = fp8(xa), plain(xb)
    out.backward(grad)
    ref.backward(grad)
    assert out.dtype == torch.float32 and xa.grad.dtype == torch.float32
    assert 0.005 < rel(out, ref) < LAYER_BOUND and 0.005 < rel(xa.grad, xb.grad) < LAYER_BOUND
    bf16 = F.linear(x.bfloat16(), plain.weight.bfloat16(), plain.bias.bfloat16())
    assert rel(bf16, ref) < 0.01  # the scale of bf16's own error on this layer

    # Exactly what float8 math gives: per-row quantized x times the stored weight (forward), and the
    # weight's row scale folded into the per-row quantized gradient (input gradient).
    w = fp8.weight.float() * fp8.weight_scale[:, None]
    xq, xs = quantize_per_row(x.reshape(-1, 256), torch.float8_e4m3fn)
    emulated = (xq.float() * xs) @ w.t() + fp8.bias
    torch.testing.assert_close(out.reshape(-1, 768), emulated, atol=1e-5, rtol=1e-5)
    gq, gs = quantize_per_row(grad.reshape(-1, 768) * fp8.weight_scale, GRAD_DTYPE)
    torch.testing.assert_close(xa.grad.reshape(-1, 256), (gq.float() * gs) @ fp8.weight.float(), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_gives_bf16_outputs_and_input_dtype_gradients():
    plain, fp8 = _layer_pair()
    x = torch.randn(50, 256, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
        ref = plain(x.detach())
    assert out.dtype == torch.bfloat16 == ref.dtype
    assert rel(out, plain(x.detach())) < LAYER_BOUND
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_rows_of_very_different_size_keep_their_relative_precision():
    """One scale per row: a row 1e4 times smaller than the others is as precise as they are."""
    x = torch.randn(8, 512) * torch.logspace(-4, 0, 8)[:, None]
    q, scale = quantize_per_row(x, torch.float8_e4m3fn)
    assert scale.shape == (8, 1) and q.abs().float().amax(dim=1).eq(448).all()
    per_row = ((q.float() * scale - x).norm(dim=1) / x.norm(dim=1))
    assert float(per_row.max()) < 0.04
    assert torch.equal(quantize_per_row(torch.zeros(2, 16), torch.float8_e4m3fn)[0].float(), torch.zeros(2, 16))


def test_lora_gradients_are_exact_and_the_frozen_weight_gets_none():
    """The adapter's update and its gradients are computed beside the float8 matmul, in float32: given
    the same output gradient they equal those over a float32 layer bit for bit."""
    plain, fp8 = _layer_pair()
    grads = []
    for layer in (plain, fp8):
        torch.manual_seed(1)
        adapter = inject_lora(nn.Sequential(layer), rank=4, targets=("0",))["0"]
        with torch.no_grad():
            adapter.up.normal_(0, 0.1)
        x = torch.randn(20, 256, generator=torch.Generator().manual_seed(2), requires_grad=True)
        layer(x).backward(torch.ones(20, 768))
        grads.append((adapter.down.grad.clone(), adapter.up.grad.clone()))
        assert adapter.down.dtype == torch.float32
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert fp8.weight.grad is None and fp8.bias.grad is None and not fp8.weight.requires_grad


def _tiny(tiny_checkpoint, settings=FP8, dtype=torch.float32):
    from longcat_tuner import load_dit

    dit = load_dit(tiny_checkpoint).to(dtype)
    count = prepare_base_weights(dit, settings)
    assert count == (8 * len(dit.blocks) if settings.quantized else 0)
    torch.manual_seed(0)
    inject_lora(dit, rank=4, alpha=4)
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.up.normal_(0, 0.05)
    return dit, count


def _backward(dit, dit_cases):
    x = dit_cases["x"].clone().requires_grad_()
    out = dit(x, dit_cases["i2v_timestep"], dit_cases["encoder_hidden_states"], dit_cases["encoder_attention_mask"],
              num_cond_latents=1)
    out[:, :, 1:].pow(2).mean().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}


def test_tiny_dit_output_error_lora_gradients_and_no_base_gradient(tiny_checkpoint, dit_cases):
    dit, count = _tiny(tiny_checkpoint)
    assert count == 8 * len(dit.blocks)
    assert sum(isinstance(m, Fp8ComputeLinear) for m in dit.modules()) == count
    reference, _ = _tiny(tiny_checkpoint, MemorySettings())
    apply_runtime(dit, MemorySettings(checkpointing="none"), "cpu")
    apply_runtime(reference, MemorySettings(checkpointing="none"), "cpu")
    out, grad_x, grads = _backward(dit, dit_cases)
    ref_out, ref_grad_x, ref_grads = _backward(reference, dit_cases)
    assert 0 < rel(out, ref_out) < DIT_BOUND and 0 < rel(grad_x, ref_grad_x) < DIT_BOUND
    assert grads.keys() == ref_grads.keys() and all("lora_adapters" in n for n in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())
    assert max(rel(grads[n], ref_grads[n]) for n in grads) < 0.2  # measured 0.08 (bf16 autocast: 0.10)
    assert all(p.grad is None for n, p in dit.named_parameters() if "lora_adapters" not in n)


@pytest.mark.parametrize("mode", ["full", "keep_attention", "offload_inputs"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_checkpoint, dit_cases, mode):
    """The recompute repeats the forward's float8 rounding exactly: gradients equal to the plain backward."""
    plain, _ = _tiny(tiny_checkpoint)
    apply_runtime(plain, MemorySettings(checkpointing="none"), "cpu")
    checkpointed, _ = _tiny(tiny_checkpoint)
    applied = apply_runtime(checkpointed, MemorySettings(checkpointing=mode), "cpu")
    assert applied.recomputed == frozenset(range(len(checkpointed.blocks)))
    expected, got = _backward(plain, dit_cases)[2], _backward(checkpointed, dit_cases)[2]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_block_swap_streams_the_float8_weights_and_keeps_gradients(tiny_checkpoint, dit_cases):
    from longcat_tuner.runtime.block_swap import apply_block_swap

    plain, _ = _tiny(tiny_checkpoint)
    applied = apply_runtime(plain, MemorySettings(checkpointing="full"), "cpu")
    expected = _backward(plain, dit_cases)[2]
    swapped, _ = _tiny(tiny_checkpoint)
    applied = apply_runtime(swapped, MemorySettings(checkpointing="full"), "cpu")
    loads = []
    handle = apply_block_swap(swapped, 1, compute_device="cpu", recomputed=applied.recomputed,
                              on_transfer=lambda kind, i: loads.append((kind, i)))
    assert swapped.blocks[1].ffn.w1.weight.numel() == 0 and swapped.blocks[1].ffn.w1.weight_scale.numel() == 0
    got = _backward(swapped, dit_cases)[2]
    assert ("load", 1) in loads
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    handle.remove()


def test_torch_compile_traces_the_float8_function(monkeypatch):
    """torch.compile (AOT autograd, the graphs Inductor would get) runs forward and backward of a
    checkpointed fp8 layer with LoRA and gives the eager gradients."""
    from longcat_tuner.runtime.checkpointing import checkpointed_forward

    _, fp8 = _layer_pair()
    adapter = inject_lora(nn.Sequential(fp8), rank=4, targets=("0",))["0"]
    with torch.no_grad():
        adapter.up.normal_(0, 0.1)
    x = torch.randn(40, 256)

    def grads(forward):
        adapter.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        forward(xg).square().sum().backward()
        return xg.grad, adapter.down.grad.clone(), adapter.up.grad.clone()

    def layer(t):
        return fp8(t)

    eager = grads(checkpointed_forward(layer, "full"))
    torch._dynamo.reset()
    compiled = grads(torch.compile(checkpointed_forward(layer, "full"), backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layers_float8_matmuls_cannot_take_keep_the_weight_only_path():
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 40)).requires_grad_(False)
    assert convert_to_fp8_compute(model, targets=("0", "1")) == 1
    assert type(model[0]) is Fp8ComputeLinear and type(model[1]) is QuantizedLinear  # 40 is no multiple of 16
    assert model(torch.randn(3, 32)).shape == (3, 40)


def _config(tmp_path: Path, **keys):
    from longcat_tuner.config.training import TrainConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "pretrained_model_name_or_path": str(tmp_path / "model"), "data_backend_config": str(tmp_path / "data.json"),
        "output_dir": str(tmp_path / "out"), "lora_rank": 32, "max_train_steps": 10, **keys,
    }))
    return TrainConfig.from_file(path)


def test_config_key_is_validated_and_refused_for_full_fine_tunes(tmp_path, tiny_checkpoint, monkeypatch):
    import longcat_tuner.model as model_package
    from longcat_tuner.model import loading
    from longcat_tuner.runtime import apply
    from longcat_tuner.train import trainer

    settings = MemorySettings.from_config(_config(tmp_path, base_model_precision="fp8-compute"))
    assert settings == FP8 and settings.quantized and settings.assembles_on_host
    with pytest.raises(ConfigError, match="base_model_precision"):
        _config(tmp_path, base_model_precision="fp8")
    with pytest.raises(ConfigError, match="fsdp"):
        _config(tmp_path, base_model_precision="fp8-compute", distributed_strategy="fsdp")

    def no_load(*args, **kwargs):
        raise AssertionError("the DiT was loaded before the refusal")

    monkeypatch.setattr(model_package, "load_dit", no_load)
    config = _config(tmp_path, pretrained_model_name_or_path=str(tiny_checkpoint), model_type="full",
                     base_model_precision="fp8-compute")
    with pytest.raises(ConfigError, match="no gradient"):
        trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    dit = loading.load_dit(tiny_checkpoint).requires_grad_(True)
    with pytest.raises(ConfigError, match="model_type 'lora'"):
        apply.prepare_base_weights(dit, FP8)
    assert not any(isinstance(m, QuantizedLinear) for m in dit.modules())


def test_the_planner_knows_it_and_the_automatic_plan_never_picks_it(tmp_path):
    from longcat_tuner.runtime import planner
    from longcat_tuner.runtime.auto import ClipShape, choose_plan
    from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

    bf16, storage = planner.estimate(planner.Setting()), planner.estimate(planner.Setting(precision="fp8-torchao"))
    fp8 = planner.estimate(planner.Setting(precision="fp8-compute"))
    assert fp8.memory_gib == storage.memory_gib  # the same stored weights
    assert "dequantize" not in fp8.step_parts_s and fp8.step_s < bf16.step_s
    speedup = planner.CALIBRATION["fp8_compute_linear_speedup"]
    assert fp8.step_parts_s["linear_and_elementwise"] == pytest.approx(
        bf16.step_parts_s["linear_and_elementwise"] / speedup, abs=0.01)
    shape = ClipShape(frames=93, height=480, width=832)
    for cap in (24, 36, 48, 80, None):
        config = _config(tmp_path, **({"max_gpu_memory_gib": cap} if cap else {}))
        plan = choose_plan(config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS), shape=shape,
                           cuda=True, card_gib=139.8)
        assert plan.settings.base_precision != "fp8-compute"
    config = _config(tmp_path, base_model_precision="fp8-compute", max_gpu_memory_gib=48)
    plan = choose_plan(config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS), shape=shape, cuda=True,
                       card_gib=139.8)
    assert plan.settings.base_precision == "fp8-compute" and plan.chosen_by["base_precision"] == "config"
    assert "base_model_precision fp8-compute" in plan.summary()


@pytest.mark.gpu
def test_cuda_float8_numerics_against_bf16(tiny_checkpoint, dit_cases):
    """On CUDA (rowwise-scaled `_scaled_mm`, bf16 output): one layer at a real width and the tiny DiT
    under bf16 autocast, forward and input gradient, against float32 math, next to bf16's own error."""
    torch.manual_seed(0)
    plain = nn.Linear(4096, 11008, device="cuda").requires_grad_(False)
    fp8 = nn.Linear(4096, 11008, device="cuda").requires_grad_(False)
    fp8.load_state_dict(plain.state_dict())
    convert_to_fp8_compute(nn.Sequential(fp8), targets=("0",))
    x = torch.randn(1000, 4096, device="cuda")  # 1,000 rows: no multiple of 16
    grad = torch.randn(1000, 11008, device="cuda")
    xa = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fp8(xa)
    out.backward(grad.bfloat16())
    ref = plain(x)
    ref_grad = grad @ plain.weight
    bf16_err = rel(F.linear(x.bfloat16(), plain.weight.bfloat16(), plain.bias.bfloat16()), ref)
    assert out.dtype == torch.bfloat16 and xa.grad.dtype == torch.float32
    assert rel(out, ref) < LAYER_BOUND and rel(xa.grad, ref_grad) < LAYER_BOUND and bf16_err < 0.01

    def run(settings):
        dit, _ = _tiny(tiny_checkpoint, settings, torch.bfloat16)  # prepared on the host, as `train` does
        apply_runtime(dit, MemorySettings(checkpointing="full", base_precision=settings.base_precision), "cuda")
        cases = {k: v.cuda() for k, v in dit_cases.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _backward(dit, cases)

    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = run(FP8), run(MemorySettings())
    # Against the bf16 DiT (CPU, bf16 autocast: output 0.013-0.016, input gradient 0.021-0.023 vs float32).
    assert rel(out, ref_out) < DIT_BOUND and rel(grad_x, ref_grad_x) < 0.05
    assert all(torch.isfinite(g).all() and float(g.abs().sum()) > 0 for g in grads.values())
    assert max(rel(grads[n], ref_grads[n]) for n in grads) < 0.3


@pytest.mark.gpu
def test_cuda_inductor_compiles_the_float8_layer():
    """torch.compile with Inductor (Triton quantization kernels, its own _scaled_mm lowering) on CUDA gives
    the eager float8 results."""
    from longcat_tuner.runtime.checkpointing import checkpointed_forward

    torch.manual_seed(0)
    fp8 = nn.Linear(1024, 3072, device="cuda").requires_grad_(False)
    convert_to_fp8_compute(nn.Sequential(fp8), targets=("0",))
    adapter = inject_lora(nn.Sequential(fp8), rank=8, targets=("0",))["0"]
    with torch.no_grad():
        adapter.up.normal_(0, 0.05)
    x = torch.randn(2, 333, 1024, device="cuda")

    def layer(t):
        return fp8(t)

    def grads(forward):
        adapter.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(xg)
        out.float().square().mean().backward()
        return out.float(), xg.grad, adapter.down.grad.clone(), adapter.up.grad.clone()

    eager = grads(checkpointed_forward(layer, "full"))
    torch._dynamo.reset()
    compiled = grads(torch.compile(checkpointed_forward(layer, "full")))
    for a, b in zip(compiled, eager):
        assert rel(a, b) < 0.01  # fused quantization may round a few elements differently

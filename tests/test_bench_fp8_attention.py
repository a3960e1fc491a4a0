"""The float8 attention probe (`bench/fp8_attention_probe.py`, measured and not kept in the product): its Triton
kernel through Triton's interpreter on the CPU, its quantization scheme against fp32 attention, its benchmark's CPU
run, and (gpu) the compiled kernel in bf16."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import fp8_attention_probe as fp8  # noqa: E402


def _reference(q, k, v):
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ v.float()


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _qkv(batch, heads, n_q, n_k, dim, seed=0, key_offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, dim, generator=gen)
    k = torch.randn(batch, heads, n_k, dim, generator=gen) + key_offset
    v = torch.randn(batch, heads, n_k, dim, generator=gen)
    return q, k, v


@pytest.mark.parametrize("shape", [(1, 2, 40, 16, 16), (2, 1, 19, 13, 32), (1, 1, 16, 5, 64)])
def test_one_key_tile_equals_the_emulation(shape):
    # With every key in one tile the kernel's running maximum is the row maximum: it must compute exactly what
    # the torch emulation does (the same quantized Q, K, V, and P offset to 2^8 and rounded to e4m3).
    q, k, v = _qkv(*shape)
    assert shape[3] <= fp8.INTERPRETER_CONFIG["BLOCK_N"]
    got = fp8.fp8_attention(q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, fp8.emulated_fp8_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 2, 40, 56, 16), (2, 1, 33, 47, 32)])
def test_many_key_tiles_stay_as_close_to_fp32_as_the_emulation(shape):
    # Ragged query and key tiles, several key tiles: the online softmax quantizes P against the running maximum,
    # so it differs from the emulation a little, but not in accuracy.
    q, k, v = _qkv(*shape)
    want = _reference(q, k, v)
    got_error = _rel(fp8.fp8_attention(q, k, v), want)
    emulated_error = _rel(fp8.emulated_fp8_attention(q, k, v), want)
    assert got_error < 0.08
    assert got_error < 1.25 * emulated_error + 0.005


def test_shared_key_offset_costs_no_accuracy():
    # A large offset shared by every key (common in trained models) would take the 8-bit range of K; the kernel
    # centres K first, which softmax does not see.
    q, k, v = _qkv(1, 2, 24, 40, 32, key_offset=0.0)
    shifted = k + 40.0 * torch.randn(1, 2, 1, 32, generator=torch.Generator().manual_seed(1))
    plain = _rel(fp8.fp8_attention(q, k, v), _reference(q, k, v))
    assert _rel(fp8.fp8_attention(q, shifted, v), _reference(q, shifted, v)) < plain + 0.01


def test_many_small_weights_are_not_flushed_to_zero():
    # One key dominates (weight 1) and 63 keys each weigh 2^-10 of it: below e4m3's smallest subnormal (2^-9)
    # unless P is offset, together 6% of the row. Their values are 1, the dominant key's 0.
    dim, n_small = 16, 63
    q = torch.zeros(1, 1, 1, dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n_small + 1, dim)
    k[0, 0, 0, 0] = 10 * math.log(2) * math.sqrt(dim)  # score 10 ln 2 above the others
    v = torch.ones(1, 1, n_small + 1, dim)
    v[0, 0, 0] = 0.0
    want = _reference(q, k, v)  # 63 * 2^-10 / (1 + 63 * 2^-10) ~= 0.058 in every channel
    got = fp8.fp8_attention(q, k, v)
    assert want[0, 0, 0, 0].item() == pytest.approx(0.058, abs=0.001)
    torch.testing.assert_close(got.float(), want, rtol=0.07, atol=0.0)


def test_it_refuses_gradients():
    q, k, v = _qkv(1, 1, 16, 16, 16)
    with pytest.raises(RuntimeError, match="no backward"):
        fp8.fp8_attention(q.requires_grad_(True), k, v)
    with torch.no_grad():
        fp8.fp8_attention(q, k, v)  # under no_grad a leaf that requires grad is fine


@pytest.mark.gpu
@pytest.mark.parametrize("exp16", [0, 1])
@pytest.mark.parametrize("n_q,n_k", [(4096, 4096), (1000, 3001)])
def test_gpu_kernel_bf16(n_q, n_k, exp16, monkeypatch):
    monkeypatch.setitem(fp8.KERNEL_CONFIG, "EXP16", exp16)
    if fp8.fp8_device_error("cuda"):
        pytest.skip(fp8.fp8_device_error("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = (1.5 * torch.randn(2, 4, n_q, 128, device="cuda", generator=gen)).bfloat16()
    k = (torch.randn(2, 4, n_k, 128, device="cuda", generator=gen) + 0.5).bfloat16()
    v = torch.randn(2, 4, n_k, 128, device="cuda", generator=gen).bfloat16()
    want = _reference(q, k, v)
    got = fp8.fp8_attention(q, k, v)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < 1.25 * _rel(fp8.emulated_fp8_attention(q, k, v), want) + 0.005
    assert _rel(got, want) < 0.08


def test_a_gpu_without_float8_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    why = fp8.fp8_device_error("cuda")
    assert "A100" in why and "8.9" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_device_error("cuda") is None and fp8.fp8_device_error("cpu") is None


def test_the_kernel_benchmark_runs_on_the_cpu(tmp_path):
    path = ROOT / "bench" / "bench_fp8_attention.py"
    spec = importlib.util.spec_from_file_location("bench_fp8_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payload = bench.main(["--tiny", "--out", str(tmp_path)])
    tiny = payload["results"]["tiny"]
    assert 0 < tiny["fp8_error"] < 0.08 and tiny["fp8_s"] > 0
    assert (tmp_path / "fp8_attention.json").is_file()

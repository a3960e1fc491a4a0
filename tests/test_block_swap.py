"""Block swap mechanics on CPU (which tensors move, when, in which order) and exactness vs no swap."""
from __future__ import annotations

import gc

import pytest
import torch

from longcat_tuner.errors import ConfigError
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.dit import LongCatDiT
from longcat_tuner.model.lora import inject_lora
from longcat_tuner.runtime.block_swap import apply_block_swap
from longcat_tuner.runtime.checkpointing import apply_gradient_checkpointing

CONFIG = DiTConfig(hidden_size=64, depth=4, num_heads=2, caption_channels=16, adaln_tembed_dim=16)


def make_model(seed: int = 0) -> LongCatDiT:
    torch.manual_seed(seed)
    dit = LongCatDiT(CONFIG)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    inject_lora(dit, rank=4)
    with torch.no_grad():  # non-zero up weights so LoRA gradients flow into `down` too
        for name, p in dit.named_parameters():
            if name.endswith(".up"):
                p.normal_(0, 0.05)
    return dit


def inputs():
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 4, generator=g)
    t = torch.tensor([[0.0, 500.0, 500.0]])
    text = torch.randn(1, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    return latents, t, text, mask


def run_step(dit):
    latents, t, text, mask = inputs()
    out = dit(latents, t, text, mask, num_cond_latents=1)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("order", ["swap_then_checkpoint", "checkpoint_then_swap", "no_checkpoint"])
def test_outputs_and_gradients_equal_no_swap(order):
    reference = make_model()
    apply_gradient_checkpointing(reference)
    ref_out, ref_grads = run_step(reference)

    dit = make_model()
    events = []
    if order == "checkpoint_then_swap":
        apply_gradient_checkpointing(dit)
    handle = apply_block_swap(dit, 3, compute_device="cpu", on_transfer=lambda kind, i: events.append((kind, i)))
    if order == "swap_then_checkpoint":
        apply_gradient_checkpointing(dit)
    out, grads = run_step(dit)

    assert torch.equal(out, ref_out)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    loads = [i for kind, i in events if kind == "load"]
    if order == "no_checkpoint":
        # Weights saved by autograd stay resident from forward to backward: one load per block.
        assert loads == [1, 2, 3]
    else:
        # Forward loads 1,2,3 in order; backward recomputes 3 (kept), then 2 and 1 in reverse.
        assert loads == [1, 2, 3, 2, 1]
    assert handle.resident_blocks() == []
    handle.remove()


def test_only_frozen_base_tensors_move():
    dit = make_model()
    handle = apply_block_swap(dit, 2, compute_device="cpu")
    for i, block in enumerate(dit.blocks):
        for name, p in block.named_parameters():
            if "lora_adapters" in name:
                assert p.numel() > 0 and p.requires_grad, name  # adapters never leave
            elif i >= 2:
                assert p.numel() == 0, name  # evicted placeholder
            else:
                assert p.numel() > 0, name
    reference = make_model()
    assert handle.swapped_bytes == sum(
        p.numel() * p.element_size() for b in reference.blocks[2:] for n, p in b.named_parameters() if "lora" not in n
    )
    # The host copies hold the real weights: removing restores an identical model.
    handle.remove()
    for (n1, p1), (n2, p2) in zip(dit.named_parameters(), reference.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_sampling_pass_evicts_after_each_block():
    dit = make_model()
    reference = make_model()
    events = []
    handle = apply_block_swap(dit, 4, compute_device="cpu", on_transfer=lambda kind, i: events.append((kind, i)))
    latents, t, text, mask = inputs()
    with torch.no_grad():
        out = dit(latents, t, text, mask, num_cond_latents=1)
        ref = reference(latents, t, text, mask, num_cond_latents=1)
    assert torch.equal(out, ref)
    # Prefetch keeps at most two blocks resident: load i+1 before evicting i.
    assert events[:4] == [("load", 0), ("load", 1), ("evict", 0), ("load", 2)]
    assert handle.resident_blocks() == []


def test_trainable_base_weights_are_refused():
    dit = LongCatDiT(CONFIG)  # full fine-tune: every weight trainable
    with pytest.raises(ConfigError, match="frozen weights only"):
        apply_block_swap(dit, 1, compute_device="cpu")
    with pytest.raises(ConfigError, match="has 4 blocks"):
        apply_block_swap(make_model(), 5, compute_device="cpu")


@pytest.mark.gpu
def test_gpu_swap_is_exact_and_saves_memory():
    device = torch.device("cuda")
    cfg = DiTConfig(hidden_size=2048, depth=6, num_heads=16, caption_channels=64, adaln_tembed_dim=64)

    def build():
        torch.manual_seed(0)
        dit = LongCatDiT(cfg).to(device, torch.bfloat16)
        with torch.no_grad():
            for p in dit.parameters():
                p.normal_(0, 0.02)
        inject_lora(dit, rank=8)
        apply_gradient_checkpointing(dit)
        # SDPA's fused backward kernels accumulate with atomics (not bitwise reproducible run to run);
        # the plain-matmul backend is, so swap vs no swap can be compared exactly.
        dit.set_attention_backend("reference")
        return dit

    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, 16, 5, 32, 32, generator=g, device=device)
    t = torch.full((1, 5), 400.0, device=device)
    t[:, 0] = 0
    text = torch.randn(1, 16, 64, generator=g, device=device)
    mask = torch.ones(1, 16, device=device, dtype=torch.long)

    def step(dit):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = dit(latents, t, text, mask, num_cond_latents=1)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
        return out.detach(), grads, torch.cuda.max_memory_allocated()

    reference = build()
    ref_out, ref_grads, ref_peak = step(reference)
    # Checkpointing wraps bound methods (a reference cycle): collect the model before measuring the next.
    del reference
    gc.collect()
    torch.cuda.empty_cache()
    dit = build()
    handle = apply_block_swap(dit, 5, compute_device=device)
    out, grads, peak = step(dit)
    assert torch.equal(out, ref_out)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    print(f"peak without swap {ref_peak / 2**20:.0f} MiB, with 5 of 6 blocks swapped {peak / 2**20:.0f} MiB, "
          f"swapped weights {handle.swapped_bytes / 2**20:.0f} MiB")
    assert peak < ref_peak - 0.5 * handle.swapped_bytes, (peak, ref_peak, handle.swapped_bytes)


def test_selective_checkpointing_with_swap_is_exact(monkeypatch):
    from longcat_tuner.runtime import selective_checkpoint
    from longcat_tuner.runtime.checkpointing import remove_gradient_checkpointing
    from longcat_tuner.runtime.selective_checkpoint import apply_selective_checkpointing

    monkeypatch.setattr(selective_checkpoint, "SAVE_MIN_KEYS", 8)  # keep the noisy call (12 keys) only
    reference = make_model()
    apply_gradient_checkpointing(reference)
    ref_out, ref_grads = run_step(reference)
    dit = make_model()
    assert apply_selective_checkpointing(dit, save_attention_blocks=2) == 2
    handle = apply_block_swap(dit, 2, compute_device="cpu")
    out, grads = run_step(dit)
    assert torch.equal(out, ref_out)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    handle.remove()

    # Backward recomputes attention only in the blocks that do not keep it: count the kernel calls.
    def attention_calls(model) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = []

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "scaled_dot_product" in str(func) and "backward" not in str(func):
                    calls.append(func)
                return func(*args, **(kwargs or {}))

        with Count():
            run_step(model)
        return len(calls)

    # 4 blocks x 3 attention calls (condition, noisy, cross) forward; backward recomputes all three in
    # plain blocks and all but the noisy call in the 2 selective ones.
    assert attention_calls(dit) == 12 + 2 * 2 + 2 * 3
    remove_gradient_checkpointing(dit)
    apply_gradient_checkpointing(dit)
    assert attention_calls(dit) == 12 + 12


def test_offloaded_checkpointing_with_swap_is_exact():
    from longcat_tuner.runtime.selective_checkpoint import apply_offloaded_checkpointing

    reference = make_model()
    apply_gradient_checkpointing(reference)
    ref_out, ref_grads = run_step(reference)
    dit = make_model()
    assert apply_offloaded_checkpointing(dit) == 4
    events = []
    handle = apply_block_swap(dit, 3, compute_device="cpu", on_transfer=lambda kind, i: events.append((kind, i)))
    out, grads = run_step(dit)
    assert torch.equal(out, ref_out)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    assert [i for kind, i in events if kind == "load"] == [1, 2, 3, 2, 1]
    handle.remove()


def test_place_with_swapped_blocks_leaves_only_swapped_frozen_weights_on_the_host(tiny_checkpoint):
    """A model bigger than the GPU is placed block by block; 'meta' stands in for the GPU here."""
    from longcat_tuner import inject_lora, load_dit
    from longcat_tuner.runtime.block_swap import place_with_swapped_blocks

    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=2)
    place_with_swapped_blocks(dit, "meta", 1)
    for name, param in dit.named_parameters():
        swapped_base = name.startswith("blocks.1.") and "lora_adapters" not in name
        assert param.device.type == ("cpu" if swapped_base else "meta"), name

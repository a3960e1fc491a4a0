"""Benchmark: one LoRA training step of the full 13.6B DiT at 480x832x93 I2V on one GPU, printed as JSON.

Random bf16 weights built straight on the GPU, rank-32 adapters (float32) on the default targets, bf16
autocast as in the trainer, the trainer's flow-matching loss, AdamW on the adapters. Each run varies:

Every run goes through `longcat_tuner.runtime.apply_runtime` with the `MemorySettings` its spec names
(`memory_settings`), the code path of `train` and `sample`:

* `ckpt`: `full` (gradient_checkpointing_mode full: recompute the whole block), `attn` (keep_attention:
  keep attention outputs, recompute the rest; `keep` limits it to the first k blocks) or `offload`
  (recompute the whole block, block inputs kept in pinned host memory);
* `sdpa`: the SDPA kernel asked for first (`cudnn` or `flash`);
* `compile`: `inner` (compile_scope block: torch.compile of the block forward inside the checkpoint) or
  `outer` (compile_scope checkpointed_block), empty for eager;
* `swap`: blocks streamed from pinned host memory (runtime/block_swap.py);
* `precision`: `bf16` or `fp8-torchao` / `int8-quanto` base weights (runtime/quantize.py);
* `lora`: `fused` (the adapter's up projection accumulates into the layer output in one GEMM, as the
  package does) or `separate` (update, scale and add as separate passes: the baseline before it).

Usage: `python bench/bench_train_step.py --suite speed|ladder [--steps 2] [--warmup 1]` or
`--run ckpt=attn,swap=8 ...`. Results go to `$OUT/<name>.json` (or bench/results/).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    H100_BF16_PEAK_TFLOPS,
    LATENT_SHAPE,
    block_sparse_kept,
    environment,
    gib,
    i2v_inputs,
    lora_train_flops,
    random_dit,
    select_sdpa_backend,
    sync_time,
    write_result,
)
from longcat_tuner.model.config import DiTConfig  # noqa: E402
from longcat_tuner.model.lora import inject_lora  # noqa: E402
from longcat_tuner.runtime import AppliedRuntime, MemorySettings, apply_runtime, prepare_base_weights  # noqa: E402
from longcat_tuner.train.step import flow_matching_loss  # noqa: E402

SUITES = {
    "speed": [
        "ckpt=full,sdpa=cudnn,compile=inner",
        "ckpt=attn,sdpa=cudnn,swap=12,compile=inner",
    ],
    "ladder": [
        f"ckpt={ckpt},sdpa=cudnn,swap={n},precision={p}"
        for p in ("bf16", "fp8-torchao")
        for ckpt, n in (("full", 0), ("full", 16), ("full", 32), ("full", 47))
    ] + ["ckpt=offload,sdpa=cudnn,swap=47,precision=fp8-torchao"],
}
DEFAULTS = {"name": "", "ckpt": "full", "sdpa": "cudnn", "compile": "", "swap": "0", "precision": "bf16", "keep": "", "rank": "32",
            "lora": "fused"}


def _separate_add_to(self, output, x):
    """The baseline: the update in autocast's dtype, then cast, then a separate add."""
    return output + self(x).to(output.dtype)


def select_lora_apply(kind: str) -> None:
    from longcat_tuner.model.lora import LoRAAdapter

    if kind not in ("fused", "separate"):
        raise SystemExit(f"lora must be fused or separate, got {kind}")
    if not hasattr(LoRAAdapter, "_fused_add_to"):
        LoRAAdapter._fused_add_to = LoRAAdapter.add_to
    LoRAAdapter.add_to = LoRAAdapter._fused_add_to if kind == "fused" else _separate_add_to


def parse_run(spec: str) -> dict:
    run = dict(DEFAULTS)
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown run key '{key}' in '{spec}'; keys: {', '.join(DEFAULTS)}")
        run[key] = value
    run["name"] = spec
    return run


def memory_settings(run: dict) -> MemorySettings:
    """The run spec as the `MemorySettings` that `train` would apply for the same config keys."""
    modes = {"full": "full", "attn": "keep_attention", "offload": "offload_inputs"}
    if run["ckpt"] not in modes:
        raise SystemExit(f"ckpt must be full, attn or offload, got {run['ckpt']}")
    if run["compile"] not in ("", "inner", "outer"):
        raise SystemExit(f"compile must be inner, outer or empty, got {run['compile']}")
    mode = modes[run["ckpt"]]
    return MemorySettings(
        checkpointing=mode,
        keep_attention_blocks=int(run["keep"]) if run["keep"] and mode == "keep_attention" else None,
        compile_blocks=bool(run["compile"]),
        compile_scope="checkpointed_block" if run["compile"] == "outer" else "block",
        blocks_to_swap=int(run["swap"]),
        base_precision="no_change" if run["precision"] == "bf16" else run["precision"],
    )


def apply_run(dit, run: dict, device="cuda") -> AppliedRuntime:
    """What `train` does to its DiT for these settings: `runtime.apply_runtime` (undone with `.remove()`)."""
    return apply_runtime(dit, memory_settings(run), device)


def one_step(dit, optimizer, inputs) -> float:
    latents, text, mask = inputs
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(latents.shape, generator=gen, device="cuda")
    sigma = torch.tensor([0.7], device="cuda")
    loss = flow_matching_loss(dit, latents, noise, sigma, text, mask, 1, autocast_dtype=torch.bfloat16)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def bench_run(dit, run: dict, inputs, *, steps: int, warmup: int, config: DiTConfig,
              settings: MemorySettings | None = None, memory_fraction: float | None = None,
              self_attention_kept: float = 1.0) -> dict:
    """One run: `settings` (default: the spec's) through `apply_runtime`, `warmup` + `steps` timed steps.
    FLOPs (MFU) are counted at the inputs' latent shape; `self_attention_kept` < 1 for block-sparse attention
    (`common.block_sparse_kept`)."""
    select_sdpa_backend(run["sdpa"])
    select_lora_apply(run["lora"])
    settings = settings or memory_settings(run)
    applied = apply_runtime(dit, settings, "cuda")
    gc.collect()
    torch.cuda.empty_cache()
    if memory_fraction is not None:  # as `train` enforces max_gpu_memory_gib (set once the model is placed)
        torch.cuda.set_per_process_memory_fraction(memory_fraction)
    swap = applied.swap
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    result = {"run": run, "settings": settings.config_values()}
    try:
        t0 = sync_time()
        losses = [one_step(dit, optimizer, inputs) for _ in range(warmup)]
        result["warmup_s"] = round(sync_time() - t0, 2)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = sync_time()
            losses.append(one_step(dit, optimizer, inputs))
            times.append(sync_time() - t0)
        step_s = sorted(times)[len(times) // 2]
        flops = lora_train_flops(config, tuple(inputs[0].shape),
                                 recompute="attention_saved" if settings.checkpointing == "keep_attention" else "full",
                                 self_attention_kept=self_attention_kept)
        result.update(
            step_s=round(step_s, 3),
            step_times_s=[round(t, 3) for t in times],
            peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
            peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
            model_tflop=round(flops["model"] / 1e12, 1),
            hardware_tflop=round(flops["hardware"] / 1e12, 1),
            mfu=round(flops["model"] / step_s / 1e12 / H100_BF16_PEAK_TFLOPS, 3),
            hfu=round(flops["hardware"] / step_s / 1e12 / H100_BF16_PEAK_TFLOPS, 3),
            losses=[round(x, 4) for x in losses],
            swapped_gib=gib(swap.swapped_bytes) if swap else 0.0,
        )
    except torch.OutOfMemoryError as err:
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
    except Exception as err:  # keep the other runs of the suite going
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    finally:
        del optimizer
        for p in params:
            p.grad = None
        if memory_fraction is not None:  # the swapped blocks come back to the GPU: the cap is lifted first
            torch.cuda.set_per_process_memory_fraction(1.0)
        applied.remove()
        gc.collect()
        torch.cuda.empty_cache()
    return result


def sdpa_check() -> list[dict]:
    """Time the noisy self-attention call (35,880 queries x 37,440 keys) per SDPA kernel and q/k/v layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, n_cond, heads, dim = 37440, 1560, 32, 128
    qkv = torch.randn(1, n, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    rows = []
    for layout in ("model_strided", "contiguous"):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q = q[:, :, n_cond:]
        if layout == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    def fwd():
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    out = fwd()
                    grad = torch.randn_like(out)
                    for _ in range(2):
                        fwd().backward(grad)
                    t0 = sync_time()
                    for _ in range(3):
                        with torch.no_grad():
                            fwd()
                    t_fwd = (sync_time() - t0) / 3
                    t0 = sync_time()
                    for _ in range(3):
                        fwd().backward(grad)
                    t_both = (sync_time() - t0) / 3
                flop = 4 * (n - n_cond) * n * heads * dim
                rows.append({"layout": layout, "kernel": name, "fwd_ms": round(t_fwd * 1e3, 1),
                             "fwd_bwd_ms": round(t_both * 1e3, 1), "fwd_tflops": round(flop / t_fwd / 1e12),
                             "bwd_tflops": round(2 * flop / (t_both - t_fwd) / 1e12)})
            except Exception as err:
                rows.append({"layout": layout, "kernel": name, "error": str(err)[:200]})
            print(json.dumps(rows[-1]), flush=True)
            q.grad = k.grad = v.grad = None
    return rows


def profile_blocks(depth: int = 2) -> str:
    """Kernel-time table of one eager LoRA step of a `depth`-block model (full checkpointing, cuDNN)."""
    from torch.profiler import ProfilerActivity, profile

    config = DiTConfig(depth=depth)
    dit = random_dit(config)
    inject_lora(dit, rank=32, dtype=torch.float32)
    select_sdpa_backend("cudnn")
    apply_runtime(dit, MemorySettings(checkpointing="full"), "cuda")
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-4)
    inputs = i2v_inputs()
    one_step(dit, optimizer, inputs)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_step(dit, optimizer, inputs)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    del dit, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return table


GUIDE_CONFIG = {  # the quick-start guide's keys (shared/seed): what a user pastes
    "model_family": "longcat_video", "model_type": "lora", "train_batch_size": 1, "gradient_checkpointing": True,
    "lora_rank": 8, "learning_rate": 1e-4, "validation_resolution": "480x832", "validation_num_video_frames": 93,
}


def plan_caps(caps: list[float], *, steps: int, warmup: int, depth: int | None, baseline: bool = True,
              height: int = 480, width: int = 832, attention: str = "auto") -> dict:
    """For each cap (0: the whole card), the plan `train` would choose for the guide's config at
    `height`x`width`x93 (`attention`: the config's attention_implementation, planned as `train` plans it),
    run through `apply_runtime` under PyTorch's per-process memory fraction, beside the config as pasted."""
    from importlib.util import find_spec

    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.runtime.allocator import expandable_in_use
    from longcat_tuner.runtime.auto import ClipShape, choose_plan, uses_block_sparse
    from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    config = DiTConfig() if depth is None else DiTConfig(depth=depth)
    dit = random_dit(config)
    dit.set_attention_backend(attention)
    inject_lora(dit, rank=GUIDE_CONFIG["lora_rank"], dtype=torch.float32)
    latent_shape = (1, 16, LATENT_SHAPE[2], height // 8, width // 8)
    inputs = i2v_inputs(latent_shape=latent_shape)
    shape = ClipShape(frames=93, height=height, width=width)
    block_sparse = uses_block_sparse(attention, shape, enable_bsa=config.enable_bsa, chunk=tuple(config.bsa_chunk_k),
                                     triton=find_spec("triton") is not None)
    kept = block_sparse_kept(config, latent_shape) if block_sparse else 1.0
    rows = []
    base = {"pretrained_model_name_or_path": "model", "data_backend_config": "data.json", "output_dir": "out",
            "max_train_steps": 10, **GUIDE_CONFIG, "attention_implementation": attention}
    pasted = TrainConfig.model_validate(base)
    if baseline:
        rows.append({"cap_gib": None, "plan": "config as pasted (no plan)",
                     **bench_run(dit, parse_run("name=pasted"), inputs, steps=steps, warmup=warmup, config=config,
                             settings=MemorySettings.from_config(pasted), self_attention_kept=kept)})
        print(json.dumps(rows[-1]), flush=True)
    for cap in caps:
        train_config = TrainConfig.model_validate({**base, **({"max_gpu_memory_gib": cap} if cap else {})})
        # As `train` plans for the guide's config: its allocator, and one validation video (CFG: batch 2).
        plan = choose_plan(train_config, explicit=train_config.model_fields_set & set(MEMORY_CONFIG_KEYS),
                           shape=shape, cuda=True, card_gib=card_gib,
                           compile_ok=find_spec("triton") is not None, expandable_segments=expandable_in_use(),
                           validation=ClipShape(frames=93, height=480, width=832, batch=2),
                           block_sparse=block_sparse, bsa_sparsity=config.bsa_sparsity)
        if plan.settings.quantized:
            prepare_base_weights(dit, plan.settings)  # one way: 8-bit plans come last (smallest caps)
        # bench_run lifts the cap again before it undoes the runtime.
        result = bench_run(dit, parse_run(f"name=cap{cap or 'card'}"), inputs, steps=steps, warmup=warmup,
                           config=config, settings=plan.settings, memory_fraction=min(1.0, (cap or card_gib) / card_gib),
                           self_attention_kept=kept)
        rows.append({"cap_gib": cap or None, "plan": plan.to_event(), **result})
        print(json.dumps(rows[-1]), flush=True)
        write_result("train_step_plan_caps", {"benchmark": "lora_train_step_auto_plan", "card_gib": round(card_gib, 1),
                                              "setting": {"latents": list(latent_shape), **GUIDE_CONFIG,
                                                          "attention_implementation": attention,
                                                          "planned_block_sparse": block_sparse},
                                              "environment": environment(), "results": rows})
    return {"results": rows}


def main() -> int:
    from longcat_tuner.runtime.allocator import use_default_allocator

    use_default_allocator()  # the allocator `train` sets up, before CUDA starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--run", nargs="*", default=[], help="run specs such as ckpt=attn,swap=8")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--name", default=None, help="result file name (default: train_step_<suite>)")
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks for a quick check")
    parser.add_argument("--sdpa-check", action="store_true", help="time SDPA kernels on the noisy-call shape")
    parser.add_argument("--profile", type=int, default=0, help="print a kernel table of a model with this many blocks")
    parser.add_argument("--plan-caps", default=None,
                        help="comma list of max_gpu_memory_gib caps (0: whole card): run the plan train chooses for each")
    parser.add_argument("--no-baseline", action="store_true", help="with --plan-caps: skip the config-as-pasted run")
    parser.add_argument("--resolution", default="480x832", help="with --plan-caps: the training clip, HEIGHTxWIDTH (93 frames)")
    parser.add_argument("--attention", default="auto", help="with --plan-caps: attention_implementation (e.g. block_sparse)")
    args = parser.parse_args()
    if args.plan_caps:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
        caps = [float(c) for c in args.plan_caps.split(",")]
        height, width = (int(side) for side in args.resolution.lower().split("x"))
        plan_caps(caps, steps=args.steps, warmup=args.warmup, depth=args.depth, baseline=not args.no_baseline,
                  height=height, width=width, attention=args.attention)
        return 0
    if args.sdpa_check:
        write_result("sdpa_check", {"benchmark": "sdpa_noisy_call", "results": sdpa_check()})
    if args.profile:
        table = profile_blocks(args.profile)
        print(table)
        out = Path(__import__("os").environ.get("OUT", "."))
        (out / "profile.txt").write_text(table)
    specs = (SUITES[args.suite] if args.suite else []) + args.run
    if not specs:
        return 0
    runs = [parse_run(s) for s in specs]
    config = DiTConfig() if args.depth is None else DiTConfig(depth=args.depth)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    t0 = time.perf_counter()
    dit = random_dit(config)
    inject_lora(dit, rank=int(runs[0]["rank"]), dtype=torch.float32)
    build_s = time.perf_counter() - t0
    inputs = i2v_inputs()
    results = []
    precision = "bf16"
    for run in runs:
        if run["precision"] != precision:
            if precision != "bf16":
                raise SystemExit("runs must list bf16 before one quantized precision")
            t1 = time.perf_counter()
            prepare_base_weights(dit, memory_settings(run))  # the frozen base weights only, as in `train`
            torch.cuda.empty_cache()
            print(f"quantized to {run['precision']} in {time.perf_counter() - t1:.1f}s", flush=True)
            precision = run["precision"]
        result = bench_run(dit, run, inputs, steps=args.steps, warmup=args.warmup, config=config)
        results.append(result)
        print(json.dumps(result), flush=True)
    payload = {
        "benchmark": "lora_train_step",
        "setting": {
            "latents": list(LATENT_SHAPE), "text": [1, 512, 4096], "num_cond_latents": 1, "lora_rank": int(runs[0]["rank"]),
            "depth": config.depth, "autocast": "bf16", "optimizer": "AdamW (adapters, float32)",
        },
        "flops_note": "model FLOPs = forward + frozen-linear input grads + attention backward (2x fwd); "
                      "hardware adds checkpoint recompute; MFU against 989 TFLOP/s bf16",
        "model_build_s": round(build_s, 1),
        "results": results,
    }
    path = write_result(args.name or f"train_step_{args.suite or 'custom'}", payload)
    print(f"{'run':55s} {'s/step':>8s} {'peak GiB':>9s} {'MFU':>6s}")
    for r in results:
        print(f"{r['run']['name']:55s} {r.get('step_s', float('nan')):8.2f} {r.get('peak_allocated_gib', float('nan')):9.2f} "
              f"{r.get('mfu', float('nan')):6.3f} {r.get('error', '')[:60]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

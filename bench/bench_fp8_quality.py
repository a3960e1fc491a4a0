"""Quality of `base_model_precision: fp8-compute` (float8 matmuls of the frozen linears) against bf16. Prints JSON.

Three measurements, all on one device (default the CPU; `--device cuda` runs the same code on a GPU):

* `layers`: relative L2 error against float32 math of one frozen linear's output and input gradient, for
  bf16 (weights and activations), `fp8-torchao` (float8 weight, bf16 matmul) and `fp8-compute`, with the
  gradient quantized to e4m3 (the choice, `runtime/fp8_compute.py`) or e5m2. Inputs and output
  gradients are captured from a backward pass of the DiT below (real activations of a random model), plus
  one Gaussian layer at the 13.6B width (4096 -> 4096).
* `dit`: relative error of the DiT output, its input gradient and the LoRA gradients against float32,
  for bf16 and fp8-compute (both under bf16 autocast, as training runs on CUDA), on the tiny reference
  checkpoint (`../shared/reference/longcat-tiny`) and the random "small" size.
* `training`: LoRA training runs through the trainer's own step (`train.step.training_loss`, AdamW from
  `train.optim`, the runtime's `prepare_base_weights` / `apply_runtime`; no checkpointing: it gives the same
  gradients, tests/test_fp8_compute.py) on a
  fixed synthetic latent dataset (image-to-video: the first latent frame is the condition):
  `bf16` and `fp8-compute` with the same seed (same data order, sigmas, noise and adapter init), and
  bf16's own run-to-run differences to compare with: `bf16-init1` (same data, sigmas and noise, another
  adapter init) and `bf16-seed1` (another seed for everything); `--fp32-run` adds float32 for scale.
  Every `--eval-every` steps each run's loss at fixed sigmas and fixed noise over the whole dataset
  (`train.step.heldout_loss`) is recorded; at the end every run's adapters are also evaluated in float32.
  The CPU is slow at bf16 matmuls (about 1 s a step here on a shared 2-core machine), hence the small
  defaults (tiny reference DiT, 4 clips of 3x8x8 latents: 48 tokens).

* `large_dit` (`--large-dit full --device cuda`): the same comparison on a DiT with random weights of
  the 13.6B shapes (bench/common.py's `random_dit`) at `--large-latent`, fp8-compute against bf16.

  python bench/bench_fp8_quality.py --out bench/results/fp8_quality-DATE-cpu.json
  python bench/bench_fp8_quality.py --device cuda --large-dit full --skip-training   # the full-size error
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_tuner.model.loading import load_dit  # noqa: E402
from longcat_tuner.model.lora import inject_lora  # noqa: E402
from longcat_tuner.model.random_checkpoint import SIZES, write_dit  # noqa: E402
from longcat_tuner.runtime import MemorySettings, apply_runtime, prepare_base_weights  # noqa: E402
from longcat_tuner.runtime import fp8_compute  # noqa: E402
from longcat_tuner.runtime.fp8_compute import convert_to_fp8_compute  # noqa: E402
from longcat_tuner.runtime.quantize import quantize_base_weights  # noqa: E402
from longcat_tuner.train.optim import build_optimizer  # noqa: E402
from longcat_tuner.train.step import FlowBatch, heldout_loss, training_loss  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "shared" / "reference" / "longcat-tiny"
EVAL_SIGMAS = [0.25, 0.5, 0.75, 0.9]
LAYERS = ("attn.qkv", "attn.proj", "ffn.w1", "ffn.w2")  # captured in block 1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def r4(value: float) -> float:
    return float(f"{value:.4g}")


# --- models --------------------------------------------------------------------------------------------


def model_root(name: str, folder: Path) -> Path:
    if name == "tiny":
        if not TINY.is_dir():
            raise SystemExit(f"the tiny reference checkpoint {TINY} is missing; use --model small")
        return TINY
    write_dit(folder / "dit", SIZES[name], seed=0)
    return folder


def prepared_dit(root: Path, precision: str, device: torch.device, *, lora_seed: int, rank: int,
                 checkpointing: str = "none", up_std: float = 0.0):
    """The DiT as `train` prepares it: base dtype, 8-bit/float8 layers, fp32 adapters, runtime applied."""
    base = torch.float32 if precision == "fp32" else torch.bfloat16
    dit = load_dit(root, dtype=base)
    settings = MemorySettings(checkpointing=checkpointing,
                              base_precision=precision if precision == "fp8-compute" else "no_change")
    prepare_base_weights(dit, settings)
    torch.manual_seed(lora_seed)
    adapters = inject_lora(dit, rank=rank, dtype=torch.float32)
    if up_std:
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.up.normal_(0, up_std)
    apply_runtime(dit, settings, device)
    return dit


def autocast_for(precision: str) -> Optional[torch.dtype]:
    return None if precision == "fp32" else torch.bfloat16


# --- data ----------------------------------------------------------------------------------------------


def synthetic_dataset(dit, count: int, latent_shape: tuple[int, int, int], device: torch.device, seed: int = 123):
    """`count` fixed clips: smooth latents (low-resolution noise upsampled) and a random caption each."""
    g = torch.Generator().manual_seed(seed)
    frames, height, width = latent_shape
    items = []
    for _ in range(count):
        coarse = torch.randn(1, 16, frames, max(1, height // 4), max(1, width // 4), generator=g)
        latents = F.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=False) * 1.5
        cond = latents[:, :, :1] + 0.05 * torch.randn(1, 16, 1, height, width, generator=g)
        text = torch.randn(1, 16, dit.config.caption_channels, generator=g)
        mask = torch.zeros(1, 16, dtype=torch.long)
        mask[:, : int(torch.randint(6, 16, (1,), generator=g))] = 1
        items.append(FlowBatch(latents.to(device), text.to(device), mask.to(device), cond.to(device)))
    return items


# --- layers --------------------------------------------------------------------------------------------


def capture_layer_io(root: Path, device: torch.device, dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor, nn.Linear]]:
    """(input, output gradient, float32 layer) of block 1's LAYERS from one float32 backward of the DiT."""
    dit = prepared_dit(root, "fp32", device, lora_seed=0, rank=4)
    captured: dict[str, list] = {}
    handles = []
    for name in LAYERS:
        layer = dit.blocks[1].get_submodule(name)

        def forward_hook(module, inputs, output, name=name):
            captured[name] = [inputs[0].detach()]
            output.register_hook(lambda grad, name=name: captured[name].append(grad.detach()))

        handles.append(layer.register_forward_hook(forward_hook))
    batch = dataset[0]
    generator = torch.Generator().manual_seed(0)
    training_loss(dit, batch, generator=generator, shift=12.0, distribution="uniform").backward()
    for handle in handles:
        handle.remove()
    out = {}
    for name in LAYERS:
        source = dit.blocks[1].get_submodule(name)
        layer = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None, device=device)
        with torch.no_grad():
            layer.weight.copy_(source.weight)
            if source.bias is not None:
                layer.bias.copy_(source.bias)
        layer.requires_grad_(False)
        x, grad = captured[name]
        out[name] = (x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]), layer)
    return out


def layer_errors(x: torch.Tensor, grad: torch.Tensor, layer: nn.Linear) -> dict[str, float]:
    """Relative errors of the output and input gradient of `layer` at `x` under each scheme, vs float32."""
    ref_out = layer(x)
    ref_grad = grad @ layer.weight
    result = {"rows": x.shape[0], "in": layer.in_features, "out": layer.out_features}
    bias16 = None if layer.bias is None else layer.bias.bfloat16()
    result["bf16_out"] = r4(rel(F.linear(x.bfloat16(), layer.weight.bfloat16(), bias16), ref_out))
    result["bf16_grad"] = r4(rel(grad.bfloat16() @ layer.weight.bfloat16(), ref_grad))

    def converted(kind: str) -> nn.Linear:
        copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=x.device)
        copy.load_state_dict(layer.state_dict())
        copy.requires_grad_(False)
        holder = nn.Sequential(copy)
        if kind == "fp8-torchao":
            quantize_base_weights(holder, kind, targets=("0",))
        else:
            convert_to_fp8_compute(holder, targets=("0",))
        return holder[0]

    for kind in ("fp8-torchao", "fp8-compute"):
        module = converted(kind)
        xg = x.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = module(xg)
        out.backward(grad.to(out.dtype))
        result[f"{kind}_out"] = r4(rel(out, ref_out))
        result[f"{kind}_grad"] = r4(rel(xg.grad, ref_grad))
        if kind == "fp8-compute":
            chosen = fp8_compute.GRAD_DTYPE
            try:
                fp8_compute.GRAD_DTYPE = torch.float8_e5m2
                xg = x.clone().requires_grad_()
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    out = module(xg)
                out.backward(grad.to(out.dtype))
                result["fp8-compute_grad_e5m2"] = r4(rel(xg.grad, ref_grad))
            finally:
                fp8_compute.GRAD_DTYPE = chosen
    return result


# --- whole DiT -----------------------------------------------------------------------------------------


def dit_errors(root: Path, device: torch.device, dataset) -> dict[str, dict[str, float]]:
    """Output / input-gradient / LoRA-gradient relative errors vs float32 (LoRA `up` drawn non-zero)."""
    batch = dataset[0]
    results = {}
    runs = {}
    for precision in ("fp32", "bf16", "fp8-compute"):
        dit = prepared_dit(root, precision, device, lora_seed=0, rank=4, up_std=0.02)
        x0 = batch.latents.float()
        g = torch.Generator().manual_seed(5)
        noise = torch.randn(x0.shape, generator=g).to(device)
        model_input = (0.3 * x0 + 0.7 * noise).requires_grad_()
        timesteps = torch.full((1, x0.shape[2]), 700.0, device=device)
        timesteps[:, 0] = 0.0
        dtype = autocast_for(precision)
        with (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
            out = dit(model_input, timesteps, batch.text_embeds, batch.text_mask, num_cond_latents=1).float()
        (out[:, :, 1:] - (noise - x0)[:, :, 1:]).pow(2).mean().backward()
        runs[precision] = (out.detach(), model_input.grad,
                           {n: p.grad.float() for n, p in dit.named_parameters() if p.requires_grad})
    ref = runs["fp32"]
    for precision in ("bf16", "fp8-compute"):
        out, grad_x, grads = runs[precision]
        lora = [rel(grads[n], ref[2][n]) for n in grads]
        results[precision] = {"output": r4(rel(out, ref[0])), "input_grad": r4(rel(grad_x, ref[1])),
                              "lora_grad_mean": r4(sum(lora) / len(lora)), "lora_grad_max": r4(max(lora))}
    results["fp8-compute_vs_bf16_output"] = r4(rel(runs["fp8-compute"][0], runs["bf16"][0]))
    return results


# --- training ------------------------------------------------------------------------------------------


def stacked(dataset) -> FlowBatch:
    """The whole dataset as one batch (the evaluation: one forward per sigma)."""
    return FlowBatch(*(torch.cat([getattr(b, f) for b in dataset]) for f in ("latents", "text_embeds", "text_mask",
                                                                               "cond_latents")))


def eval_loss(dit, dataset, precision: str) -> float:
    return heldout_loss(dit, stacked(dataset), EVAL_SIGMAS, seed=1000, autocast_dtype=autocast_for(precision))


def train_run(root: Path, device: torch.device, dataset, *, precision: str, seed: int, lora_seed: int, steps: int,
              eval_every: int, rank: int, lr: float) -> dict:
    dit = prepared_dit(root, precision, device, lora_seed=lora_seed, rank=rank)
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, kind="adamw", lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    generator = torch.Generator().manual_seed(seed)  # sigmas and noise, as the trainer's step generator
    order = torch.Generator().manual_seed(seed + 1)  # data order
    losses, evals = [], {0: round(eval_loss(dit, dataset, precision), 6)}
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = dataset[int(torch.randint(len(dataset), (1,), generator=order))]
        loss = training_loss(dit, batch, generator=generator, shift=12.0, distribution="uniform",
                             autocast_dtype=autocast_for(precision))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % eval_every == 0:
            evals[step] = round(eval_loss(dit, dataset, precision), 6)
    adapters = {n: p.detach().float().cpu() for n, p in dit.named_parameters() if p.requires_grad}
    return {"losses": losses, "eval": evals, "adapters": adapters, "s_per_step": (time.perf_counter() - start) / steps}


def fp32_eval_of(root: Path, device: torch.device, dataset, adapters: dict, rank: int) -> float:
    dit = prepared_dit(root, "fp32", device, lora_seed=0, rank=rank)
    state = dict(dit.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            state[name].copy_(value)
    return eval_loss(dit, dataset, "fp32")


def smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def compare(a: dict, b: dict, window: int) -> dict:
    """How far run `a`'s curves are from run `b`'s."""
    la, lb = a["losses"], b["losses"]
    sa, sb = smooth(la, window), smooth(lb, window)
    steps = sorted(set(a["eval"]) & set(b["eval"]))
    eval_diff = [abs(a["eval"][s] - b["eval"][s]) for s in steps]
    return {
        "train_loss_mean_abs_diff": r4(sum(abs(x - y) for x, y in zip(la, lb)) / len(la)),
        "train_loss_mean_rel_diff": r4(sum(abs(x - y) / abs(y) for x, y in zip(la, lb)) / len(la)),
        f"smoothed{window}_train_loss_max_abs_diff": r4(max(abs(x - y) for x, y in zip(sa[window:], sb[window:]))),
        "eval_loss_max_abs_diff": r4(max(eval_diff[1:])),  # step 0 is the untrained model
        "eval_loss_mean_abs_diff": r4(sum(eval_diff[1:]) / max(1, len(eval_diff) - 1)),
        "final_eval_abs_diff": r4(eval_diff[-1]),
    }


def training(root: Path, device: torch.device, dataset, args) -> dict:
    specs = {
        "bf16": dict(precision="bf16", seed=0, lora_seed=0),
        "fp8-compute": dict(precision="fp8-compute", seed=0, lora_seed=0),
        "bf16-init1": dict(precision="bf16", seed=0, lora_seed=1),
        "bf16-seed1": dict(precision="bf16", seed=10, lora_seed=1),
    }
    if args.fp32_run:
        specs["fp32"] = dict(precision="fp32", seed=0, lora_seed=0)
    runs = {}
    for name, spec in specs.items():
        runs[name] = train_run(root, device, dataset, steps=args.steps, eval_every=args.eval_every, rank=args.rank,
                               lr=args.lr, **spec)
        runs[name]["fp32_eval_of_final_adapters"] = round(fp32_eval_of(root, device, dataset, runs[name]["adapters"], args.rank), 6)
        print(f"{name}: {runs[name]['s_per_step']:.3f} s/step, eval {runs[name]['eval']}", file=sys.stderr)
    window = args.smooth
    differences = {f"{other} vs bf16": compare(runs[other], runs["bf16"], window)
                   for other in runs if other != "bf16"}
    fp8, floor = differences["fp8-compute vs bf16"], differences["bf16-init1 vs bf16"]
    seed_floor = differences["bf16-seed1 vs bf16"]
    within = {
        key: fp8[key] <= max(floor[key], seed_floor[key])
        for key in ("eval_loss_max_abs_diff", "eval_loss_mean_abs_diff", f"smoothed{window}_train_loss_max_abs_diff")
    }
    curves = {name: {"train_loss": [r4(v) for v in run["losses"]], "eval_loss": run["eval"],
                     "fp32_eval_of_final_adapters": run["fp32_eval_of_final_adapters"],
                     "s_per_step": round(run["s_per_step"], 4)} for name, run in runs.items()}
    return {"differences": differences, "fp8_within_bf16_run_to_run": within, "runs": curves}


def large_dit_error(device: torch.device, size: str, latent: tuple[int, int, int]) -> dict:
    """fp8-compute against bf16 on a DiT with random weights built straight on `device` (bench/common.py's
    `random_dit`; `full`: the 13.6B shapes, ~27 GB of bf16 weights, for a GPU): output, input gradient and
    LoRA gradients under bf16 autocast, with full checkpointing as `train` runs it."""
    from common import i2v_inputs, random_dit  # bench/common.py (this script's folder is on sys.path)

    config = SIZES[size]
    frames, height, width = latent
    latents, text, mask = i2v_inputs(str(device), latent_shape=(1, 16, frames, height, width),
                                     caption_channels=config.caption_channels)
    timesteps = torch.full((1, frames), 700.0, device=device)
    timesteps[:, 0] = 0.0
    dit = random_dit(config, device=str(device), dtype=torch.bfloat16)
    runs = {}
    for precision in ("bf16", "fp8-compute"):
        if precision == "fp8-compute":
            from longcat_tuner.model.lora import remove_lora

            remove_lora(dit)
            convert_to_fp8_compute(dit)  # in place: the bf16 weights are replaced by their float8 copies
        torch.manual_seed(0)
        adapters = inject_lora(dit, rank=16, dtype=torch.float32)
        with torch.no_grad():
            for adapter in adapters.values():
                adapter.up.normal_(0, 0.01)
        applied = apply_runtime(dit, MemorySettings(checkpointing="full"), device)
        x = latents.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = dit(x, timesteps, text, mask, num_cond_latents=1).float()
        out[:, :, 1:].pow(2).mean().backward()
        runs[precision] = (out.detach(), x.grad, {n: p.grad.float() for n, p in dit.named_parameters() if p.requires_grad})
        applied.remove()
    (out, grad_x, grads), (ref, ref_x, ref_grads) = runs["fp8-compute"], runs["bf16"]
    lora = [rel(grads[n], ref_grads[n]) for n in grads]
    return {"size": size, "latent": list(latent), "tokens": frames * (height // 2) * (width // 2),
            "output_vs_bf16": r4(rel(out, ref)), "input_grad_vs_bf16": r4(rel(grad_x, ref_x)),
            "lora_grad_vs_bf16_mean": r4(sum(lora) / len(lora)), "lora_grad_vs_bf16_max": r4(max(lora))}


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return env


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("small", "tiny"), default="tiny",
                        help="training model: the tiny reference (hidden 256, 2 blocks) or the random 'small' size (4 blocks)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--smooth", type=int, default=25, help="moving-average window of the train-loss comparison")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--latent", default="3x8x8", help="latent frames x height x width of each clip")
    parser.add_argument("--fp32-run", action="store_true", help="also train in float32 (for scale)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--large-dit", choices=tuple(SIZES), help="also compare fp8-compute with bf16 on a random DiT "
                        "of this size built on --device (`full`: the 13.6B shapes, for a GPU)")
    parser.add_argument("--large-latent", default="4x30x52", help="latent frames x height x width for --large-dit")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    latent = tuple(int(v) for v in args.latent.split("x"))
    result: dict = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as folder:
        roots = {"tiny": model_root("tiny", Path(folder) / "tiny"), "small": model_root("small", Path(folder) / "small")}
        probe = prepared_dit(roots[args.model], "fp32", device, lora_seed=0, rank=4)
        dataset = synthetic_dataset(probe, args.clips, latent, device)
        del probe
        start = time.perf_counter()
        result["layers"] = {f"captured block1.{name}": layer_errors(*io)
                            for name, io in capture_layer_io(roots[args.model], device, dataset).items()}
        g = torch.Generator().manual_seed(0)
        wide = nn.Linear(4096, 4096, device=device).requires_grad_(False)
        with torch.no_grad():
            wide.weight.copy_(torch.randn(4096, 4096, generator=g) / 64)
        result["layers"]["gaussian 4096->4096"] = layer_errors(
            torch.randn(256, 4096, generator=g).to(device), torch.randn(256, 4096, generator=g).to(device), wide)
        result["dit"] = {}
        for name, root in roots.items():
            tiny_data = synthetic_dataset(load_dit(root), 1, latent, device)
            result["dit"][name] = dit_errors(root, device, tiny_data)
        if args.large_dit:
            result["large_dit"] = large_dit_error(device, args.large_dit,
                                                  tuple(int(v) for v in args.large_latent.split("x")))
        result["error_seconds"] = round(time.perf_counter() - start, 1)
        if not args.skip_training:
            result["training"] = training(roots[args.model], device, dataset, args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

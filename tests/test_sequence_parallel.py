"""Ulysses sequence parallelism (`model/sequence_parallel.py`) against the single-process DiT, gloo CPU ranks.

Every case (text-to-video, image-to-video, video continuation; dense and block-sparse reference attention) runs
forward and backward once in this process (the reference) and once split over the ranks; the prediction and
every parameter gradient (summed over the sequence-parallel group) must agree within 1e-5 in float32. The token
height (5 rows) is not a multiple of 2 or 4, so the padding rows are exercised too. One spawn of 4 gloo ranks
runs all cases (`gloo_ranks.py`, shared with the DCP checkpoint test):

- groups of 2 ranks on a 2 x 2 device mesh (data-parallel x sequence-parallel), on the tiny reference
  checkpoint (2 heads), each pair with its own inputs; the KV-cache path of video continuation (sampling) is
  checked too;
- one group of 4 ranks on a 4-head variant of the tiny shapes with random weights (the reference checkpoint has
  2 heads, and the group size must divide the heads), one case per task.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import gloo_ranks
from conftest import TINY

pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")

FRAMES, LATENT_H, LATENT_W, TEXT = 5, 10, 8, 6
CASES = [(task, attn) for task in ("t2v", "i2v", "vc") for attn in ("sdpa", "block_sparse")]
COND = {"t2v": 0, "i2v": 1, "vc": 2}


def _model(heads: int):
    from longcat_tuner.model.loading import build_dit, load_dit

    if heads == 2:
        dit = load_dit(TINY, dtype=torch.float32)
    else:
        from longcat_tuner.model.random_checkpoint import _random_dit_state

        config = dataclasses.replace(load_dit(TINY).config, num_heads=heads)
        dit = build_dit(config, device="cpu")
        dit.load_state_dict(_random_dit_state(config, seed=3))
    return dit.requires_grad_(True)


def _inputs(task: str, seed: int, caption_channels: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_cond = COND[task]
    timestep = (torch.rand(2, generator=g) * 1000)[:, None].repeat(1, FRAMES)
    timestep[:, :n_cond] = 0
    mask = torch.ones(2, TEXT, dtype=torch.int64)
    mask[1, TEXT // 2:] = 0
    return {
        "latents": torch.randn(2, 16, FRAMES, LATENT_H, LATENT_W, generator=g),
        "timestep": timestep,
        "text_embeds": torch.randn(2, TEXT, caption_channels, generator=g),
        "text_mask": mask,
        "num_cond_latents": n_cond,
        "weight": torch.randn(2, 16, FRAMES, LATENT_H, LATENT_W, generator=g),
    }


def _forward_backward(dit, attn: str, case: dict, sp=None) -> dict:
    from longcat_tuner.model.sequence_parallel import sum_gradients

    dit.set_attention_backend("reference" if attn == "sdpa" else "block_sparse", sparsity=0.5)
    dit.zero_grad(set_to_none=True)
    prediction = dit(case["latents"], case["timestep"], case["text_embeds"], case["text_mask"],
                     num_cond_latents=case["num_cond_latents"])
    (prediction * case["weight"]).sum().backward()
    if sp is not None:
        sum_gradients(dit.parameters(), sp)
    result = {"prediction": prediction.detach(), **{f"grad.{n}": p.grad.clone() for n, p in dit.named_parameters()}}
    if case["num_cond_latents"] > 1:  # video continuation as the sampler runs it: cached condition keys/values
        n = case["num_cond_latents"]
        with torch.no_grad():
            cache = dit.build_kv_cache(case["latents"][:, :, :n])
            result["kv_cached"] = dit(case["latents"][:, :, n:], case["timestep"][:, n:], case["text_embeds"],
                                      case["text_mask"], kv_cache=cache)
    return result


# The cases, by sequence-parallel group size: (label, heads, group size, cases) over the 4 ranks.
PLANS = {
    # two groups of 2 ranks (a 2 x 2 mesh: data-parallel x sequence-parallel), each its own inputs; the first
    # pair runs every case, the second one per task
    2: [("pairs", 2, 2, CASES)],
    # one group of all 4 ranks: every task, the attention kinds alternating (both run on the groups of 2)
    4: [("four-heads", 4, 4, [("t2v", "block_sparse"), ("i2v", "sdpa"), ("vc", "block_sparse")])],
}


def _cases_of(cases: list, dp_rank: int) -> list:
    return cases if dp_rank == 0 else cases[1::2] if len(cases) > 3 else cases


def sp_job(rank: int, world: int, root: Path, _argument) -> dict:
    """Inside each rank of `gloo_ranks`: every case of `PLANS[world]` split over the sequence-parallel group."""
    from torch.distributed.device_mesh import init_device_mesh

    from longcat_tuner.model.sequence_parallel import SequenceParallel, apply_sequence_parallel

    results = {}
    if not TINY.is_dir():  # the tests skip; the pool still runs the DCP job
        return results
    for label, heads, sp_size, cases in PLANS[2] + PLANS[4]:
        mesh = init_device_mesh("cpu", (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
        sp = SequenceParallel.from_group(mesh["sp"].get_group())
        dp_rank = mesh["dp"].get_local_rank()
        dit = _model(heads)
        apply_sequence_parallel(dit, sp)
        for task, attn in _cases_of(cases, dp_rank):
            case = _inputs(task, seed=100 * dp_rank + len(task), caption_channels=dit.config.caption_channels)
            results[(label, dp_rank, task, attn)] = _forward_backward(dit, attn, case, sp)
    return results


def _check(group: int) -> None:
    per_rank = [record["sp"] for record in gloo_ranks.results()]
    worst = 0.0
    for label, heads, sp_size, cases in PLANS[group]:
        dit = _model(heads)
        for dp_rank in range(gloo_ranks.WORLD // sp_size):
            for task, attn in _cases_of(cases, dp_rank):
                case = _inputs(task, seed=100 * dp_rank + len(task), caption_channels=dit.config.caption_channels)
                want = _forward_backward(dit, attn, case)
                key = (label, dp_rank, task, attn)
                ranks = range(dp_rank * sp_size, (dp_rank + 1) * sp_size)
                for rank in ranks:
                    got = per_rank[rank][key]
                    assert got.keys() == want.keys()
                    for name in want:
                        # fp32 tolerance relative to the tensor's scale: a gradient sums thousands of token
                        # contributions, in another order when split over ranks.
                        scale = want[name].abs().max().clamp_min(1e-12)
                        error = float((got[name] - want[name]).abs().max() / scale)
                        worst = max(worst, error)
                        assert error < 1e-5, f"{key} rank {rank} {name}: relative error {error:.2e}"
    print(f"worst relative error with groups of {group} ranks: {worst:.2e}")


def test_groups_of_two_ranks_on_a_two_by_two_mesh_equal_one_process():
    _check(2)


def test_a_group_of_four_ranks_equals_one_process():
    _check(4)


def wrapper_job(rank: int, world: int, root: Path, _argument) -> dict:
    """Inside each rank of `gloo_ranks`: on a 2 x 2 mesh, one backward through the SP-aware DDP and FSDP2
    wrappers (`train/distributed.py`); each data-parallel pair feeds its own case."""
    from longcat_tuner.train import distributed as dist_utils

    if not TINY.is_dir():
        return {}
    mesh = dist_utils.build_mesh(dist_utils.Distributed(rank=rank, world_size=world), 2)
    results = {}
    for kind in ("ddp", "fsdp"):
        dit = _model(2)
        from longcat_tuner.model.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(dit, mesh.sequence_parallel)
        if kind == "ddp":
            model = dist_utils.wrap_ddp_sequence_parallel(dit, dist_utils.Distributed(rank=rank, world_size=world), mesh)
        else:
            model = dist_utils.wrap_fsdp_sequence_parallel(dit, mesh)
        dit.set_attention_backend("reference")
        case = _inputs("i2v", seed=100 * mesh.dp_rank + 3, caption_channels=dit.config.caption_channels)
        prediction = model(case["latents"], case["timestep"], case["text_embeds"], case["text_mask"],
                           num_cond_latents=case["num_cond_latents"])
        (prediction * case["weight"]).sum().backward()
        results[kind] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                         for n, p in dit.named_parameters()}
    return results


def test_ddp_and_fsdp_average_the_replicas_of_sequence_parallel_groups():
    """The wrappers' gradient = the mean over the 2 replicas (data-parallel) of each one's full gradient."""
    per_rank = [record["wrappers"] for record in gloo_ranks.results()]
    dit = _model(2)
    grads = []
    for dp_rank in range(2):
        case = _inputs("i2v", seed=100 * dp_rank + 3, caption_channels=dit.config.caption_channels)
        grads.append({k: v for k, v in _forward_backward(dit, "sdpa", case).items() if k.startswith("grad.")})
    for kind in ("ddp", "fsdp"):
        for rank in range(gloo_ranks.WORLD):
            got = per_rank[rank][kind]
            assert len(got) == len(grads[0])
            for name, value in got.items():
                want = (grads[0][f"grad.{name}"] + grads[1][f"grad.{name}"]) / 2
                error = float((value - want).abs().max() / want.abs().max().clamp_min(1e-12))
                assert error < 1e-5, f"{kind} rank {rank} {name}: relative error {error:.2e}"


def test_size_must_divide_ranks_and_heads():
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.model.sequence_parallel import check_sequence_parallel_size

    check_sequence_parallel_size(2, world_size=4, num_heads=32)
    with pytest.raises(ConfigError, match="does not divide the 6 process"):
        check_sequence_parallel_size(4, world_size=6, num_heads=32)
    with pytest.raises(ConfigError, match="does not divide the DiT's 2 attention heads"):
        check_sequence_parallel_size(4, world_size=4, num_heads=2)

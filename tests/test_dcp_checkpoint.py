"""Sharded FSDP2 checkpoints (torch.distributed.checkpoint) on gloo CPU ranks: `train/checkpoint.py`.

A full fine-tune of a small DiT (4 blocks of width 256: 5.0M parameters, 58 MiB of float32 weights and AdamW
moments) trains 4 steps on 4 ranks and saves a sharded checkpoint after step 2; each step's global batch is the
same whatever the world size (each rank takes its slice), so the losses do not depend on it. The same 4
processes then resume from that checkpoint, once sharded over all 4 and once over 2 of them: both must reproduce steps 3 and 4 of the
uninterrupted run. Each rank's peak host memory during the save (VmHWM reset before it) must stay below the
full state size, and the final weights, written tensor by tensor into safetensors files (several, with an
index, here), must equal the gathered model and load with the model loader.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gloo_ranks

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 4


def _config():
    from longcat_tuner.model.config import DiTConfig

    return DiTConfig(hidden_size=256, depth=4, num_heads=2, caption_channels=64, adaln_tembed_dim=64)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build(mesh=None):
    from torch.distributed.fsdp import fully_shard

    from longcat_tuner.model.loading import build_dit
    from longcat_tuner.train.distributed import wrap_fsdp

    torch.manual_seed(0)
    dit = build_dit(_config(), device="cpu").requires_grad_(True)
    if mesh is None:
        wrap_fsdp(dit)  # the trainer's wrapping, over all ranks
    else:  # the same units over a group of ranks
        for block in dit.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(dit, mesh=mesh)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0.01)
    return dit, optimizer


def _step(dit, optimizer, step: int, rank: int, world: int, group=None) -> float:
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1000 + step)
    x0 = torch.randn(GLOBAL_BATCH, 16, 2, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(GLOBAL_BATCH, generator=g)
    text = torch.randn(GLOBAL_BATCH, 4, 64, generator=g)
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    s = sigma[share].view(-1, 1, 1, 1, 1)
    prediction = dit((1 - s) * x0[share] + s * noise[share], 1000 * sigma[share], text[share], None)
    loss = torch.nn.functional.mse_loss(prediction, x0[share] - noise[share])
    loss.backward()  # FSDP averages the gradients over the ranks: the global batch's mean gradient
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach().reshape(1).double()
    dist.all_reduce(value, group=group)
    return float(value) / world


def _measure_peak(run) -> tuple[object, int]:
    """`run()` and the host memory it added at its peak: VmHWM, reset to VmRSS just before (after returning the
    allocator's free pages to the system, so earlier frees cannot hide new allocations)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = run()
    return result, (_rss_kib("VmHWM") - before) * 1024


def dcp_job(rank: int, world: int, root: Path, _argument) -> dict:
    """Inside each of the 4 ranks of `gloo_ranks`: train and save, resume on all 4, resume on ranks 0 and 1."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from longcat_tuner.train import checkpoint as ckpt
    from longcat_tuner.train import distributed as dist_utils

    out, checkpoints = {}, root / "checkpoints"
    dit, optimizer = _build()
    losses = {}
    for step in range(1, STEPS + 1):
        losses[step] = _step(dit, optimizer, step, rank, world)
        if step == SAVE_AT:
            tmp = ckpt.sharded_temporary(checkpoints, step)
            if rank == 0:
                tmp.mkdir(parents=True)
            dist.barrier()
            _, out["save_peak_bytes"] = _measure_peak(lambda: ckpt.save_sharded_state(tmp, dit, optimizer))
            if rank == 0:
                ckpt.save_checkpoint(checkpoints, step=step, weights={}, optimizer_state={}, scheduler_state={},
                                     trainer_state={"world_size": world}, rng_state={}, sharded=tmp)
            # The contrast: gathering the full state to rank 0, as the single-file checkpoint does.
            _, out["gather_peak_bytes"] = _measure_peak(lambda: (
                dist_utils.full_trainable_state(dit, keep=rank == 0),
                dist_utils.full_optimizer_state(dit, optimizer)))
    out["losses"] = losses
    out["state_bytes"] = sum(p.numel() * p.element_size() * 3 for p in dit.parameters())  # + 2 moments
    files, out["final_peak_bytes"] = _measure_peak(lambda: dist_utils.save_full_model_streaming(
        dit, root / "dit", keep=rank == 0, base_name="diffusion_pytorch_model.safetensors",
        max_shard_bytes=4 * 2**20))
    out["final_files"] = [str(f) for f in files]
    full = {k: v.full_tensor() for k, v in dit.state_dict().items()}
    if rank == 0:
        out["final_state"] = full
    dist.barrier()  # rank 0 has written the checkpoint
    path = checkpoints / ckpt.checkpoint_name(SAVE_AT)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["sharded"] and loaded["weights"] == {} and loaded["state"]["world_size"] == 4

    # Resume on all 4 ranks.
    dit, optimizer = _build()
    ckpt.load_sharded_state(path, dit, optimizer)
    out["resumed4"] = {step: _step(dit, optimizer, step, rank, world) for step in range(SAVE_AT + 1, STEPS + 1)}
    # Resume sharded over 2 ranks (ranks 0 and 1; 2 and 3 sit out): the 4 saved shards are resharded in 2.
    pair = dist.new_group([0, 1])
    if rank < 2:
        dit, optimizer = _build(DeviceMesh.from_group(pair, "cpu"))
        ckpt.load_sharded_state(path, dit, optimizer, process_group=pair)
        out["resumed2"] = {step: _step(dit, optimizer, step, rank, 2, pair) for step in range(SAVE_AT + 1, STEPS + 1)}
    return out


def test_sharded_checkpoint_resumes_at_four_and_two_ranks():
    from safetensors.torch import load_file

    from longcat_tuner.model.loading import load_dit
    from longcat_tuner.train import checkpoint as ckpt

    four = [record["dcp"] for record in gloo_ranks.results()]
    tmp_path = gloo_ranks.root()
    want = four[0]["losses"]
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert four[0]["resumed4"][step] == pytest.approx(want[step], rel=1e-5), step
        assert four[0]["resumed2"][step] == pytest.approx(want[step], rel=1e-5), step
    assert want[STEPS] != pytest.approx(want[1], rel=1e-3)  # it trained: the comparison means something

    # The checkpoint folder: shards of every rank, no full weight or optimizer file.
    folder = tmp_path / "checkpoints" / ckpt.checkpoint_name(SAVE_AT)
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [(SAVE_AT, folder)]
    assert not (folder / ckpt.WEIGHTS_FILE).exists() and not (folder / ckpt.OPTIMIZER_FILE).exists()
    assert len(list((folder / ckpt.SHARDED_DIR).glob("*.distcp"))) == 4

    state_bytes = four[0]["state_bytes"]
    peaks = [record["save_peak_bytes"] for record in four]
    print(f"full state {state_bytes / 2**20:.0f} MiB; peak host memory added during the save per rank: "
          + ", ".join(f"{p / 2**20:.0f} MiB" for p in peaks)
          + f"; rank 0 gathering the full state instead: {four[0]['gather_peak_bytes'] / 2**20:.0f} MiB"
          + f"; rank 0 writing the final weights: {four[0]['final_peak_bytes'] / 2**20:.0f} MiB")
    assert max(peaks) < state_bytes
    # The measurement sees a full gather: rank 0's peak when it gathers everything reaches the state size.
    assert four[0]["gather_peak_bytes"] > 0.9 * state_bytes
    assert four[0]["final_peak_bytes"] < state_bytes / 3  # below the weights alone: one 4 MiB file at a time

    files = [Path(f) for f in four[0]["final_files"]]
    assert len(files) > 2 and all(f.is_file() for f in files)
    index = json.loads((tmp_path / "dit" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    written = {k: v for f in files for k, v in load_file(f).items()}
    assert written.keys() == four[0]["final_state"].keys() == index["weight_map"].keys()
    for key, value in four[0]["final_state"].items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=0)
    # The written folder is a loadable DiT (the hub layout the loader reads).
    (tmp_path / "dit" / "config.json").write_text(json.dumps(_config().to_dict()))
    loaded = load_dit(tmp_path).state_dict()
    torch.testing.assert_close(loaded["blocks.3.attn.qkv.weight"], four[0]["final_state"]["blocks.3.attn.qkv.weight"])


def test_sampler_position_after_a_change_of_rank_count():
    from longcat_tuner.train.checkpoint import rescale_sampler_state

    state = {"epoch": 1, "position": 3, "seed": 7, "num_items": 40}
    assert rescale_sampler_state(state, 4, 2) == {**state, "position": 6}  # 12 batches taken, 2 ranks go on
    assert rescale_sampler_state(state, 2, 4)["position"] == 1  # 6 taken: one round of 4, 2 seen again
    assert rescale_sampler_state(state, 4, 4) == state


def test_a_failed_shard_write_is_reported_and_leaves_no_folder(tmp_path, monkeypatch):
    """FSDP2's `write_checkpoint` when the disk fills during the shard write: a `ShardedSaveError` (the trainer
    reports it and trains on), the temporary folder removed, the writer's `write` never called."""
    import errno

    from test_train_parallel import FakeGroup

    from longcat_tuner.train import checkpoint as ckpt
    from longcat_tuner.train.parallel import FullySharded

    def full_disk(folder, dit, optimizer, **_):
        (folder / "sharded").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_sharded_state", full_disk)
    parallel = FullySharded(FakeGroup(rank=0))
    with pytest.raises(ckpt.ShardedSaveError, match="could not save the sharded checkpoint of step 6 .*No space left"):
        parallel.write_checkpoint(torch.nn.Linear(2, 2), None, lambda state: pytest.fail("nothing to add"),
                                  checkpoints_dir=tmp_path, step=6)
    assert list(tmp_path.iterdir()) == []


def test_a_sharded_lora_checkpoint_loads_back_in_one_process(tmp_path):
    """A LoRA run's sharded checkpoint holds the adapters only; loading it must not ask for the frozen base
    (a strict load refused every FSDP2 LoRA resume for the base keys it lacks). One process, no group."""
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import build_dit
    from longcat_tuner.model.lora import inject_lora
    from longcat_tuner.train import checkpoint as ckpt

    def lora_model(seed: int):
        torch.manual_seed(0)  # the same frozen base
        dit = build_dit(DiTConfig(hidden_size=64, depth=1, num_heads=2, caption_channels=32, adaln_tembed_dim=32), device="cpu")
        torch.manual_seed(seed)
        inject_lora(dit, rank=4, targets=["attn.qkv", "ffn.w1"])
        trainable = [p for p in dit.parameters() if p.requires_grad]
        return dit, torch.optim.AdamW(trainable, lr=1e-2)

    dit, optimizer = lora_model(1)
    for parameter in (p for p in dit.parameters() if p.requires_grad):
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    ckpt.save_sharded_state(tmp_path, dit, optimizer)

    restored, restored_optimizer = lora_model(2)
    ckpt.load_sharded_state(tmp_path, restored, restored_optimizer)
    saved = {n: p for n, p in dit.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in restored.named_parameters() if p.requires_grad}
    assert saved.keys() == loaded.keys() and saved
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    restored_moments = [s["exp_avg"] for s in restored_optimizer.state_dict()["state"].values()]
    assert len(moments) == len(restored_moments) == len(saved)
    for a, b in zip(moments, restored_moments):
        assert torch.equal(a, b)

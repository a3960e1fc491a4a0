"""Host-side model assembly in turns across ranks (block swap / 8-bit weights under torchrun)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from longcat_tuner.train.distributed import ranks_per_host_assembly

WORLD = 3


def _worker(rank: int, root: str, ranks_at_once: int, failing_rank: int) -> None:
    import torch.distributed as dist

    from longcat_tuner.train.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    ctx = Distributed(rank=rank, world_size=WORLD)
    record = {"rank": rank}
    try:
        with ctx.in_turns(ranks_at_once):
            record["start"] = time.time()
            time.sleep(0.4)
            record["end"] = time.time()
            if rank == failing_rank:
                raise RuntimeError("assembly failed")
    except RuntimeError as err:
        record["error"] = str(err)
    ctx.barrier()  # everyone got past its turns: no rank is stuck at a barrier
    record["done"] = time.time()
    Path(root, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _run(tmp_path: Path, ranks_at_once: int, failing_rank: int = -1) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path), ranks_at_once, failing_rank), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_one_rank_at_a_time_runs_in_rank_order(tmp_path):
    records = _run(tmp_path, ranks_at_once=1)
    for before, after in zip(records, records[1:]):
        assert after["start"] >= before["end"]


def test_two_at_a_time_overlap_then_the_third(tmp_path):
    first, second, third = _run(tmp_path, ranks_at_once=2)
    assert second["start"] < first["end"] and first["start"] < second["end"]  # ranks 0 and 1 together
    assert third["start"] >= max(first["end"], second["end"])


def test_a_failing_turn_does_not_hang_the_others(tmp_path):
    records = _run(tmp_path, ranks_at_once=1, failing_rank=1)
    assert records[1]["error"] == "assembly failed"
    assert records[2]["start"] >= records[1]["end"] and all("done" in r for r in records)


@pytest.mark.parametrize(
    "model_gib, available_gib, world, expected",
    [
        (27, 1000, 8, 8),  # plenty of RAM: all at once
        (27, 128, 8, 3),  # 80% of 128 GiB holds three 27 GiB copies
        (27, 20, 8, 1),  # never fewer than one
        (27, None, 8, 1),  # unknown memory: one at a time
    ],
)
def test_ranks_per_host_assembly(model_gib, available_gib, world, expected):
    available = None if available_gib is None else available_gib * 2**30
    assert ranks_per_host_assembly(model_gib * 2**30, available, world) == expected


def test_trainer_builds_the_model_in_turns_when_it_assembles_on_host(monkeypatch, capsys):
    import contextlib

    from longcat_tuner.train import trainer
    from longcat_tuner.train.distributed import Distributed
    from longcat_tuner.train.parallel import DataParallel

    turns = []

    class Ctx(Distributed):
        @contextlib.contextmanager
        def in_turns(self, ranks_at_once):
            turns.append(ranks_at_once)
            yield

        def broadcast(self, obj):
            return obj

    monkeypatch.setattr(trainer, "build_model_and_runtime", lambda config, precision: "dit")
    monkeypatch.setattr(trainer, "host_assembly_bytes", lambda config, precision: 27 * 2**30)
    monkeypatch.setattr(trainer, "available_host_memory", lambda: 64 * 2**30)
    ctx = DataParallel(Ctx(rank=0, world_size=4))
    monkeypatch.setattr(trainer, "assembles_on_host", lambda config, precision: False)
    assert trainer.build_model_in_turns(None, None, ctx) == "dit" and turns == [4]  # no host assembly: all at once
    monkeypatch.setattr(trainer, "assembles_on_host", lambda config, precision: True)
    assert trainer.build_model_in_turns(None, None, ctx) == "dit" and turns[-1] == 1  # 80% of 64 GiB: one copy
    assert "1 rank(s) at a time" in capsys.readouterr().out

"""`Distributed.main_first` over two "nodes" of 2 ranks each (the shared 4-rank gloo pool): rank 0 runs the block
first, then the first rank of the other node, then the remaining ranks, so no two ranks of one node build caches
at once and a node with its own disk builds its own copy before its other ranks read it."""
from __future__ import annotations

import time
from pathlib import Path

import gloo_ranks


def phases_job(rank: int, world: int, root: Path, _argument) -> dict:
    from longcat_tuner.train.distributed import Distributed

    ctx = Distributed(rank=rank, world_size=world, local_rank=rank % 2)  # node 0: ranks 0, 1; node 1: ranks 2, 3
    with ctx.main_first():
        start = time.time()
        time.sleep(0.3)
        end = time.time()
    return {"start": start, "end": end}


def test_rank0_then_each_nodes_first_rank_then_the_rest():
    records = [record["phases"] for record in gloo_ranks.results()]
    first, node_leader, rest = records[0], records[2], (records[1], records[3])
    assert node_leader["start"] >= first["end"]
    assert all(r["start"] >= node_leader["end"] for r in rest)
    assert rest[0]["start"] < rest[1]["end"] and rest[1]["start"] < rest[0]["end"]  # the rest at once

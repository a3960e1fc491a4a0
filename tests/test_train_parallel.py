"""The parallel strategies' own logic, with a fake process group (no torchrun): who validates and writes,
how the writer's decision (or failure) reaches the other ranks, and what the ranks agree on.

The real collectives are exercised by the 2-rank runs in test_train_distributed.py / test_train_fsdp.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.train.distributed import Distributed
from longcat_tuner.train.parallel import DataParallel, FullySharded, SingleProcess, parallel_strategy


class FakeGroup(Distributed):
    """Rank `rank` of `world_size`; `broadcast` hands out what the writer sent (`sent`), `any`/`gather`
    combine this rank's value with the other ranks' (`others`)."""

    def __init__(self, rank: int, world_size: int = 2, sent=None, others=()) -> None:
        super().__init__(rank=rank, world_size=world_size)
        self.sent, self.others, self.broadcasts = sent, list(others), []

    def broadcast(self, obj):
        self.broadcasts.append(obj)
        return obj if self.is_main else self.sent

    def any(self, flag):
        return bool(flag) or any(self.others)

    def gather(self, obj):
        return [obj, *self.others] if self.is_main else [*self.others, obj]


def test_single_process_without_torchrun():
    parallel = parallel_strategy(type("Config", (), {"distributed_strategy": "fsdp"})(), environ={})
    assert type(parallel) is SingleProcess and parallel.is_writer and parallel.validates
    assert parallel.distributed_strategy is None and parallel.checkpoint_layout == "ddp"


def test_writer_decides_and_every_rank_learns_the_result():
    writer = DataParallel(FakeGroup(rank=0))
    assert writer.decide(lambda: Path("checkpoint-4")) == Path("checkpoint-4")
    assert writer.dist.broadcasts == [(Path("checkpoint-4"), None, None)]
    other = DataParallel(FakeGroup(rank=1, sent=(Path("checkpoint-4"), None, None)))
    assert other.decide(lambda: pytest.fail("only the writer decides")) == Path("checkpoint-4")


def test_a_writer_failure_stops_every_rank_with_its_message():
    writer = DataParallel(FakeGroup(rank=0))
    refusal = ConfigError("output_dir x is in use by pid 7")
    with pytest.raises(ConfigError) as raised:
        writer.decide(lambda: (_ for _ in ()).throw(refusal))
    assert raised.value is refusal  # the writer raises its own exception
    assert writer.dist.broadcasts == [(None, "output_dir x is in use by pid 7", ConfigError)]
    other = DataParallel(FakeGroup(rank=1, sent=writer.dist.broadcasts[0]))
    with pytest.raises(ConfigError, match="in use by pid 7"):
        other.decide(lambda: None)
    # A failure that is not one of ours reaches the others as the error kind the caller names.
    writer = DataParallel(FakeGroup(rank=0))
    with pytest.raises(OSError):
        writer.decide(lambda: (_ for _ in ()).throw(OSError("disk gone")), error=CheckpointError)
    other = DataParallel(FakeGroup(rank=1, sent=writer.dist.broadcasts[0]))
    with pytest.raises(CheckpointError, match="disk gone"):
        other.decide(lambda: None)


def test_who_validates_writes_and_stops_together():
    ddp_other, fsdp_other = DataParallel(FakeGroup(rank=1)), FullySharded(FakeGroup(rank=1, others=[True]))
    assert not ddp_other.validates and not ddp_other.is_writer
    assert fsdp_other.validates and not fsdp_other.is_writer  # a sharded block needs every rank to sample
    assert ddp_other.validate(lambda folder: pytest.fail("DDP: rank 0 alone validates"), Path("run"), default=[]) == []
    seen = []
    assert fsdp_other.validate(lambda folder: seen.append(folder) or ["kept"], Path("run"), default=[]) == []
    assert seen and seen[0] != Path("run")  # sampled into a scratch folder, nothing kept
    writer = FullySharded(FakeGroup(rank=0))
    assert writer.validate(lambda folder: [folder], Path("run"), default=[]) == [Path("run")]
    # A stop reaching another rank stops the writer's sampling too (FSDP); DDP's writer samples alone.
    assert FullySharded(FakeGroup(rank=0, others=[True])).stop_validation(False)
    assert not DataParallel(FakeGroup(rank=0, others=[True])).stop_validation(False)


def test_a_weights_problem_on_one_shard_is_everyones():
    assert FullySharded(FakeGroup(rank=0, others=["non-finite (NaN/inf)"])).agree_problem(None) == "non-finite (NaN/inf)"
    assert FullySharded(FakeGroup(rank=0, others=[None])).agree_problem(None) is None
    assert DataParallel(FakeGroup(rank=0, others=["x"])).agree_problem(None) is None  # replicas are equal


def test_checkpoint_rng_keeps_every_rank_and_each_restores_its_own():
    rng = {"python": 1}
    saved = DataParallel(FakeGroup(rank=0, others=[{"python": 2}])).rng_for_checkpoint(rng)
    assert saved == {"python": 1, "ranks": [{"python": 1}, {"python": 2}]}
    assert DataParallel(FakeGroup(rank=1)).rng_from_checkpoint(saved) == {"python": 2}
    assert SingleProcess().rng_from_checkpoint(saved) is saved

"""BucketBatchSampler: one bucket per batch, repeats, deterministic order, exact resume, ranks."""
from __future__ import annotations

import pytest

from longcat_tuner.data.buckets import BucketBatchSampler
from longcat_tuner.errors import DataError

KEYS = [(93, 480, 832, True)] * 5 + [(93, 832, 480, True)] * 3 + [(93, 608, 640, False)] * 2


def flatten(batches):
    return [i for batch in batches for i in batch]


def test_batches_never_mix_buckets_and_cover_every_item_once():
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=1)
    batches = list(sampler)
    assert all(len({KEYS[i] for i in batch}) == 1 for batch in batches)
    assert sorted(flatten(batches)) == list(range(len(KEYS)))
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2, 2]  # 5 -> 2+2+1, 3 -> 2+1, 2 -> 2
    dropped = list(BucketBatchSampler(KEYS, batch_size=2, seed=1, drop_last=True))
    assert all(len(b) == 2 for b in dropped) and len(dropped) == 4


def test_repeats_and_seeded_shuffle():
    repeats = [2] + [0] * (len(KEYS) - 1)
    batches = list(BucketBatchSampler(KEYS, batch_size=1, seed=5, repeats=repeats))
    assert flatten(batches).count(0) == 3 and len(batches) == len(KEYS) + 2
    first = list(BucketBatchSampler(KEYS, batch_size=2, seed=7))
    assert first == list(BucketBatchSampler(KEYS, batch_size=2, seed=7))
    assert first != list(BucketBatchSampler(KEYS, batch_size=2, seed=8))
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=7)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert epoch0 == first and epoch1 != epoch0 and sampler.epoch == 2  # a new order every epoch


def test_position_save_and_restore_resumes_exactly():
    reference = BucketBatchSampler(KEYS, batch_size=2, seed=3)
    expected = list(reference) + list(reference)  # two epochs
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=3)
    consumed = []
    iterator = iter(sampler)
    for _ in range(4):
        consumed.append(next(iterator))
    state = sampler.state_dict()
    assert state["epoch"] == 0 and state["position"] == 4
    resumed = BucketBatchSampler(KEYS, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    consumed += list(resumed) + list(resumed)
    assert consumed == expected + list(reference)[: len(consumed) - len(expected)]
    changed = BucketBatchSampler(KEYS[:-1], batch_size=2, seed=3)
    with pytest.raises(DataError, match="the data changed since the checkpoint"):
        changed.load_state_dict(state)


def test_ranks_split_an_epoch_evenly():
    shards = [list(BucketBatchSampler(KEYS, batch_size=1, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 3
    assert not set(flatten(shards[0])) & set(flatten(shards[1]))


def test_empty_or_unbatchable_data_is_an_error():
    with pytest.raises(DataError, match="no cached samples to train on"):
        BucketBatchSampler([], batch_size=1)
    with pytest.raises(DataError, match="no bucket holds 6 samples"):
        BucketBatchSampler(KEYS, batch_size=6, drop_last=True)


def test_buckets_smaller_than_a_batch_are_named_not_dropped_silently():
    from longcat_tuner.data.buckets import unbatched_warning

    sampler = BucketBatchSampler(KEYS, batch_size=3, seed=0, drop_last=True)
    trained = set(flatten(list(sampler)))
    # The 2-item text-to-video bucket never forms a batch of 3: none of its items is ever trained on ...
    assert trained.isdisjoint({8, 9})
    # ... so the sampler reports it (repeats count: 2 items x 2 passes fill a batch of 3).
    assert sampler.unbatched_groups() == {(93, 608, 640, False): 2}
    assert BucketBatchSampler(KEYS, batch_size=3, repeats=[0] * 8 + [1, 1], drop_last=True).unbatched_groups() == {}
    assert BucketBatchSampler(KEYS, batch_size=3).unbatched_groups() == {}  # short batches kept: nothing lost
    message = unbatched_warning(sampler.unbatched_groups(), 3)
    assert "2 training item(s) are never trained on: bucket(s) 93x608x640 text-to-video (2)" in message
    assert "train_batch_size 3" in message and "lower train_batch_size, add repeats" in message

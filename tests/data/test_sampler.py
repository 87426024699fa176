from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt.data.sampler import BucketBatchSampler, resolve_replicas

lengths_st = st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=300)
FORTUNES = Path(__file__).parent / "fortune_lengths.npy"


def _all_batches(lengths, world: int, **kwargs) -> list[list[list[int]]]:
    per_rank = []
    for rank in range(world):
        sampler = BucketBatchSampler(lengths, num_replicas=world, rank=rank, **kwargs)
        per_rank.append(list(sampler))
    return per_rank


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_st,
    world=st.integers(1, 4),
    mode=st.sampled_from(["batch_size", "max_tokens"]),
    size=st.integers(1, 64),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 5),
    grouped=st.booleans(),
    pool=st.one_of(st.none(), st.integers(1, 100)),
)
def test_every_sample_once_equal_counts_and_budget(lengths, world, mode, size, seed, epoch, grouped, pool):
    if len(lengths) < world:
        with pytest.raises(ValueError, match="num_replicas"):
            BucketBatchSampler(lengths, batch_size=1, num_replicas=world, rank=0)
        return
    kwargs = {"batch_size": size} if mode == "batch_size" else {"max_tokens": 200 + size}
    samplers = [
        BucketBatchSampler(
            lengths, num_replicas=world, rank=r, seed=seed, group_by_length=grouped, pool_size=pool, **kwargs
        )
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    # equal counts, len() is the truth
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(s) == len(b) for s, b in zip(samplers, per_rank, strict=True))
    flat = sorted(i for batches in per_rank for b in batches for i in b)
    repeated = samplers[0].plan().repeated.tolist()
    assert flat == sorted(list(range(len(lengths))) + repeated)  # every sample exactly once, but for repeats
    # repeats only when no batch could be split instead
    assert not repeated or all(len(b) == 1 for batches in per_rank for b in batches)
    assert len(repeated) < world
    for batches in per_rank:
        for b in batches:
            assert b, "empty batch"
            if mode == "batch_size":
                assert len(b) <= size
            else:
                assert len(b) * max(lengths[i] for i in b) <= kwargs["max_tokens"]


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, seed=st.integers(0, 1000), epoch=st.integers(0, 3), k=st.integers(0, 50))
def test_resume_yields_the_rest_of_the_epoch(lengths, seed, epoch, k):
    full = BucketBatchSampler(lengths, batch_size=4, seed=seed)
    full.set_epoch(epoch)
    expected = list(full)
    k = min(k, len(expected))
    first = BucketBatchSampler(lengths, batch_size=4, seed=seed)
    first.set_epoch(epoch)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state["consumed"] == k and state["epoch"] == epoch
    resumed = BucketBatchSampler(lengths, batch_size=4, seed=seed)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # what Lightning does at epoch start: must keep the position
    assert list(resumed) == expected[k:]
    resumed.set_epoch(epoch + 1)
    assert len(list(resumed)) == len(expected)  # the next epoch is whole again


def test_deterministic_and_new_order_each_epoch():
    lengths = np.random.default_rng(0).integers(1, 50, 500)
    a = BucketBatchSampler(lengths, batch_size=8, seed=3)
    b = BucketBatchSampler(lengths, batch_size=8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(lengths, batch_size=8, seed=4)) != first


def test_groups_similar_lengths():
    lengths = np.random.default_rng(0).integers(1, 100, 1000)
    spreads = [lengths[b].max() - lengths[b].min() for b in BucketBatchSampler(lengths, batch_size=10)]
    # batches are contiguous runs of the length-sorted samples: their spreads add up to at most the total range
    assert sum(spreads) <= lengths.max() - lengths.min()


def test_single_sample_batches_repeat_only_what_is_needed():
    per_rank = _all_batches([4, 2, 9], 2, batch_size=1)
    assert [len(r) for r in per_rank] == [2, 2]
    assert sorted(i for r in per_rank for b in r for i in b) == [0, 1, 1, 2]  # the shortest sample (1) twice


def test_no_shuffle_is_length_order():
    lengths = [5, 1, 4, 2, 3, 1]
    assert list(BucketBatchSampler(lengths, batch_size=2, shuffle=False)) == [[1, 5], [3, 4], [2, 0]]


def test_drop_last_drops_incomplete_batches_only():
    lengths = list(range(1, 11))
    batches = list(BucketBatchSampler(lengths, batch_size=4, drop_last=True))
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)


def test_split_instead_of_duplicate_on_uneven_ranks():
    lengths = [3] * 10  # 3 batches of 4,4,2 for 2 ranks -> one batch is split, nothing duplicated
    per_rank = _all_batches(lengths, 2, batch_size=4)
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert sorted(i for r in per_rank for b in r for i in b) == list(range(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of"),
        ({"batch_size": 2, "max_tokens": 10}, "exactly one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"batch_size": 2, "pool_size": 0}, "pool_size"),
        ({"batch_size": 2, "oversize": "truncate"}, "oversize"),
        ({"batch_size": 2, "num_replicas": 2, "rank": 2}, "rank"),
        ({"batch_size": 2, "num_replicas": 0, "rank": 0}, "num_replicas"),
        ({"batch_size": 2, "seed": "x"}, "seed"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketBatchSampler([1, 2, 3], **kwargs)


@pytest.mark.parametrize(
    ("lengths", "match"),
    [([], "empty"), ([3, 0, 2], "Sample 1 has length 0"), ([3, -2], "Sample 1 has length -2"), ([[1, 2]], "one-dim")],
)
def test_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        BucketBatchSampler(lengths, batch_size=2)


def test_oversize_error_names_the_sample():
    with pytest.raises(ValueError, match=r"Sample 2 has length 50 > max_tokens=20"):
        BucketBatchSampler([5, 6, 50, 7], max_tokens=20)


def test_oversize_skip_and_single():
    with pytest.warns(UserWarning, match="1 sample"):
        skip = BucketBatchSampler([5, 6, 50, 7], max_tokens=20, oversize="skip")
    assert sorted(i for b in skip for i in b) == [0, 1, 3]
    single = list(BucketBatchSampler([5, 6, 50, 7], max_tokens=20, oversize="single"))
    assert [2] in single and sorted(i for b in single for i in b) == [0, 1, 2, 3]


def test_resume_errors():
    s = BucketBatchSampler([1, 2, 3, 4], batch_size=2, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas=2"):
        BucketBatchSampler([1, 2, 3, 4], batch_size=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed=0"):
        BucketBatchSampler([1, 2, 3, 4], batch_size=2, seed=1, num_replicas=2, rank=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="after 9 batches"):
        s.load_state_dict({"epoch": 0, "consumed": 9})


def test_resolve_replicas_defaults_without_distributed():
    assert resolve_replicas(None, None) == (1, 0)


# ---------------------------------------------------------------- targets on the project corpus
@pytest.fixture(scope="module")
def fortune_lengths() -> np.ndarray:
    return np.load(FORTUNES)


def _efficiency(lengths, batches) -> float:
    processed = sum(len(b) * lengths[b].max() for b in batches)
    return lengths.sum() / processed


def test_corpus_token_budget_target(fortune_lengths):
    sampler = BucketBatchSampler(fortune_lengths, max_tokens=16384, shuffle=True)
    batches = [np.asarray(b) for b in sampler]
    assert _efficiency(fortune_lengths, batches) >= 0.95
    assert len(batches) <= 1.10 * math.ceil(fortune_lengths.sum() / 16384)


def test_corpus_batch_size_target(fortune_lengths):
    batches = [np.asarray(b) for b in BucketBatchSampler(fortune_lengths, batch_size=32, shuffle=True)]
    assert _efficiency(fortune_lengths, batches) >= 0.92


@pytest.mark.parametrize(("world", "bound"), [(2, 1.10), (3, 1.15)])
@pytest.mark.parametrize("kwargs", [{"max_tokens": 16384}, {"batch_size": 32}])
def test_corpus_rank_balance_target(fortune_lengths, world, bound, kwargs):
    per_rank = _all_batches(fortune_lengths, world, **kwargs)
    costs = np.array([[len(b) * fortune_lengths[b].max() for b in batches] for batches in per_rank])
    assert costs.shape[1] == len(per_rank[0])  # equal counts
    assert (costs.max(0) / costs.min(0)).mean() <= bound

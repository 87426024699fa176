from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt.data.planning import best_fit_decreasing, group_rows, next_fit_rows, plan_epoch, worst_case_batches
from lightning_txopt.data.report import padding_report

FORTUNES = Path(__file__).parent / "fortune_lengths.npy"


def _sequential_best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """The textbook one-sample-at-a-time best fit over a given order (the reference)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for sid in order.tolist():
        size = int(lengths[sid])
        fits = [r for r in range(len(rows)) if room[r] >= size]
        if fits:
            row = min(fits, key=lambda r: room[r])
        else:
            row = len(rows)
            rows.append([])
            room.append(capacity)
        rows[row].append(sid)
        room[row] -= size
    return rows


def _next_fit(lengths: list[int], capacity: int) -> list[int]:
    out, used, row = [], 0, 0
    for n in lengths:
        if used and used + n > capacity:
            row, used = row + 1, 0
        out.append(row)
        used += n
    return out


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=150), capacity=st.integers(64, 200))
def test_best_fit_decreasing_is_textbook_best_fit(lengths, capacity):
    lengths = np.asarray(lengths)
    order, offsets = best_fit_decreasing(lengths, np.arange(lengths.size), capacity)
    rows = [order[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    assert sorted(order.tolist()) == list(range(lengths.size))  # every sample once
    assert all(lengths[r].sum() <= capacity for r in rows)
    decreasing = np.argsort(-lengths, kind="stable")
    reference = _sequential_best_fit(lengths, decreasing, capacity)
    assert len(rows) == len(reference)  # as few rows as the reference...
    assert sorted(int(lengths[r].sum()) for r in rows) == sorted(int(lengths[r].sum()) for r in reference)  # ...same
    expected = np.repeat(np.arange(len(rows)), np.diff(offsets))
    assert next_fit_rows(lengths[order], capacity).tolist() == expected.tolist()  # the collator recovers the rows


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=80), capacity=st.integers(1, 64))
def test_next_fit_rows_matches_the_loop(lengths, capacity):
    assert next_fit_rows(lengths, capacity).tolist() == _next_fit(lengths, capacity)


def test_best_fit_random_ties_change_rows_not_their_quality():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 2000)
    a = best_fit_decreasing(lengths, np.arange(2000), 128, np.random.default_rng(1))
    b = best_fit_decreasing(lengths, np.arange(2000), 128, np.random.default_rng(2))
    assert a[1].size == b[1].size and not np.array_equal(a[0], b[0])


def test_best_fit_errors():
    with pytest.raises(ValueError, match="does not fit rows of 8"):
        best_fit_decreasing(np.array([9, 3]), np.arange(2), 8)
    with pytest.raises(ValueError, match="capacity"):
        best_fit_decreasing(np.array([3]), np.arange(1), 0)


def test_corpus_packing_target_and_minimum_batches():
    lengths = np.load(FORTUNES)
    row = {r.strategy: r for r in padding_report(lengths, max_tokens=16384, max_length=512)}["packed"]
    assert row.efficiency >= 0.995
    assert row.batches <= 1.02 * math.ceil(lengths.sum() / 16384)
    plan = plan_epoch(lengths, max_tokens=16384, pack_length=512, seed=0)
    assert plan.num_batches == row.batches


def test_plan_needs_a_budget_with_packing():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_epoch(np.array([3, 4]), batch_size=2, pack_length=8)
    with pytest.raises(ValueError, match="pack_length=9 > max_tokens=8"):
        plan_epoch(np.array([3, 4]), max_tokens=8, pack_length=9)


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(1, 60), min_size=1, max_size=120),
    per_batch=st.integers(1, 9),
    seed=st.integers(0, 3),
)
def test_group_rows_deals_every_row_once_into_balanced_batches(counts, per_batch, seed):
    c = np.array(counts)
    rows, offsets = group_rows(c, per_batch, rng=np.random.default_rng(seed))
    assert sorted(rows.tolist()) == list(range(c.size))  # every row exactly once
    batches = [rows[a:b] for a, b in itertools.pairwise(offsets.tolist())]
    assert len(batches) == math.ceil(c.size / per_batch)  # as few batches as consecutive rows would make
    assert all(0 < len(b) <= per_batch for b in batches)
    assert all((np.diff(b) > 0).all() for b in batches)  # creation order inside a batch
    sums = [int(c[b].sum()) for b in batches]
    assert max(sums) <= math.ceil(c.sum() / len(batches)) + c.max()  # the bound the static slots are sized by


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=80), per_batch=st.integers(1, 6), data=st.data())
def test_group_rows_cap_splits_batches_whole_rows_apart(counts, per_batch, data):
    c = np.array(counts)
    cap = data.draw(st.integers(int(c.max()), int(c.sum())))
    rows, offsets = group_rows(c, per_batch, max_samples=cap)
    assert sorted(rows.tolist()) == list(range(c.size))
    for a, b in itertools.pairwise(offsets.tolist()):
        assert 0 < b - a <= per_batch and int(c[rows[a:b]].sum()) <= cap
    with pytest.raises(ValueError, match="max_samples"):
        group_rows(c, per_batch, max_samples=int(c.max()) - 1) if c.max() > 1 else group_rows(c, 1, max_samples=0)


def test_packed_batches_hold_about_the_mean_number_of_samples_and_next_fit_recovers_their_rows():
    lengths = np.load(FORTUNES)
    plan = plan_epoch(lengths, max_tokens=16384, pack_length=512, seed=0)
    sizes = plan.sizes
    assert sizes.max() <= 1.2 * sizes.mean()  # consecutive rows: from a few dozen to over a thousand samples
    rows_seen = 0
    for b in range(plan.num_batches):
        ids = plan.batch(b)
        row_of = next_fit_rows(lengths[ids], 512)
        assert int(row_of[-1]) < 16384 // 512
        rows_seen += int(row_of[-1]) + 1
    _, row_offsets = best_fit_decreasing(lengths, np.arange(lengths.size), 512, np.random.default_rng(0))
    assert rows_seen == row_offsets.size - 1  # the same rows, regrouped
    capped = plan_epoch(lengths, max_tokens=16384, pack_length=512, seed=0, max_samples=300)
    assert capped.sizes.max() <= 300 and sorted(np.concatenate(capped.rank_batches(0)).tolist()) == list(
        range(lengths.size)
    )
    with pytest.raises(ValueError, match=r"max_samples.*pack_length"):
        plan_epoch(lengths, max_tokens=16384, max_samples=300)


# ---------------------------------------------------------------------------------------------- worst-case batches
@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 1024)), min_size=1, max_size=40),
    a=st.floats(0, 1),
    b=st.floats(0, 1),
)
def test_worst_case_batches_hold_the_worst_batch_of_every_weighting(shapes, a, b):
    """Against brute force: for any a, b >= 0, the batch maximising a * rows * width + b * rows * width**2 is
    matched by one of the chosen batches; the widest and the fullest are chosen too."""
    rows = np.array([r for r, _ in shapes])
    widths = np.array([w for _, w in shapes])
    chosen = worst_case_batches(rows, widths)
    assert len(chosen) == len(set(chosen)) and all(0 <= i < len(shapes) for i in chosen)
    assert chosen[0] == int(np.argmax(widths)) and int(np.argmax(rows)) in chosen
    tokens = rows.astype(np.float64) * widths
    cost = a * tokens / tokens.max() + b * tokens * widths / (tokens * widths).max()
    assert max(cost[i] for i in chosen) >= cost.max() * (1 - 1e-12)


def test_worst_case_batches_on_the_measured_plan():
    """The BERT-base plan at 323,136 tokens (H200, docs/results/token_budget_h200.md): the batch that needed the
    most memory (1,335 x 242) has neither the most padded tokens (9,232 x 35) nor the most width (199 x 512)."""
    rows, widths = np.array([199, 9232, 1335, 3630]), np.array([512, 35, 242, 88])
    assert worst_case_batches(rows, widths) == [0, 1, 2]


def test_worst_case_batches_checks_its_input():
    with pytest.raises(ValueError, match="one length"):
        worst_case_batches([1, 2], [3])
    with pytest.raises(ValueError, match="one length"):
        worst_case_batches([], [])

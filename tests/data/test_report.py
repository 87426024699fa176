from __future__ import annotations

import numpy as np
import pytest

from lightning_txopt.data.report import padding_report


def test_hand_computed_counts():
    # lengths 2,4,4,8; batch of 2; fixed to 8 -> 4*8 = 32; bucket: [2,4] -> 8, [4,8] -> 16
    rows = padding_report([2, 4, 4, 8], batch_size=2, max_length=8)
    by = {r.strategy: r for r in rows}
    assert by["fixed"].processed_tokens == 32 and by["fixed"].real_tokens == 18
    assert by["bucket"].processed_tokens == 24 and by["bucket"].batches == 2
    assert by["bucket"]["efficiency"] == pytest.approx(18 / 24)
    assert dict(by["dynamic"])["strategy"] == "dynamic"
    assert 24 <= by["dynamic"].processed_tokens <= 32


def test_budget_and_multiple_of():
    rows = padding_report([3, 3, 3, 3], max_tokens=8, pad_to_multiple_of=4, strategies=("bucket",))
    assert rows[0].batches == 2 and rows[0].processed_tokens == 16  # width 3 rounded to 4, two batches of 2


def test_fixed_truncates_real_tokens():
    rows = padding_report([2, 10], batch_size=2, max_length=4, strategies=("fixed",))
    assert rows[0].real_tokens == 6 and rows[0].processed_tokens == 8


def test_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy 'sorted'"):
        padding_report(np.array([1, 2]), batch_size=1, strategies=("sorted",))

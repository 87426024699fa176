from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_txopt.data.lengths import compute_lengths


def test_list_of_dicts_arrays_and_tensors():
    assert compute_lengths([{"input_ids": [1, 2]}, {"input_ids": [1]}]).tolist() == [2, 1]
    assert compute_lengths([np.zeros(3), torch.zeros(5), [1, 2]]).tolist() == [3, 5, 2]
    assert compute_lengths([{"ids": torch.zeros(1, 4)}], key="ids").tolist() == [4]
    assert compute_lengths([{"length": 7}, {"length": 2}]).tolist() == [7, 2]


def test_errors():
    with pytest.raises(KeyError, match="'input_ids'"):
        compute_lengths([{"text": "x"}])
    with pytest.raises(ValueError, match="empty"):
        compute_lengths([])
    with pytest.raises(ValueError, match="Sample 1 has length 0"):
        compute_lengths([[1], []])


def test_hf_dataset_vectorised_and_length_column():
    datasets = pytest.importorskip("datasets")
    rows = {"input_ids": [[1, 2, 3], [4], [5, 6]], "text": ["a", "b", "c"]}
    ds = datasets.Dataset.from_dict(rows)
    assert compute_lengths(ds).tolist() == [3, 1, 2]
    assert compute_lengths(ds.select([2, 0])).tolist() == [2, 3]  # respects an indices mapping
    assert compute_lengths(ds.add_column("length", [9, 9, 9])).tolist() == [9, 9, 9]
    with pytest.raises(KeyError, match="'labels'"):
        compute_lengths(ds, key="labels")

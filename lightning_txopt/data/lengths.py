"""Sequence lengths of a dataset, computed without decoding every column of every row."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_txopt.data.planning import as_lengths

__all__ = ["compute_lengths"]


def _is_hf_dataset(dataset: Any) -> bool:
    return hasattr(dataset, "column_names") and hasattr(dataset, "with_format") and hasattr(dataset, "select_columns")


def _item_length(item: Any, key: str, index: int) -> int:
    if isinstance(item, Mapping):
        if "length" in item and key not in item:
            return int(item["length"])
        if key not in item:
            raise KeyError(f"Sample {index} has no key {key!r} (keys: {sorted(item)}). Pass `key=` to name the column.")
        item = item[key]
    shape = getattr(item, "shape", None)
    if shape is not None:
        if len(shape) == 0:
            raise ValueError(f"Sample {index}: {key!r} is a scalar, not a sequence.")
        return int(shape[-1])
    return len(item)


def _hf_lengths(dataset: Any, key: str) -> np.ndarray:
    columns = list(dataset.column_names)
    if "length" in columns:
        return np.asarray(dataset.with_format("numpy")["length"])
    if key not in columns:
        raise KeyError(f"The dataset has no column {key!r} (columns: {columns}). Pass `key=` to name the column.")
    try:  # Arrow fast path: list lengths straight from the column buffers.
        import pyarrow.compute as pc

        column = dataset.select_columns([key]).with_format("arrow")[key]
        return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    except Exception:  # pragma: no cover - exotic column types fall back to a batched pass
        out: list[int] = []
        for batch in dataset.select_columns([key]).iter(batch_size=10_000):
            out.extend(len(x) for x in batch[key])
        return np.asarray(out)


def compute_lengths(dataset: Any, key: str = "input_ids") -> np.ndarray:
    """Return the length of every sample of ``dataset``.

    Accepts a Hugging Face ``datasets.Dataset`` (its ``length`` column when present, else the list lengths of ``key``
    read from Arrow in one vectorised pass), a sequence of mappings (``len(sample[key])``, or ``sample["length"]``),
    or a sequence of arrays, tensors or lists (their last dimension).

    Args:
        dataset: The samples.
        key: The column or key holding the token ids.

    Returns:
        A 1-D ``np.int64`` array with one length per sample.

    Raises:
        KeyError: If a sample or the dataset has no ``key``.
        ValueError: If the dataset is empty or a length is below 1.

    Example:
        >>> compute_lengths([{"input_ids": [101, 7, 102]}, {"input_ids": [101, 102]}])
        array([3, 2])
        >>> compute_lengths([[1, 2, 3, 4], [5]])
        array([4, 1])
    """
    if _is_hf_dataset(dataset):
        lengths = _hf_lengths(dataset, key)
    else:
        if not isinstance(dataset, Sequence | Iterable) and not hasattr(dataset, "__getitem__"):
            raise TypeError(f"Cannot compute lengths of a {type(dataset).__name__}: expected a sequence of samples.")
        n = len(dataset)
        lengths = np.fromiter((_item_length(dataset[i], key, i) for i in range(n)), dtype=np.int64, count=n)
    return as_lengths(lengths)

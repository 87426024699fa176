"""Samples as columns: ``SampleBatch`` (what the collators pad and pack) and ``FlatSamples`` (a dataset of them).

A list of tokenised samples costs Python work per sample each time a batch is collated: every sample's ids become an
array and are checked. :class:`SampleBatch` holds the same samples as columns instead: each per-token key (the ids,
per-token labels, ...) as *one* flat array of the samples' values one after another, each per-sample key (a class
label, ``length``, ``index``) as one stacked array. :class:`FlatSamples` builds those columns once for a whole
in-memory dataset, and its ``__getitems__`` (which ``torch.utils.data.DataLoader`` calls with a batch's indices)
gathers a batch's columns with a few vectorised numpy operations, however many samples it holds.
:class:`~lightning_txopt.BucketDataModule` does this by default for datasets given as lists of mappings; the batches
are the same, element for element, as from the list itself.

Example:
    >>> flat = FlatSamples([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
    >>> batch = flat.__getitems__([1, 0])
    >>> batch.lengths.tolist(), batch.tokens["input_ids"].tolist(), batch.values["labels"].tolist()
    ([1, 3], [8, 5, 6, 7], [0, 1])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

__all__ = ["FlatSamples", "SampleBatch"]


def _array(value: Any) -> np.ndarray:
    if type(value) is np.ndarray:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biufc"


def concatenated(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays one after another.

    Empty ones do not take part in the result's dtype (``np.asarray([])`` is float64); no arrays give an empty int64
    array.
    """
    filled = [a for a in arrays if a.size]
    return np.concatenate(filled) if filled else np.zeros(0, dtype=np.int64)


def _column(samples: Sequence[Mapping[str, Any]], name: str) -> list[np.ndarray]:
    first = samples[0][name]
    if isinstance(first, str | bytes) or first is None:
        raise TypeError(
            f"Cannot collate key {name!r}: it holds {type(first).__name__} values. Remove non-numeric columns before "
            "batching (e.g. `dataset.remove_columns([...])`)."
        )
    return [_array(s[name]) for s in samples]


def _check_numbers(arrays: Sequence[np.ndarray], key: str) -> None:
    for dtype in {a.dtype for a in arrays if a.size}:
        if not _numeric(dtype):
            i = next(i for i, a in enumerate(arrays) if a.size and a.dtype == dtype)
            raise TypeError(f"Sample {i}: {key!r} holds {dtype} values; only numbers can be padded.")


def _ids(samples: Sequence[Mapping[str, Any]], key: str) -> list[np.ndarray]:
    """The token ids of every sample, checked: one-dimensional numbers."""
    arrays = [_array(s[key]) for s in samples]
    if any(a.ndim != 1 for a in arrays):
        i = next(i for i, a in enumerate(arrays) if a.ndim != 1)
        raise ValueError(f"Sample {i}: {key!r} must be one-dimensional, got shape {arrays[i].shape}.")
    _check_numbers(arrays, key)
    return arrays


@dataclass(frozen=True, eq=False)
class SampleBatch(Sequence[dict[str, Any]]):
    """Samples as columns: what :class:`FlatSamples` gives for a batch's indices, and what the collators take.

    ``lengths`` is each sample's number of tokens under ``input_key``. A key is *per-token* when every sample holds a
    one-dimensional array as long as its ids (``tokens``: the samples' values one after another, ``lengths.sum()``
    entries), *per-sample* when every sample holds a value of the same shape (``values``: stacked, one row per
    sample), and *mismatched* otherwise (``mismatched``: the collators refuse it, each with its own message).
    ``keys`` keeps the first sample's key order, so collated batches have the keys in the order the samples have them.

    It is also a sequence of the samples (``batch[i]`` is sample ``i`` as a dict of arrays), so a collate function that
    iterates samples still works on it.

    Example:
        >>> batch = SampleBatch.from_samples([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}])
        >>> batch.keys, batch.tokens["input_ids"].tolist(), batch.values["labels"].tolist()
        (('input_ids', 'labels'), [5, 6, 7], [1, 0])
        >>> batch[1]["input_ids"].tolist(), len(batch)
        ([7], 2)
    """

    input_key: str
    keys: tuple[str, ...]
    lengths: np.ndarray
    tokens: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    mismatched: tuple[str, ...] = ()

    @classmethod
    def from_samples(cls, samples: Sequence[Mapping[str, Any]], input_key: str = "input_ids") -> SampleBatch:
        """The columns of a list of mappings (one pass over the samples).

        Raises:
            ValueError: On no samples, or ids that are not one-dimensional.
            TypeError: On samples that are not mappings, non-numeric ids or per-token values, or a key holding text or
                ``None``.
            KeyError: When the first sample has no ``input_key``.
        """
        if not len(samples):
            raise ValueError("Cannot collate an empty list of samples.")
        first = samples[0]
        if not isinstance(first, Mapping):
            raise TypeError(f"Collators expect mappings (dicts) of features, got {type(first).__name__}.")
        if input_key not in first:
            raise KeyError(f"Samples have no {input_key!r} key (keys: {sorted(first)}). Tokenise them first.")
        ids = _ids(samples, input_key)
        lengths = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
        tokens = {input_key: concatenated(ids)}
        values: dict[str, np.ndarray] = {}
        mismatched: list[str] = []
        for name in first:
            if name == input_key:
                continue
            arrays = _column(samples, name)
            shape = arrays[0].shape
            if all(a.ndim == 1 for a in arrays) and np.array_equal(
                np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays)), lengths
            ):
                _check_numbers(arrays, name)
                tokens[name] = concatenated(arrays)
            elif all(a.shape == shape for a in arrays):
                values[name] = np.stack(arrays)
            else:
                mismatched.append(name)
        return cls(input_key, tuple(first), lengths, tokens, values, tuple(mismatched))

    def __len__(self) -> int:
        return int(self.lengths.size)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        """Sample ``i`` as a dict of arrays (mismatched keys are not kept: they are absent)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"Sample {i} of a batch of {len(self)}.")
        i %= len(self)
        begin = int(self.starts[i])
        end = begin + int(self.lengths[i])
        out: dict[str, Any] = {}
        for name in self.keys:
            if name in self.tokens:
                out[name] = self.tokens[name][begin:end]
            elif name in self.values:
                out[name] = self.values[name][i]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    @cached_property
    def starts(self) -> np.ndarray:
        """Where each sample's tokens begin in the flat per-token columns (computed when first asked for)."""
        return np.cumsum(self.lengths) - self.lengths

    def take(self, indices: Any) -> SampleBatch:
        """The samples at ``indices`` (in that order), gathered without a Python loop over them.

        Example:
            >>> batch = SampleBatch.from_samples([{"input_ids": [5, 6]}, {"input_ids": [7]}, {"input_ids": [8, 9]}])
            >>> batch.take([2, 1]).tokens["input_ids"].tolist()
            [8, 9, 7]
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lengths = self.lengths[idx]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if ends.size else 0
        # the flat position of every gathered token: its sample's start in the source, plus its offset in the sample
        source = np.repeat(self.starts[idx] - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)
        tokens = {name: column[source] for name, column in self.tokens.items()}
        values = {name: column[idx] for name, column in self.values.items()}
        return SampleBatch(self.input_key, self.keys, lengths, tokens, values, self.mismatched)

    def truncated(self, max_length: int) -> SampleBatch:
        """Every sample cut to its first ``max_length`` tokens (every per-token key alike).

        Example:
            >>> SampleBatch.from_samples([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]).truncated(2).lengths.tolist()
            [2, 1]
        """
        offset = np.arange(int(self.lengths.sum()), dtype=np.int64) - np.repeat(self.starts, self.lengths)
        keep = offset < max_length
        tokens = {name: column[keep] for name, column in self.tokens.items()}
        lengths = np.minimum(self.lengths, max_length)
        return SampleBatch(self.input_key, self.keys, lengths, tokens, dict(self.values), self.mismatched)

    def with_values(self, name: str, values: np.ndarray) -> SampleBatch:
        """This batch with a per-sample key added (last in ``keys``), e.g. each sample's dataset ``index``."""
        keys = self.keys if name in self.keys else (*self.keys, name)
        new_values = {**self.values, name: np.asarray(values)}
        return SampleBatch(self.input_key, keys, self.lengths, dict(self.tokens), new_values, self.mismatched)


def as_sample_batch(samples: Sequence[Mapping[str, Any]] | SampleBatch, input_key: str) -> SampleBatch:
    """``samples`` as columns: a :class:`SampleBatch` as it is, a list of mappings converted (one pass)."""
    if isinstance(samples, SampleBatch):
        if samples.input_key != input_key:
            raise ValueError(
                f"This batch's columns were built with input_key={samples.input_key!r}, the collator reads "
                f"{input_key!r}: build FlatSamples with the collator's input_key."
            )
        return samples
    return SampleBatch.from_samples(samples, input_key)


class FlatSamples(torch.utils.data.Dataset):
    """An in-memory dataset of tokenised samples whose batches come out as columns (:class:`SampleBatch`).

    ``FlatSamples(samples)[i]`` is ``samples[i]`` itself (with its ``index`` when ``with_index``);
    ``__getitems__(indices)``, which ``DataLoader`` calls with each batch's indices, gathers the batch from flat
    columns built once here, with no Python work per sample. :class:`~lightning_txopt.PaddingCollator` and
    :class:`~lightning_txopt.PackingCollator` take the result and give the same tensors as from the list of samples.

    Args:
        samples: A sequence of mappings (``{"input_ids": [...], "labels": 3}``); kept, not copied.
        input_key: The key holding the token ids (whose lengths make the per-token columns).
        with_index: Add each sample's position in ``samples`` as a per-sample ``index`` key (what evaluation and
            prediction batches carry).

    Raises:
        ValueError: When the samples cannot be held as columns: some key is neither per-token nor per-sample of one
            shape over the whole dataset, samples disagree on their keys, or a one-dimensional per-sample key is as
            long as some sample (a per-batch collator could take it for per-token). Use the list itself then.
        TypeError, KeyError: As :meth:`SampleBatch.from_samples`.

    Example:
        >>> flat = FlatSamples([{"input_ids": [5, 6]}, {"input_ids": [7]}], with_index=True)
        >>> flat[1], flat.__getitems__([1]).values["index"].tolist()
        ({'input_ids': [7], 'index': 1}, [1])
    """

    def __init__(self, samples: Sequence[Mapping[str, Any]], input_key: str = "input_ids", with_index: bool = False):
        self.samples = samples
        self.with_index = with_index
        if len(samples) and isinstance(samples[0], Mapping):
            keys = set(samples[0])
            if any(not isinstance(s, Mapping) or set(s) != keys for s in samples):
                raise ValueError(
                    f"Not every sample is a mapping with the keys {sorted(keys)}: these samples cannot be held as "
                    "columns."
                )
        columns = SampleBatch.from_samples(samples, input_key)
        if columns.mismatched:
            raise ValueError(
                f"Key(s) {list(columns.mismatched)} are neither one value per token nor one value of one shape per "
                "sample over the whole dataset: these samples cannot be held as columns."
            )
        for name, column in columns.values.items():
            if column.ndim == 2 and np.isin(column.shape[1], columns.lengths).item():
                raise ValueError(
                    f"Key {name!r} holds {column.shape[1]} values per sample, as many as some sample has tokens: a "
                    "batch of such samples could read it as per-token. Keep these samples as a list."
                )
        self.columns = columns

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        item = self.samples[i]
        return {**item, "index": i} if self.with_index else item

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """The samples at ``indices`` as columns (what ``DataLoader`` asks for, one batch at a time)."""
        batch = self.columns.take(indices)
        return batch.with_values("index", np.asarray(indices, dtype=np.int64)) if self.with_index else batch

"""Padding-free packing: ``PackingCollator`` lays the samples of a batch into rows and describes their boundaries.

The planner (:func:`~lightning_txopt.data.planning.best_fit_decreasing`, used by
:func:`~lightning_txopt.data.planning.plan_epoch` with ``pack_length``) fills rows of ``pack_length`` tokens; a batch
is ``max_tokens // pack_length`` rows. :class:`PackingCollator` rebuilds those rows. The batch *describes* where each
sample starts and ends; it holds no attention mask. The model side turns that description into what its attention
needs (``lightning_txopt.models``): the variable-length kernel reads the boundaries directly, SDPA and eager
attention get exact block masks built from them. Both paths read the same boundaries.

Layout of a packed batch (``R`` rows of width ``W``, ``N`` samples):

* ``input_ids`` ``(R, W)``: the samples of each row concatenated; the end of a row is padding (``pad_token_id``);
* ``position_ids`` ``(R, W)``: restart at ``position_offset`` (0; RoBERTa-style models need ``padding_idx + 1``,
  which the model side adds) for every sample; padding tokens have position ``position_offset`` (a row may be wider
  than the model's position table);
* ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32): boundaries of every *segment* over the ``R * W`` tokens read row
  after row, where a segment is a sample or the padding run at the end of a row (empty when the row is full): every
  token belongs to exactly one segment, and sample ``i`` is segment ``i + row of i`` (Hugging Face's and
  FlashAttention's varlen format, with the padding in segments of its own so that nothing attends across a sample
  and no output is undefined). ``max_length_q`` = ``max_length_k`` (int): the longest segment;
* ``cu_seq_lens`` (int32) ``(N + 1,)``: boundaries of the samples over their real tokens only (what throughput
  counters read); ``cls_index``/``last_index`` ``(N, 2)``: ``(row, column)`` of each sample's first and last token;
* labels: one per sample (sequence classification) or one per token (padding and, with ``causal=True``, each sample's
  first token get ``label_pad_token_id``, so that no token learns to predict the next sample); other keys: one number
  per sample (stacked) or one per token (packed like the ids).

With ``rows`` and ``num_slots`` (static shapes, for ``torch.compile``) every tensor has the same shape in every batch:
exactly ``rows`` rows of exactly ``pack_length`` tokens, per-sample tensors padded to ``num_slots`` entries (labels
with ``label_pad_token_id``, indices with 0, ``index`` with -1), and the segment boundaries padded with empty segments
to ``num_slots + rows`` segments; ``max_length_q`` is then ``pack_length``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from lightning_txopt.data.flat import SampleBatch, as_sample_batch
from lightning_txopt.data.planning import next_fit_rows
from lightning_txopt.utils.checks import check_positive_int

__all__ = ["PACKED_KEYS", "PackingCollator", "is_packed"]

#: Keys a packed batch has beside the ids and labels (the boundary description).
PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cu_seq_lens")


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether a batch is packed (it carries segment boundaries), as built by :class:`PackingCollator`.

    Example:
        >>> is_packed(PackingCollator(8)([{"input_ids": [5, 6]}])), is_packed({"input_ids": torch.zeros(1, 2)})
        (True, False)
    """
    return "cu_seq_lens_q" in batch


class PackingCollator:
    """Collate the samples of a packed batch into rows without padding between samples (layout: module docstring).

    Args:
        pack_length: Row width in tokens (the planner's ``pack_length``); ``None`` puts the whole batch in one row.
        rows: Static shapes: exactly this many rows of exactly ``pack_length`` tokens per batch (``None``: as many
            rows as the batch needs, as wide as its longest row).
        num_slots: Static shapes: per-sample tensors padded to this many entries (at least the most samples a batch
            can hold); needs ``rows``.
        pad_token_id: Fills the end of rows.
        causal: Per-token labels are next-token targets: each sample's first label is ignored.
        label_pad_token_id: Ignored label value.
        input_key: Key of the token ids.
        position_offset: Added to every position (0 for most models; the model side handles RoBERTa's offset).
        max_length: Longest sample allowed (longer ones raise unless ``truncation``).
        truncation: Cut samples (and their per-token keys) to ``max_length`` instead of raising.

    Raises:
        ValueError: On invalid arguments; when called, on a sample without tokens, a sample longer than a row, more
            rows or samples than the static shape holds, or labels that cannot be packed.
        TypeError: When called with non-numeric values.

    Example:
        >>> collate = PackingCollator(8)
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8, 9], "labels": 0}])
        >>> batch["input_ids"].tolist(), batch["position_ids"].tolist()
        ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]])
        >>> batch["cu_seq_lens_q"].tolist(), batch["max_length_q"], batch["labels"].tolist()
        ([0, 3, 5, 5], 3, [1, 0])
        >>> static = PackingCollator(4, rows=2, num_slots=3)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> static["input_ids"].tolist(), static["cu_seq_lens_q"].tolist()
        ([[5, 6, 7, 8], [0, 0, 0, 0]], [0, 3, 4, 4, 8, 8])
    """

    #: Takes a batch's samples as columns (:class:`~lightning_txopt.data.flat.SampleBatch`) as well as a list of
    #: mappings: ``BucketDataModule`` then reads in-memory datasets as columns (``flat_samples``).
    accepts_columns: ClassVar[bool] = True

    def __init__(
        self,
        pack_length: int | None = None,
        *,
        rows: int | None = None,
        num_slots: int | None = None,
        pad_token_id: int = 0,
        causal: bool = False,
        label_pad_token_id: int = -100,
        input_key: str = "input_ids",
        position_offset: int = 0,
        max_length: int | None = None,
        truncation: bool = False,
    ) -> None:
        check_positive_int("pack_length", pack_length, optional=True)
        check_positive_int("rows", rows, optional=True)
        check_positive_int("num_slots", num_slots, optional=True)
        check_positive_int("position_offset", position_offset, minimum=0)
        check_positive_int("max_length", max_length, optional=True)
        if truncation and max_length is None:
            raise ValueError("truncation=True needs `max_length` (the length to cut samples to).")
        if rows is not None and pack_length is None:
            raise ValueError("`rows` (static shapes) needs `pack_length`: the width every row is padded to.")
        if (rows is None) != (num_slots is None):
            raise ValueError(
                f"Static shapes need both `rows` and `num_slots` (got rows={rows!r}, num_slots={num_slots!r})."
            )
        self.pack_length = pack_length
        self.rows = rows
        self.num_slots = num_slots
        self.pad_token_id = pad_token_id
        self.causal = causal
        self.label_pad_token_id = label_pad_token_id
        self.input_key = input_key
        self.position_offset = position_offset
        self.max_length = max_length
        self.truncation = truncation

    @property
    def static(self) -> bool:
        """Whether every batch has the same shapes (``rows`` and ``num_slots`` set)."""
        return self.rows is not None

    def __call__(self, samples: Sequence[Mapping[str, Any]] | SampleBatch) -> dict[str, Any]:
        """Pack ``samples`` (in the planner's order) into rows.

        ``samples``: mappings, or their columns as a :class:`~lightning_txopt.data.flat.SampleBatch`.
        """
        key = self.input_key
        batch = as_sample_batch(samples, key)
        lens = batch.lengths
        if (lens == 0).any():
            raise ValueError(f"Sample {int(np.argmin(lens))} has no tokens; remove empty samples before packing.")
        if self.max_length is not None and lens.max() > self.max_length:
            if not self.truncation:
                i = int(np.argmax(lens))
                raise ValueError(
                    f"Sample {i} of the batch has {int(lens[i])} tokens > max_length={self.max_length}. Truncate when "
                    "tokenising, or pass truncation=True to cut it here."
                )
            batch = batch.truncated(self.max_length)
            lens = batch.lengths
        n = lens.size
        capacity = self.pack_length if self.pack_length is not None else int(lens.sum())
        if lens.max() > capacity:
            i = int(np.argmax(lens))
            raise ValueError(f"Sample {i} has {int(lens[i])} tokens > pack_length={capacity}: it fits no row.")
        row_of = next_fit_rows(lens, capacity)
        used_rows = int(row_of[-1]) + 1
        ends = np.cumsum(lens)
        begins = ends - lens  # start of each sample in the concatenated tokens
        first_of_row = np.flatnonzero(np.diff(row_of, prepend=-1))
        start = begins - begins[first_of_row][row_of]  # column of each sample's first token
        used = np.bincount(row_of, weights=lens, minlength=used_rows).astype(np.int64)
        if self.static:
            assert self.rows is not None and self.num_slots is not None and self.pack_length is not None
            if used_rows > self.rows or n > self.num_slots:
                raise ValueError(
                    f"A batch of {n} samples in {used_rows} rows does not fit the static shape of {self.rows} rows "
                    f"and {self.num_slots} sample slots; plan batches with max_tokens <= rows * pack_length."
                )
            n_rows, width, slots = self.rows, self.pack_length, self.num_slots
            used = np.concatenate([used, np.zeros(n_rows - used_rows, dtype=np.int64)])
        else:
            n_rows, width, slots = used_rows, int(used.max()), n
        total = int(ends[-1])
        offset_in_sample = np.arange(total, dtype=np.int64) - np.repeat(begins, lens)
        tok_row = np.repeat(row_of, lens)
        tok_col = np.repeat(start, lens) + offset_in_sample
        flat = tok_row * width + tok_col  # where each real token goes in the (rows * width) grid

        def in_rows(values: np.ndarray, fill: int, dtype: Any = np.int64) -> np.ndarray:
            """``values`` (one per real token) laid into the ``(rows, width)`` grid, ``fill`` elsewhere."""
            grid = np.full(n_rows * width, fill, dtype=dtype)
            grid[flat] = values
            return grid.reshape(n_rows, width)

        # padding tokens: position_offset, whatever the row's width
        position_ids = in_rows(offset_in_sample + self.position_offset, self.position_offset)

        # segments in reading order: each row's samples, then its padding run (empty when the row is full), so
        # that sample i is segment i + its row
        pad_len = width - used
        every_row = np.arange(n_rows, dtype=np.int64)
        seg_row = np.concatenate([row_of, every_row])
        seg_col = np.concatenate([start, used])
        seg_len = np.concatenate([lens, pad_len])
        seg_len = seg_len[np.lexsort((seg_col, seg_row))]
        n_segments = slots + n_rows
        cu_q = np.zeros(n_segments + 1, dtype=np.int32)
        np.cumsum(seg_len, out=cu_q[1 : seg_len.size + 1])
        cu_q[seg_len.size + 1 :] = cu_q[seg_len.size]  # static shapes: empty segments at the end
        cu_real = np.zeros(slots + 1, dtype=np.int32)
        cu_real[1 : n + 1] = ends
        cu_real[n + 1 :] = total
        max_length = width if self.static else int(seg_len.max())

        def per_sample(values: np.ndarray, fill: int | float) -> torch.Tensor:
            if slots == n:
                return torch.as_tensor(values)
            padded = np.full((slots, *values.shape[1:]), fill, dtype=values.dtype)
            padded[:n] = values
            return torch.as_tensor(padded)

        cu_q_tensor = torch.from_numpy(cu_q)
        out: dict[str, Any] = {
            key: torch.from_numpy(in_rows(batch.tokens[key], self.pad_token_id)),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seq_lens_q": cu_q_tensor,
            "cu_seq_lens_k": cu_q_tensor.clone(),
            "max_length_q": max_length,
            "max_length_k": max_length,
            "cu_seq_lens": torch.from_numpy(cu_real),
            "cls_index": per_sample(np.stack([row_of, start], 1), 0),
            "last_index": per_sample(np.stack([row_of, start + lens - 1], 1), 0),
        }
        keys = batch.keys
        if "labels" in keys or "label" in keys:
            name = "labels" if "labels" in keys else "label"
            if name in batch.tokens:
                labels = in_rows(batch.tokens[name], self.label_pad_token_id)
                if self.causal:  # nothing predicts a sample's first token
                    labels[row_of, start] = self.label_pad_token_id
                out["labels"] = torch.from_numpy(labels)
            elif name in batch.values and batch.values[name].ndim == 1:
                out["labels"] = per_sample(batch.values[name], self.label_pad_token_id)
            else:
                raise ValueError("Cannot pack labels: give one scalar label per sample or one label per token.")
        for name in keys:
            if name in (key, "labels", "label", "attention_mask", "position_ids"):
                continue  # rebuilt above (packed rows need no attention mask: the boundaries say it)
            if name in batch.tokens:
                out[name] = torch.from_numpy(in_rows(batch.tokens[name], 0, batch.tokens[name].dtype))
            elif name in batch.values and batch.values[name].ndim == 1:  # one number per sample (ids, weights)
                out[name] = per_sample(batch.values[name], -1 if name == "index" else 0)
            else:
                raise ValueError(f"Cannot pack key {name!r}: neither one number per sample nor one per token.")
        return out

"""``PaddingCollator``: pad a list of tokenised samples into a batch of tensors, vectorised."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lightning_txopt.data.flat import SampleBatch, as_sample_batch, concatenated
from lightning_txopt.utils.checks import check_positive_int, round_up

__all__ = ["PaddingCollator", "pad_sequences", "padded_widths"]

_PADDINGS = ("longest", "max_length")
_SIDES = ("right", "left")


def padded_widths(
    lengths: Any, *, pad_to_multiple_of: int | None = None, pad_to_lengths: Sequence[int] | None = None
) -> np.ndarray:
    """The width each length is padded to.

    That is the smallest rung of ``pad_to_lengths`` that holds it (a length above the top rung keeps its own), then
    rounded up to a multiple of ``pad_to_multiple_of``.

    Example:
        >>> padded_widths([3, 9, 64, 65, 700], pad_to_multiple_of=8, pad_to_lengths=(64, 512)).tolist()
        [64, 64, 64, 512, 704]
    """
    width = np.asarray(lengths, dtype=np.int64)
    if pad_to_lengths is not None:
        rungs = np.asarray(pad_to_lengths, dtype=np.int64)
        slot = np.searchsorted(rungs, width, side="left")
        width = np.where(slot < rungs.size, rungs[np.minimum(slot, rungs.size - 1)], width)
    return round_up(width, pad_to_multiple_of)


def pad_sequences(
    sequences: Sequence[np.ndarray], length: int, pad_value: int | float, *, side: str = "right"
) -> np.ndarray:
    """Pad 1-D arrays to ``length`` in one vectorised copy.

    Args:
        sequences: 1-D arrays, each at most ``length`` long.
        length: Width of the output.
        pad_value: Fill value.
        side: ``"right"`` or ``"left"``.

    Returns:
        A ``(len(sequences), length)`` array.

    Example:
        >>> pad_sequences([np.array([1, 2, 3]), np.array([4])], 4, 0).tolist()
        [[1, 2, 3, 0], [4, 0, 0, 0]]
        >>> pad_sequences([np.array([1, 2, 3]), np.array([4])], 4, 0, side="left").tolist()
        [[0, 1, 2, 3], [0, 0, 0, 4]]
    """
    lens = np.fromiter((s.size for s in sequences), dtype=np.int64, count=len(sequences))
    return _pad_flat(concatenated(sequences), _row_mask(lens, length, side), pad_value)


def _row_mask(lens: np.ndarray, width: int, side: str) -> np.ndarray:
    """``(len(lens), width)``: which cells of each row hold its sample's tokens (right- or left-aligned)."""
    cols = np.arange(width)
    return cols < lens[:, None] if side == "right" else cols >= (width - lens)[:, None]


def _pad_flat(flat: np.ndarray, mask: np.ndarray, pad_value: int | float) -> np.ndarray:
    """A ``mask.shape`` array of ``pad_value`` whose ``True`` cells (row-major) take ``flat``'s values in order."""
    dtype = np.result_type(flat.dtype, np.asarray(pad_value).dtype) if flat.size else int
    out = np.full(mask.shape, pad_value, dtype=dtype)
    if flat.size:
        out[mask] = flat
    return out


class PaddingCollator:
    """Collate tokenised samples into a dict of padded tensors.

    Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (created when absent), ``token_type_ids`` and
    every other per-token key such as ``position_ids`` or ``special_tokens_mask`` (with 0), and token-level ``labels``
    (with ``label_pad_token_id``). Scalar ``labels`` and other numeric keys of fixed shape are stacked. Nothing is
    truncated unless ``truncation=True``.

    Args:
        pad_token_id: Id used to pad ``input_ids``.
        padding: ``"longest"`` pads to the longest sample of the batch (dynamic padding), ``"max_length"`` pads every
            batch to ``max_length`` (fixed padding).
        max_length: Longest allowed sequence; required with ``padding="max_length"``.
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly shapes).
        pad_to_lengths: A ladder of widths (e.g. ``(64, 128, 256, 512)``): each batch is padded to the smallest
            rung that holds its longest sample, so a compiled model (``torch.compile``) sees at most one sequence
            length per rung. A batch longer than the top rung keeps its own width (rounded by
            ``pad_to_multiple_of``).
        padding_side: ``"right"`` or ``"left"``.
        label_pad_token_id: Fill value of token-level labels; ignored by the loss.
        truncation: Cut sequences longer than ``max_length`` instead of raising.
        input_key: Key holding the token ids.

    Raises:
        ValueError: On invalid arguments (at construction) and, when called, on a sequence longer than ``max_length``,
            on keys whose per-sample lengths differ from the token ids', or on missing ``input_key``.
        TypeError: When called with non-numeric values (e.g. raw text still in the samples).

    Example:
        >>> collate = PaddingCollator(pad_token_id=0)
        >>> batch = collate([{"input_ids": [101, 7, 102], "label": 1}, {"input_ids": [101, 102], "label": 0}])
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
        ([[101, 7, 102], [101, 102, 0]], [[1, 1, 1], [1, 1, 0]], [1, 0])
    """

    #: Takes a batch's samples as columns (:class:`~lightning_txopt.data.flat.SampleBatch`) as well as a list of
    #: mappings: ``BucketDataModule`` then reads in-memory datasets as columns (``flat_samples``).
    accepts_columns: ClassVar[bool] = True

    def __init__(
        self,
        pad_token_id: int,
        *,
        padding: Literal["longest", "max_length"] = "longest",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        pad_to_lengths: Sequence[int] | None = None,
        padding_side: Literal["right", "left"] = "right",
        label_pad_token_id: int = -100,
        truncation: bool = False,
        input_key: str = "input_ids",
    ) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(
                f"`pad_token_id` must be an integer, got {pad_token_id!r}. A tokenizer without a pad token (e.g. "
                "GPT-2) needs one first: `tokenizer.pad_token = tokenizer.eos_token`."
            )
        if padding not in _PADDINGS:
            raise ValueError(f"`padding` must be one of {_PADDINGS}, got {padding!r}.")
        if padding_side not in _SIDES:
            raise ValueError(f"`padding_side` must be one of {_SIDES}, got {padding_side!r}.")
        check_positive_int("max_length", max_length, optional=True)
        check_positive_int("pad_to_multiple_of", pad_to_multiple_of, optional=True)
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs `max_length` (the fixed length to pad every batch to).")
        if truncation and max_length is None:
            raise ValueError("truncation=True needs `max_length`.")
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            raise ValueError(
                f"max_length={max_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}; "
                "padded shapes would exceed max_length. Choose values that divide."
            )
        if pad_to_lengths is not None:
            rungs = list(pad_to_lengths)
            if (
                not rungs
                or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rungs)
                or any(b <= a for a, b in itertools.pairwise(rungs))
            ):
                raise ValueError(
                    f"`pad_to_lengths` must be a non-empty, strictly increasing sequence of positive integers, got "
                    f"{pad_to_lengths!r}."
                )
            if padding == "max_length":
                raise ValueError("`pad_to_lengths` goes with padding='longest'; padding='max_length' has one width.")
            if pad_to_multiple_of is not None and any(r % pad_to_multiple_of for r in rungs):
                raise ValueError(
                    f"Every rung of pad_to_lengths={rungs} must be a multiple of pad_to_multiple_of="
                    f"{pad_to_multiple_of}."
                )
            if max_length is not None and rungs[-1] > max_length:
                raise ValueError(
                    f"The top rung of pad_to_lengths={rungs} exceeds max_length={max_length}: batches would be padded "
                    "past the longest allowed sequence."
                )
        self.pad_to_lengths: tuple[int, ...] | None = tuple(pad_to_lengths) if pad_to_lengths is not None else None
        self.pad_token_id = pad_token_id
        self.padding = padding
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.label_pad_token_id = label_pad_token_id
        self.truncation = truncation
        self.input_key = input_key

    def padded_length(self, longest: int) -> int:
        """Width of a batch whose longest sequence has ``longest`` tokens.

        Example:
            >>> PaddingCollator(0, pad_to_multiple_of=8).padded_length(13)
            16
            >>> PaddingCollator(0, pad_to_lengths=(64, 128, 512)).padded_length(65)
            128
        """
        return int(self.padded_lengths(np.array([longest]))[0])

    def padded_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`padded_length`: the width each sample would be padded to in a batch of its own.

        Padding is monotone, so a batch's width is the largest of its samples' padded lengths: planning batches on
        these lengths makes a token budget hold for the padded batch.

        Example:
            >>> PaddingCollator(0, pad_to_lengths=(32, 64)).padded_lengths(np.array([3, 32, 33, 70])).tolist()
            [32, 32, 64, 70]
        """
        if self.padding == "max_length":
            assert self.max_length is not None
            return np.full_like(np.asarray(lengths, dtype=np.int64), self.max_length)
        return padded_widths(lengths, pad_to_multiple_of=self.pad_to_multiple_of, pad_to_lengths=self.pad_to_lengths)

    def _pad_value(self, key: str) -> int:
        if key == self.input_key:
            return self.pad_token_id
        if key == "labels" or key.endswith("labels"):
            return self.label_pad_token_id
        return 0

    def __call__(self, samples: Sequence[Mapping[str, Any]] | SampleBatch) -> dict[str, torch.Tensor]:
        """Collate ``samples`` into a dict of tensors.

        ``samples``: mappings, or their columns as a :class:`~lightning_txopt.data.flat.SampleBatch`.
        """
        key = self.input_key
        batch = as_sample_batch(samples, key)
        lens = batch.lengths
        if self.max_length is not None and lens.max() > self.max_length:
            if not self.truncation:
                i = int(np.argmax(lens))
                raise ValueError(
                    f"Sample {i} of the batch has {int(lens[i])} tokens > max_length={self.max_length}. "
                    "Truncate when tokenising, or pass truncation=True to cut it here."
                )
            batch = batch.truncated(self.max_length)
            lens = batch.lengths
        width = self.padded_length(int(lens.max()))
        mask = _row_mask(lens, width, self.padding_side)
        out: dict[str, torch.Tensor] = {key: torch.from_numpy(_pad_flat(batch.tokens[key], mask, self.pad_token_id))}
        if "attention_mask" not in batch.keys:
            out["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        for name in batch.keys:
            if name == key:
                continue
            target = "labels" if name in ("label", "labels", "label_ids") else name
            if name in batch.tokens:
                out[target] = torch.from_numpy(_pad_flat(batch.tokens[name], mask, self._pad_value(target)))
            elif name in batch.values:
                out[target] = torch.as_tensor(batch.values[name])
            else:
                raise ValueError(
                    f"Cannot pad key {name!r}: its per-sample lengths differ from those of {key!r}. Only "
                    "per-token features can be padded; remove the column or pad it yourself."
                )
        return out

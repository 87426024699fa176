"""``padding_report``: how many of the processed tokens are real, for each batching strategy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lightning_txopt.data.collator import padded_widths
from lightning_txopt.data.planning import as_lengths, next_fit_rows, plan_epoch
from lightning_txopt.utils.checks import round_up

__all__ = ["PaddingRow", "padding_report", "STRATEGIES"]

STRATEGIES = ("fixed", "dynamic", "bucket", "packed")


@dataclasses.dataclass(frozen=True)
class PaddingRow:
    """One row of :func:`padding_report`; readable as attributes or as a mapping (``row["efficiency"]``)."""

    strategy: str
    batches: int
    real_tokens: int
    processed_tokens: int
    efficiency: float

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        """Field names, so that ``dict(row)`` works."""
        return tuple(f.name for f in dataclasses.fields(self))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict."""
        return dataclasses.asdict(self)


def _packed_tokens(lengths: np.ndarray, capacity: int) -> int:
    """Tokens a packed batch processes: rows x the longest row (what PackingCollator builds)."""
    row_len = np.bincount(next_fit_rows(lengths, capacity), weights=lengths)
    return int(row_len.size * row_len.max())


def padding_report(
    lengths: npt.ArrayLike | Sequence[int],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    pad_to_lengths: Sequence[int] | None = None,
    seed: int = 0,
    epoch: int = 0,
    num_replicas: int = 1,
    strategies: Sequence[str] | None = None,
    pack_length: int | None = None,
) -> list[PaddingRow]:
    """Count real and processed (padded) tokens of one epoch under each batching strategy.

    Strategies: ``"fixed"`` pads every sample to ``max_length`` (default: the longest sample); ``"dynamic"`` pads
    random batches to their longest sample; ``"bucket"`` is :class:`~lightning_txopt.data.sampler.BucketBatchSampler`
    (length-grouped, shuffled); ``"packed"`` concatenates samples into rows of ``pack_length`` tokens (only the end
    of each row is padded). With ``max_tokens`` the batches of each strategy fill that budget of padded tokens.

    Args:
        lengths: One length per sample.
        batch_size: Samples per batch (exactly one of ``batch_size``/``max_tokens``).
        max_tokens: Padded-token budget per batch.
        max_length: Fixed length of the ``"fixed"`` strategy; samples are counted as truncated to it.
        pad_to_multiple_of: Round each batch's width up to a multiple of this.
        pad_to_lengths: Pad each batch to the smallest of these widths that holds it (a ladder of shapes, see
            :class:`~lightning_txopt.data.collator.PaddingCollator`).
        seed: Shuffling seed.
        epoch: Epoch whose plan is counted.
        num_replicas: Ranks the batches are dealt to (splits change the counts slightly).
        strategies: Which rows to compute, in order; default: fixed, dynamic, bucket, and packed when
            ``max_tokens`` is given.
        pack_length: Row length of ``"packed"`` (default: ``max_length``, else the longest sample).

    Returns:
        One :class:`PaddingRow` per strategy with ``batches``, ``real_tokens``, ``processed_tokens`` and
        ``efficiency = real_tokens / processed_tokens``.

    Raises:
        ValueError: On an unknown strategy or invalid batching options.

    Example:
        >>> rows = padding_report([2, 4, 4, 8], batch_size=2, max_length=8, strategies=("fixed", "bucket"))
        >>> [(r.strategy, r.batches, r.real_tokens, r.processed_tokens) for r in rows]
        [('fixed', 2, 18, 32), ('bucket', 2, 18, 24)]
    """
    lens = as_lengths(lengths)
    if strategies is None:
        strategies = STRATEGIES if max_tokens is not None else STRATEGIES[:3]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategy {unknown[0]!r}; choose from {STRATEGIES}.")
    fixed_len = int(lens.max()) if max_length is None else max_length
    if fixed_len < 1:
        raise ValueError(f"`max_length` must be >= 1, got {max_length!r}.")
    truncated = np.minimum(lens, fixed_len)
    real = int(truncated.sum())
    rows: list[PaddingRow] = []
    common: dict[str, Any] = dict(
        batch_size=batch_size, max_tokens=max_tokens, seed=seed, epoch=epoch, num_replicas=num_replicas
    )
    for strategy in strategies:
        if strategy == "packed":
            if max_tokens is None:
                raise ValueError("The 'packed' strategy fills a token budget: give `max_tokens`.")
            row = pack_length or fixed_len
            plan = plan_epoch(truncated, pack_length=min(row, max_tokens), **common)
            processed = sum(
                _packed_tokens(truncated[plan.batch(b)], min(row, max_tokens)) for b in range(plan.num_batches)
            )
            rows.append(PaddingRow(strategy, plan.num_batches, real, processed, real / processed))
            continue
        if strategy == "fixed":
            plan = plan_epoch(np.full_like(truncated, fixed_len), group_by_length=False, **common)
            width = round_up(np.full(plan.num_batches, fixed_len), pad_to_multiple_of)
        else:
            # plan on padded widths, as the DataModule does, so that a token budget holds for the padded batches
            padded = padded_widths(truncated, pad_to_multiple_of=pad_to_multiple_of, pad_to_lengths=pad_to_lengths)
            plan = plan_epoch(padded, group_by_length=strategy == "bucket", **common)
            width = plan.max_lengths(padded)
        processed = int((plan.sizes * width).sum())
        rows.append(
            PaddingRow(
                strategy=strategy,
                batches=plan.num_batches,
                real_tokens=real,
                processed_tokens=processed,
                efficiency=real / processed if processed else math.nan,
            )
        )
    return rows

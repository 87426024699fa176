"""Pure batch planning: which samples go together, in which order, on which rank.

Everything here is a pure function of ``(lengths, seed, epoch, num_replicas)`` and the batching options, so every rank
computes the same plan without communicating and a restarted job recomputes exactly the plan it was interrupted in.
The samplers and the DataModule only decide *when* to call it.

The recipe (the one fairseq's ``batch_by_size`` popularised, plus DDP balancing):

1. shuffle the sample ids (seeded by ``(seed, epoch)``), then stable-sort them by length, globally or inside pools of
   ``pool_size`` samples: equal lengths end up in a random order, so batch composition changes every epoch;
2. cut the sorted ids into batches of ``batch_size`` samples, or greedily into the largest batches whose padded size
   ``len(batch) * max(length)`` fits ``max_tokens``;
3. with several replicas, make the batch count divisible by ``num_replicas`` by splitting the largest batches (no
   sample is duplicated or dropped; only when every batch holds a single sample are the shortest repeated), sort
   batches by padded cost and deal consecutive batches of similar cost to the ranks of one step, so that no rank
   waits for another;
4. shuffle the order of the steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from lightning_txopt.utils.checks import check_exactly_one_budget, check_positive_int

OversizePolicy = Literal["error", "skip", "single"]
OVERSIZE_POLICIES = ("error", "skip", "single")

__all__ = [
    "OVERSIZE_POLICIES",
    "EpochPlan",
    "OversizePolicy",
    "as_lengths",
    "best_fit_decreasing",
    "group_rows",
    "next_fit_rows",
    "plan_epoch",
    "worst_case_batches",
]


def as_lengths(lengths: npt.ArrayLike | Sequence[int]) -> np.ndarray:
    """Validate and convert sequence lengths to a 1-D ``int64`` array.

    Args:
        lengths: One positive integer per sample.

    Returns:
        The lengths as a contiguous ``np.int64`` array.

    Raises:
        ValueError: If ``lengths`` is empty, not one-dimensional, not integral, or holds a length below 1.

    Example:
        >>> as_lengths([3, 1, 2])
        array([3, 1, 2])
    """
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"`lengths` must be one-dimensional, got an array of shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("`lengths` is empty: there is nothing to batch. Check that the dataset has samples.")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"`lengths` must hold integers, got dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"Sample {i} has length {int(arr[i])}; every length must be >= 1 "
            f"({bad.size} sample(s) are below 1). Remove empty samples before batching."
        )
    return arr


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch and how they are dealt to the ranks.

    Batches are stored in CSR form: batch ``b`` holds ``indices[offsets[b]:offsets[b + 1]]``.
    ``schedule[step, rank]`` is the batch that ``rank`` processes at ``step``.

    Attributes:
        indices: Sample ids, batch after batch.
        offsets: ``num_batches + 1`` boundaries into ``indices``.
        schedule: ``(num_steps, num_replicas)`` array of batch ids.
        skipped: Ids of samples left out of the epoch (``oversize="skip"``, or ``drop_last``).
        repeated: Ids of samples yielded twice. Only when the batches cannot be dealt evenly any other way: every
            batch holds a single sample and their count does not divide by ``num_replicas``.

    Example:
        >>> lengths = np.array([5, 1, 4, 2, 3, 1, 2])
        >>> plan = plan_epoch(lengths, batch_size=2, shuffle=False, num_replicas=2)
        >>> plan.num_batches, plan.num_steps, plan.sizes.tolist()
        (4, 2, [2, 2, 2, 1])
        >>> [b.tolist() for b in plan.rank_batches(0)], [b.tolist() for b in plan.rank_batches(1)]
        ([[1, 5], [0]], [[3, 6], [4, 2]])
        >>> plan.padded_tokens(lengths).tolist()  # len(batch) * its longest sample, by batch id
        [2, 4, 8, 5]
    """

    indices: np.ndarray
    offsets: np.ndarray
    schedule: np.ndarray
    skipped: np.ndarray
    repeated: np.ndarray

    @property
    def num_batches(self) -> int:
        """Number of batches over all ranks."""
        return int(self.schedule.size)

    @property
    def num_steps(self) -> int:
        """Number of batches per rank."""
        return int(self.schedule.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """Number of samples in each batch (indexed by batch id)."""
        return np.diff(self.offsets)

    def batch(self, batch_id: int) -> np.ndarray:
        """The sample ids of one batch."""
        return self.indices[self.offsets[batch_id] : self.offsets[batch_id + 1]]

    def rank_batches(self, rank: int = 0) -> list[np.ndarray]:
        """All batches of one rank, in the order that rank sees them."""
        return [self.batch(int(b)) for b in self.schedule[:, rank]]

    def max_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """The longest sample of each batch (indexed by batch id)."""
        return np.maximum.reduceat(lengths[self.indices], self.offsets[:-1])

    def padded_tokens(self, lengths: np.ndarray) -> np.ndarray:
        """``len(batch) * max(length)`` for each batch (indexed by batch id)."""
        return self.sizes * self.max_lengths(lengths)


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch, salt])


def _sorted_with_random_ties(lengths: np.ndarray, ids: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """``ids`` sorted by length; equal lengths in random order (``rng``) or in id order (``None``).

    Equivalent to a stable sort of a random permutation, but a radix sort plus a shuffle of each run of equal lengths
    touches memory far less: ~4x faster on 10M samples.
    """
    keys = lengths[ids]
    small = keys.max(initial=0) < 1 << 16
    order = ids[np.argsort(keys.astype(np.uint16) if small else keys, kind="stable")]
    if rng is not None and order.size > 1:
        sorted_keys = lengths[order]
        starts = np.flatnonzero(np.diff(sorted_keys)) + 1
        bounds = np.concatenate(([0], starts, [order.size])).tolist()
        for lo, hi in itertools.pairwise(bounds):
            if hi - lo > 1:
                rng.shuffle(order[lo:hi])
    return order


def best_fit_decreasing(
    lengths: np.ndarray, ids: np.ndarray, capacity: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``ids`` into rows of at most ``capacity`` tokens: best fit, longest first.

    Each sample goes to the open row with the least room that still holds it, or opens a new row. Equal lengths are
    taken in random order (``rng``) so rows differ between epochs.

    The samples are processed a length value at a time, and the rows a room value at a time: all rows with room
    ``r`` take ``r // L`` samples of length ``L`` each (exactly what one-by-one best fit does, since a row that took a
    sample is then the tightest fit for the next), so the work is ``O(n)`` array operations in about
    ``distinct lengths x distinct rooms`` vectorised steps, independent of ``n``: 10M lengths pack in seconds.

    Returns:
        ``(order, row_offsets)``: sample ids row by row (rows in creation order, each row longest first) and the
        ``rows + 1`` boundaries. Because a row is opened only when its first (longest) sample fits no earlier row,
        :func:`next_fit_rows` over ``order`` recovers exactly these rows.

    Raises:
        ValueError: If a sample is longer than ``capacity``.

    Example:
        >>> order, offsets = best_fit_decreasing(np.array([6, 5, 4, 3, 2]), np.arange(5), 10)
        >>> [order[a:b].tolist() for a, b in itertools.pairwise(offsets)]
        [[0, 2], [1, 3, 4]]
    """
    check_positive_int("capacity", capacity)
    if ids.size == 0:
        return ids.astype(np.int64), np.zeros(1, dtype=np.int64)
    longest = int(lengths[ids].max())
    if longest > capacity:
        raise ValueError(f"A sample of {longest} tokens does not fit rows of {capacity}.")
    order = _sorted_with_random_ties(lengths, ids, rng)[::-1]  # longest first, ties in random order
    sizes = lengths[order]
    starts = np.flatnonzero(np.diff(sizes)) + 1
    bounds = np.concatenate(([0], starts, [order.size])).tolist()
    rooms: dict[int, list[int]] = {}  # room -> open rows with exactly that room (a stack)
    open_rooms = np.zeros(capacity + 1, dtype=bool)  # open_rooms[r]: some open row has room r
    rows_of: list[np.ndarray] = []  # row of each placed sample, chunk by chunk, in order
    n_rows = 0
    for lo, hi in itertools.pairwise(bounds):
        size = int(sizes[lo])
        placed = lo
        while placed < hi:
            left = hi - placed
            candidates = np.flatnonzero(open_rooms[size:])
            if candidates.size:  # the tightest open rows: each takes room // size samples
                room = size + int(candidates[0])
                stack = rooms[room]
                per_row = room // size
                take = min(len(stack), -(-left // per_row))
                rows = stack[len(stack) - take :]
                del stack[len(stack) - take :]
                if not stack:
                    open_rooms[room] = False
            else:  # no open row holds it: open rows of capacity // size samples
                room, per_row = capacity, capacity // size
                take = -(-left // per_row)
                rows = list(range(n_rows, n_rows + take))
                n_rows += take
            last = min(left - per_row * (take - 1), per_row)  # the last row may take fewer
            counts = np.full(take, per_row, dtype=np.int64)
            counts[-1] = last
            rows_of.append(np.repeat(np.asarray(rows, dtype=np.int64), counts))
            placed += per_row * (take - 1) + last
            # every row but the last is left with the same room: push them in (at most) two groups
            for group, count in ((rows[:-1], per_row), (rows[-1:], last)):
                rest = room - count * size
                if rest > 0 and group:
                    rooms.setdefault(rest, []).extend(group)
                    open_rooms[rest] = True
    row_of = np.concatenate(rows_of)
    by_row = np.argsort(row_of, kind="stable")  # rows in creation order; inside a row, longest first
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=offsets[1:])
    return order[by_row], offsets


def group_rows(
    counts: np.ndarray, rows_per_batch: int, *, max_samples: int | None = None, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deal packed rows into batches of at most ``rows_per_batch`` rows with similar numbers of samples.

    ``counts[r]`` is row ``r``'s number of samples. Best fit decreasing creates the rows of the shortest samples last;
    batches of consecutive rows would hold a few long samples early and thousands of short ones at the end, which
    sizes every static batch (and the attention kernel's grid, one block per sample) for the worst one. Instead the
    rows, most samples first (ties in random order with ``rng``), are dealt to ``ceil(rows / rows_per_batch)``
    batches in snake order (0, 1, ..., B-1, B-1, ..., 0, ...), so that every batch holds about the mean number of
    samples, at most about the mean plus the fullest row. Inside a batch the rows keep their creation order (what
    :func:`next_fit_rows` needs to recover them). A batch over ``max_samples`` is split, whole rows apart.

    Returns:
        ``(rows, offsets)``: the row ids batch by batch, and the ``batches + 1`` boundaries into it.

    Raises:
        ValueError: If one row holds more than ``max_samples`` samples.

    Example:
        >>> rows, offsets = group_rows(np.array([1, 1, 9, 8, 2, 2]), 2)
        >>> [rows[a:b].tolist() for a, b in itertools.pairwise(offsets)]
        [[1, 2], [0, 3], [4, 5]]
    """
    check_positive_int("rows_per_batch", rows_per_batch)
    n_rows = counts.size
    if n_rows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    if max_samples is not None and int(counts.max()) > max_samples:
        raise ValueError(f"A packed row holds {int(counts.max())} samples > max_samples={max_samples}.")
    n_batches = -(-n_rows // rows_per_batch)
    ids = rng.permutation(n_rows) if rng is not None else np.arange(n_rows)
    fullest_first = ids[np.argsort(-counts[ids], kind="stable")]
    lap, seat = np.divmod(np.arange(n_rows, dtype=np.int64), n_batches)
    batch_of = np.empty(n_rows, dtype=np.int64)
    batch_of[fullest_first] = np.where(lap % 2 == 0, seat, n_batches - 1 - seat)
    rows = np.lexsort((np.arange(n_rows), batch_of))  # batch by batch, rows in creation order
    starts = np.flatnonzero(np.diff(batch_of[rows], prepend=-1))
    offsets = np.append(starts, n_rows).astype(np.int64)
    if max_samples is not None:
        per_batch = np.add.reduceat(counts[rows], starts)
        if (per_batch > max_samples).any():
            cuts = [0]
            for a, b in itertools.pairwise(offsets.tolist()):
                total = 0
                for i in range(a, b):  # only the (rare) batches over the cap need more than one cut
                    total += int(counts[rows[i]])
                    if total > max_samples:
                        cuts.append(i)
                        total = int(counts[rows[i]])
                cuts.append(b)
            offsets = np.asarray(cuts, dtype=np.int64)
    return rows, offsets


def _row_positions(row_offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions, in the row-by-row sample order of ``row_offsets``, of the samples of ``rows`` in that order."""
    counts = np.diff(row_offsets)[rows]
    starts = row_offsets[:-1][rows]
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def next_fit_rows(lengths: npt.ArrayLike, capacity: int) -> np.ndarray:
    """Row of each item when items are laid into rows of ``capacity`` in order, a new row when one is full.

    An item longer than ``capacity`` gets a row of its own. Vectorised: one binary search per row.

    Example:
        >>> next_fit_rows([6, 4, 5, 3, 2], 10).tolist()
        [0, 0, 1, 1, 1]
    """
    lens = np.asarray(lengths, dtype=np.int64)
    out = np.empty(lens.size, dtype=np.int64)
    ends = np.cumsum(lens)
    start, used, row = 0, 0, 0
    while start < lens.size:
        stop = max(int(np.searchsorted(ends, used + capacity, side="right")), start + 1)
        out[start:stop] = row
        used = int(ends[stop - 1])
        start, row = stop, row + 1
    return out


def _budget_offsets(sorted_lengths: np.ndarray, seg_starts: np.ndarray, max_tokens: int) -> np.ndarray:
    """Greedy cut of each segment into the longest runs with ``count * running_max <= max_tokens``."""
    n = sorted_lengths.size
    seg_ends = np.append(seg_starts[1:], n)
    out: list[int] = []
    arange = np.arange(1, max_tokens + 1, dtype=np.int64)
    for s, e in zip(seg_starts.tolist(), seg_ends.tolist(), strict=True):
        i = s
        while i < e:
            cap = min(e - i, max_tokens // int(sorted_lengths[i]))
            window = np.maximum.accumulate(sorted_lengths[i : i + cap])
            over = np.flatnonzero(window * arange[:cap] > max_tokens)
            out.append(i)
            i += int(over[0]) if over.size else cap
    out.append(n)
    return np.asarray(out, dtype=np.int64)


def _batch_cost(
    lengths: np.ndarray, order: np.ndarray, offsets: np.ndarray, *, packed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(work, longest sample)`` of each batch; work is padded tokens, or (packed) real tokens."""
    sorted_lengths = lengths[order]
    maxlen = np.maximum.reduceat(sorted_lengths, offsets[:-1])
    work = np.add.reduceat(sorted_lengths, offsets[:-1]) if packed else np.diff(offsets) * maxlen
    return work, maxlen


def _split_largest(offsets: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Split the largest batches in two halves, ``count`` times or until every batch holds one sample.

    Returns the new offsets and how many splits were not possible.
    """
    offsets = offsets.copy()
    for done in range(count):
        sizes = np.diff(offsets)
        b = int(np.argmax(sizes))
        if sizes[b] < 2:
            return offsets, count - done
        offsets = np.insert(offsets, b + 1, offsets[b] + sizes[b] // 2)
    return offsets, 0


def plan_epoch(
    lengths: np.ndarray,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    num_replicas: int = 1,
    group_by_length: bool = True,
    pool_size: int | None = None,
    oversize: OversizePolicy = "error",
    pack_length: int | None = None,
    max_samples: int | None = None,
) -> EpochPlan:
    """Plan the batches of one epoch for every rank.

    Args:
        lengths: Validated lengths (see :func:`as_lengths`), one per sample.
        batch_size: Samples per batch. Exactly one of ``batch_size`` and ``max_tokens`` must be given.
        max_tokens: Budget of padded tokens per batch: ``len(batch) * max(lengths in batch) <= max_tokens``.
        shuffle: Randomise batch composition (among equal lengths) and batch order.
        seed: Seed shared by all ranks.
        epoch: Epoch number; a different epoch gives a different order.
        drop_last: Drop incomplete batches (``batch_size`` mode) and, with several replicas, the cheapest batches
            that keep the batch count from dividing evenly. Otherwise the largest batches are split instead, so
            that every sample is seen exactly once.
        num_replicas: Number of ranks to deal the batches to.
        group_by_length: Group similar lengths (bucketing). ``False`` gives random batches (dynamic padding).
        pool_size: Sort inside pools of this many shuffled samples instead of globally (more randomness, more
            padding). ``None`` sorts globally.
        oversize: What to do with samples longer than ``max_tokens``: ``"error"`` raises, ``"skip"`` leaves them out
            (listed in :attr:`EpochPlan.skipped`), ``"single"`` gives each a batch of its own (over budget).
        pack_length: Padding-free packing: samples are packed (best-fit decreasing) into rows of at most
            ``pack_length`` tokens, and the rows are dealt into batches of at most ``max_tokens // pack_length``
            rows with similar numbers of samples (:func:`group_rows`), listed row by row (each row's samples longest
            first, rows in creation order) so that :func:`next_fit_rows` recovers the rows. Needs ``max_tokens``.
        max_samples: Packing: at most this many samples per batch (static shapes' sample slots); a batch dealt
            more is split, whole rows apart.

    Returns:
        The plan of the epoch.

    Raises:
        ValueError: On invalid options, on a sample longer than ``max_tokens`` with ``oversize="error"``, or when
            there are fewer samples than replicas.

    Example:
        >>> plan = plan_epoch(np.array([5, 1, 4, 2, 3, 1]), batch_size=2, shuffle=False)
        >>> [b.tolist() for b in plan.rank_batches(0)]
        [[1, 5], [3, 4], [2, 0]]
        >>> plan = plan_epoch(np.array([5, 1, 4, 2, 3, 1]), max_tokens=8, shuffle=False)
        >>> [b.tolist() for b in plan.rank_batches(0)]
        [[1, 5, 3], [4, 2], [0]]
    """
    check_exactly_one_budget(batch_size, max_tokens)
    check_positive_int("batch_size", batch_size, optional=True)
    check_positive_int("max_tokens", max_tokens, optional=True)
    check_positive_int("num_replicas", num_replicas)
    check_positive_int("pool_size", pool_size, optional=True)
    if oversize not in OVERSIZE_POLICIES:
        raise ValueError(f"`oversize` must be one of {OVERSIZE_POLICIES}, got {oversize!r}.")
    check_positive_int("max_samples", max_samples, optional=True)
    if max_samples is not None and pack_length is None:
        raise ValueError("`max_samples` caps the samples of packed batches: give it with `pack_length`.")
    rows_per_batch = 0
    if pack_length is not None:
        check_positive_int("pack_length", pack_length)
        if max_tokens is None:
            raise ValueError("Packing fills a token budget: give `max_tokens` (tokens per batch) with `pack_length`.")
        if pack_length > max_tokens:
            raise ValueError(f"pack_length={pack_length} > max_tokens={max_tokens}: a batch must hold one row.")
        rows_per_batch = max_tokens // pack_length
        max_tokens = int(pack_length)  # a sample must fit one row
    budget = "pack_length (the row length)" if rows_per_batch else "max_tokens"

    n_all = lengths.size
    ids = np.arange(n_all, dtype=np.int64)
    singles = np.empty(0, dtype=np.int64)
    skipped = np.empty(0, dtype=np.int64)
    repeated = np.empty(0, dtype=np.int64)
    if max_tokens is not None:
        too_long = lengths > max_tokens
        if too_long.any():
            bad = np.flatnonzero(too_long)
            if oversize == "error":
                i = int(bad[0])
                raise ValueError(
                    f"Sample {i} has length {int(lengths[i])} > {budget}={max_tokens} "
                    f"({bad.size} sample(s) exceed the budget; the longest is {int(lengths[bad].max())}). "
                    "Raise `max_tokens`, truncate the samples (e.g. `max_length`), or choose "
                    "oversize='skip' or oversize='single'."
                )
            if oversize == "skip":
                skipped = bad
            else:
                singles = bad
            ids = np.flatnonzero(~too_long)

    # 1. order (packing: best-fit decreasing into rows, rows grouped into batches)
    if rows_per_batch:
        assert max_tokens is not None
        order, row_offsets = best_fit_decreasing(lengths, ids, max_tokens, _rng(seed, epoch, 0) if shuffle else None)
        counts = np.diff(row_offsets)
        rng = _rng(seed, epoch, 3) if shuffle else None
        rows, batch_rows = group_rows(counts, rows_per_batch, max_samples=max_samples, rng=rng)
        order = order[_row_positions(row_offsets, rows)]
        offsets = np.concatenate(([0], np.cumsum(counts[rows])))[batch_rows].astype(np.int64)
        seg_starts = np.zeros(0, dtype=np.int64)
    elif group_by_length and (pool_size is None or pool_size >= ids.size):
        order = _sorted_with_random_ties(lengths, ids, _rng(seed, epoch, 0) if shuffle else None)
        seg_starts = np.zeros(1 if order.size else 0, dtype=np.int64)
    else:
        order = _rng(seed, epoch, 0).permutation(ids) if shuffle else ids
        if group_by_length and order.size:
            assert pool_size is not None
            pools = np.arange(order.size, dtype=np.int64) // pool_size
            order = order[np.lexsort((lengths[order], pools))]
            seg_starts = np.arange(0, order.size, pool_size, dtype=np.int64)
        else:
            seg_starts = np.zeros(1 if order.size else 0, dtype=np.int64)

    # 2. cut into batches
    if rows_per_batch:
        pass  # cut above
    elif batch_size is not None:
        if seg_starts.size <= 1:
            offsets = np.append(np.arange(0, order.size, batch_size, dtype=np.int64), order.size)
        else:
            pos = np.arange(order.size, dtype=np.int64)
            pos_in_seg = pos - seg_starts[np.searchsorted(seg_starts, pos, side="right") - 1]
            offsets = np.append(np.flatnonzero(pos_in_seg % batch_size == 0), order.size).astype(np.int64)
        if drop_last:
            sizes = np.diff(offsets)
            full = sizes == batch_size
            if not full.all():
                dropped = np.concatenate([order[offsets[b] : offsets[b + 1]] for b in np.flatnonzero(~full)])
                skipped = np.concatenate([skipped, dropped])
                keep = np.flatnonzero(full)
                order = np.concatenate([order[offsets[b] : offsets[b + 1]] for b in keep]) if keep.size else order[:0]
                offsets = np.arange(0, keep.size * batch_size + 1, batch_size, dtype=np.int64)
    else:
        assert max_tokens is not None
        offsets = _budget_offsets(lengths[order], seg_starts, max_tokens)
    if singles.size:
        order = np.concatenate([order, singles])
        offsets = np.concatenate([offsets, offsets[-1] + np.arange(1, singles.size + 1, dtype=np.int64)])

    # 3. make the count divisible by num_replicas, then deal batches of similar cost to the ranks of a step
    num_batches = offsets.size - 1
    remainder = num_batches % num_replicas
    if remainder:
        if drop_last:
            cost, _ = _batch_cost(lengths, order, offsets, packed=bool(rows_per_batch))
            drop = np.sort(np.argsort(cost, kind="stable")[:remainder])
            keep = np.setdiff1d(np.arange(num_batches), drop)
            skipped = np.concatenate([skipped] + [order[offsets[b] : offsets[b + 1]] for b in drop])
            sizes = np.diff(offsets)[keep]
            order = np.concatenate([order[offsets[b] : offsets[b + 1]] for b in keep]) if keep.size else order[:0]
            offsets = np.append(0, np.cumsum(sizes)).astype(np.int64)
        else:
            if order.size < num_replicas:
                raise ValueError(
                    f"Cannot give each of num_replicas={num_replicas} ranks a batch: only {order.size} sample(s) "
                    "to batch. Use fewer processes or more data."
                )
            offsets, missing = _split_largest(offsets, num_replicas - remainder)
            if missing:  # every batch holds a single sample: repeat the cheapest ones, as DistributedSampler does
                cheapest = order[np.argsort(lengths[order], kind="stable")[:missing]]
                repeated = cheapest
                order = np.concatenate([order, cheapest])
                offsets = np.concatenate([offsets, offsets[-1] + np.arange(1, missing + 1, dtype=np.int64)])
    num_batches = offsets.size - 1
    if num_batches == 0:
        raise ValueError(
            f"The plan has no batch: {n_all} sample(s), drop_last={drop_last}, batch_size={batch_size}, "
            f"num_replicas={num_replicas}. Set drop_last=False or use more data."
        )

    rng = _rng(seed, epoch, 1)
    batch_ids = np.arange(num_batches, dtype=np.int64)
    if num_replicas > 1:
        cost, maxlen = _batch_cost(lengths, order, offsets, packed=bool(rows_per_batch))
        batch_ids = np.lexsort((maxlen, cost))
    schedule = batch_ids.reshape(-1, num_replicas)
    if shuffle:
        schedule = schedule[rng.permutation(schedule.shape[0])]
        if num_replicas > 1:
            schedule = np.take_along_axis(schedule, np.argsort(rng.random(schedule.shape), axis=1), axis=1)
    return EpochPlan(
        indices=order,
        offsets=offsets,
        schedule=np.ascontiguousarray(schedule),
        skipped=np.sort(skipped),
        repeated=repeated,
    )


def worst_case_batches(rows: npt.ArrayLike, widths: npt.ArrayLike) -> list[int]:
    """Indices of the batches whose shapes can need the most memory.

    The widest, the one with the most rows, and the batches on the upper hull of ``(rows x width, rows x width**2)``
    (padded tokens, and the attention term). A step's memory is modelled as ``a * rows * width + b * rows *
    width**2`` (plus what does not depend on the batch) with unknown ``a, b >= 0``. The batch with the most memory
    under any such weighting is a vertex of the convex hull of those points on its chain from the most padded
    tokens to the largest attention term, which is what is returned (exactly; a tie keeps the first batch). Order:
    the widest, the fullest, then the chain; no index twice.

    Example:
        >>> worst_case_batches([100, 30, 12, 4], [8, 30, 80, 200])  # tokens 800, 900, 960, 800
        [3, 0, 2]
    """
    n_rows = np.asarray(rows, dtype=np.float64)
    width = np.asarray(widths, dtype=np.float64)
    if n_rows.shape != width.shape or n_rows.ndim != 1 or not len(n_rows):
        raise ValueError(f"rows and widths must be 1-D arrays of one length > 0, got {n_rows.shape} and {width.shape}.")
    x = n_rows * width
    y = x * width
    picks = [int(np.argmax(width)), int(np.argmax(n_rows))]
    # the start: the most tokens (ties: the largest attention term); the end: the largest attention term
    current = int(np.lexsort((-np.arange(len(x)), y, x))[-1])
    end_y = y.max()
    picks.append(current)
    while y[current] < end_y:
        dy = y - y[current]
        above = dy > 0
        # the next vertex loses the least tokens per unit of attention term (ties: the farthest)
        slope = np.where(above, (x - x[current]) / np.where(above, dy, 1.0), -np.inf)
        best = slope.max()
        candidates = np.flatnonzero(slope == best)
        current = int(candidates[np.argmax(dy[candidates])])
        picks.append(current)
    return list(dict.fromkeys(picks))

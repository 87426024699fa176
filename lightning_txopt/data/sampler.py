"""``BucketBatchSampler``: length-grouped, token-budget, DDP-balanced, exactly resumable batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, Sampler

from lightning_txopt.data.planning import OVERSIZE_POLICIES, EpochPlan, OversizePolicy, as_lengths, plan_epoch
from lightning_txopt.utils.checks import check_exactly_one_budget, check_positive_int

__all__ = ["BucketBatchSampler", "resolve_replicas"]


class _RankSampler(Sampler[int]):
    """``batch_sampler.sampler``: this rank's sample ids in plan order; forwards ``set_epoch``.

    Lightning (and other loops) call ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch
    sampler itself; this view makes that call reach the plan.
    """

    def __init__(self, owner: BucketBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        plan = self._owner.plan()
        for b in plan.schedule[:, self._owner.rank].tolist():
            yield from plan.indices[plan.offsets[b] : plan.offsets[b + 1]].tolist()

    def __len__(self) -> int:
        plan = self._owner.plan()
        return int(plan.sizes[plan.schedule[:, self._owner.rank]].sum())


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill in ``num_replicas``/``rank`` from ``torch.distributed`` when it is initialised, else ``(1, 0)``.

    Raises:
        ValueError: If ``num_replicas < 1`` or ``rank`` is outside ``[0, num_replicas)``.

    Example:
        >>> resolve_replicas(4, 3)
        (4, 3)
    """
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if dist_on else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    check_positive_int("num_replicas", num_replicas)
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"`rank` must be in [0, {num_replicas}), got {rank!r}.")
    return num_replicas, rank


def _replicas_of(sampler: Any) -> tuple[int, int] | None:
    """``(num_replicas, rank)`` of a distributed sampler Lightning passes in, ``None`` for a plain one.

    ``DistributedSampler`` and Lightning's wrappers of it have both attributes.
    """
    replicas, rank = getattr(sampler, "num_replicas", None), getattr(sampler, "rank", None)
    if isinstance(replicas, int) and isinstance(rank, int):
        return replicas, rank
    return None


class BucketBatchSampler(BatchSampler):
    """Yield batches of sample indices grouped by length, sized by sample count or by a padded-token budget.

    The plan of an epoch is a pure function of ``(lengths, seed, epoch, num_replicas)`` (see
    :func:`~lightning_txopt.data.planning.plan_epoch`): every rank computes the same plan and takes its own column,
    all ranks get the same number of batches, and the batches of one step have similar padded cost. With
    ``drop_last=False`` every sample is yielded exactly once per epoch over all ranks (the largest batches are split
    to make the count divisible; nothing is duplicated).

    Call :meth:`set_epoch` at the start of every epoch for a new order. Lightning does it for you through
    ``batch_sampler.sampler.set_epoch``, which this class forwards.

    Under ``Trainer(strategy="ddp")`` (any number of processes) Lightning re-creates batch samplers with a
    ``DistributedSampler`` as ``sampler``; this class takes the number of ranks and the rank from it and plans as
    always, so nothing needs switching off (``use_distributed_sampler`` may stay at its default). The plan is computed
    when first needed and cached per epoch, so constructing a sampler is cheap.
    :meth:`state_dict`/:meth:`load_state_dict` give exact mid-epoch resume: a sampler loaded with the state taken
    after ``k`` batches yields batch ``k + 1`` onward of the same epoch.

    Args:
        lengths: Length of every sample (see :func:`~lightning_txopt.data.lengths.compute_lengths`).
        batch_size: Samples per batch. Exactly one of ``batch_size`` and ``max_tokens``.
        max_tokens: Padded tokens per batch: ``len(batch) * max(lengths in batch) <= max_tokens``.
        shuffle: Random batch composition among equal lengths and random batch order.
        seed: Seed; must be the same on all ranks.
        drop_last: Drop incomplete batches instead of splitting batches to divide evenly among ranks.
        num_replicas: Number of ranks; taken from ``torch.distributed`` when initialised and not given.
        rank: This rank; taken from ``torch.distributed`` when initialised and not given.
        group_by_length: ``False`` gives random batches (dynamic or fixed padding) with the same guarantees.
        pool_size: Sort within pools of this many shuffled samples instead of globally (more randomness, more
            padding). ``None`` sorts globally, with random order among equal lengths.
        oversize: Samples longer than ``max_tokens``: ``"error"`` (default) raises a ``ValueError`` naming the
            sample, ``"skip"`` leaves them out with a warning, ``"single"`` puts each alone in a batch.
        pack_length: Padding-free packing (needs ``max_tokens``): batches of ``max_tokens // pack_length`` rows of
            at most ``pack_length`` tokens each, for :class:`~lightning_txopt.data.packing.PackingCollator`.
        max_samples: Packing: at most this many samples per batch (the static shapes' sample slots).
        sampler: Where the number of ranks and the rank come from when Lightning re-creates the sampler for
            distributed training (a ``DistributedSampler``; its own order is not used: the plan deals the batches).
            Any other sampler is ignored.

    Raises:
        ValueError: On invalid arguments, empty or non-positive lengths, or a sample over ``max_tokens``
            with ``oversize="error"``.

    Example:
        >>> sampler = BucketBatchSampler([5, 1, 4, 2, 3, 1], batch_size=2, shuffle=False)
        >>> list(sampler)
        [[1, 5], [3, 4], [2, 0]]
        >>> len(BucketBatchSampler([5, 1, 4, 2, 3, 1], max_tokens=8, num_replicas=2, rank=1))
        2
    """

    def __init__(
        self,
        lengths: npt.ArrayLike | Sequence[int],
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        group_by_length: bool = True,
        pool_size: int | None = None,
        oversize: OversizePolicy = "error",
        pack_length: int | None = None,
        max_samples: int | None = None,
        sampler: Any = None,
    ) -> None:
        if isinstance(lengths, Sampler):
            raise TypeError(
                "BucketBatchSampler got a sampler where the sample lengths go: Lightning is re-creating it for a "
                "loader built outside a DataModule hook (e.g. trainer.predict(dataloaders=dm.val_dataloader())). "
                "Pass the DataModule instead (trainer.predict(model, datamodule=dm)), with a predict_dataset or a "
                "'predict' split."
            )
        check_exactly_one_budget(batch_size, max_tokens)
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("pool_size", pool_size)):
            check_positive_int(name, value, optional=True)
        check_positive_int("pack_length", pack_length, optional=True)
        check_positive_int("max_samples", max_samples, optional=True)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        if oversize not in OVERSIZE_POLICIES:
            raise ValueError(f"`oversize` must be one of {OVERSIZE_POLICIES}, got {oversize!r}.")
        self.lengths = as_lengths(lengths)
        self.batch_size: int | None = batch_size  # type: ignore[assignment]  # None: a token budget plans instead
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        given = _replicas_of(sampler)
        if given is not None:  # Lightning's distributed sampler says where this copy runs
            num_replicas, rank = given
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        self.group_by_length = group_by_length
        self.pool_size = pool_size
        self.oversize: OversizePolicy = oversize
        self.pack_length = pack_length
        self.max_samples = max_samples
        self.epoch = 0
        self._skip = 0  # batches to skip at the next __iter__ (resume)
        self._yielded = 0  # batches yielded by the running iteration
        self._cache: tuple[int, EpochPlan] | None = None
        self.sampler = _RankSampler(self)
        self._check()  # fail here, not mid-training: an oversize sample, too little data for the ranks

    def _check(self) -> None:
        """The plan's up-front errors without planning: samples over the budget, fewer samples than ranks."""
        limit = self.pack_length or self.max_tokens
        over = np.flatnonzero(self.lengths > limit) if limit is not None else np.empty(0)
        if over.size and self.oversize == "error":
            self.plan()  # raises the planner's own message, naming the sample
        if over.size and self.oversize == "skip":
            rank_zero_warn(
                f"BucketBatchSampler: {over.size} sample(s) longer than max_tokens={self.max_tokens} are skipped "
                f"every epoch (oversize='skip')."
            )
        if self.lengths.size < self.num_replicas and not self.drop_last:
            self.plan()

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of ``epoch`` (default: the current one), computed once and cached."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        plan = plan_epoch(
            self.lengths,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            drop_last=self.drop_last,
            num_replicas=self.num_replicas,
            group_by_length=self.group_by_length,
            pool_size=self.pool_size,
            oversize=self.oversize,
            pack_length=self.pack_length,
            max_samples=self.max_samples,
        )
        self._cache = (epoch, plan)
        return plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next iteration yields.

        A resume position loaded with :meth:`load_state_dict` is kept when ``epoch`` is the loaded epoch and dropped
        otherwise.
        """
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches this rank yields in the current epoch (all of them, also after a resume)."""
        return self.plan().num_steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        start, self._skip = self._skip, 0
        column = plan.schedule[start:, self.rank]
        self._yielded = start
        for b in column.tolist():
            self._yielded += 1
            yield plan.indices[plan.offsets[b] : plan.offsets[b + 1]].tolist()

    def state_dict(self) -> dict[str, Any]:
        """Position of this sampler: epoch and batches yielded in it so far.

        With ``DataLoader(num_workers > 0)`` the loader fetches ahead, so the sampler has yielded more batches than
        the training loop consumed; :class:`~lightning_txopt.data.datamodule.BucketDataModule` saves the consumed
        count instead. Pass such a count as ``consumed`` to :meth:`load_state_dict`.
        """
        return {
            "epoch": self.epoch,
            "consumed": self._yielded,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration starts after the ``consumed`` batches of ``epoch``.

        Raises:
            ValueError: If the state was saved with another seed or number of replicas (the plan would differ), or
                if ``consumed`` is out of range.
        """
        for key in ("seed", "num_replicas"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(
                    f"Cannot resume: the sampler state was saved with {key}={state_dict[key]!r}, this sampler has "
                    f"{key}={getattr(self, key)!r}. Resume with the same {key}, or from an end-of-epoch checkpoint."
                )
        epoch, consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
        self.epoch = epoch
        steps = self.plan().num_steps
        if not 0 <= consumed <= steps:
            raise ValueError(f"Cannot resume after {consumed} batches: epoch {epoch} has {steps} batches per rank.")
        self._skip = consumed
        self._yielded = consumed

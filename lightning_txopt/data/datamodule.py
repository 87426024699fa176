"""``BucketDataModule``: the LightningDataModule users subclass to get length-aware batches for free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_txopt.data.collator import PaddingCollator
from lightning_txopt.data.lengths import compute_lengths
from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.data.planning import OversizePolicy
from lightning_txopt.data.report import PaddingRow, padding_report
from lightning_txopt.data.sampler import BucketBatchSampler

__all__ = ["BucketDataModule", "DATA_STRATEGIES"]

Strategy = Literal["bucket", "dynamic", "fixed", "packed"]
DATA_STRATEGIES: tuple[str, ...] = ("bucket", "dynamic", "fixed", "packed")
_SPLITS = ("train", "val", "test")


class BucketDataModule(pl.LightningDataModule):
    """Train/val/test dataloaders with length-aware batching, DDP-ready and exactly resumable.

    Give the datasets to the constructor, or subclass and override :meth:`build_datasets` (called from
    :meth:`setup`, on every rank) to load and tokenise them. Samples are mappings with token ids under
    ``length_key`` (``"input_ids"``) and optionally ``attention_mask``, ``token_type_ids``, ``labels`` (scalar or
    per token) and other numeric features; :class:`~lightning_txopt.data.collator.PaddingCollator` pads them.

    Strategies:

    * ``"bucket"`` (default): :class:`~lightning_txopt.data.sampler.BucketBatchSampler` groups similar lengths and
      pads each batch to its longest sample;
    * ``"dynamic"``: random batches, each padded to its longest sample;
    * ``"fixed"``: random batches padded to ``max_length`` (the baseline of most tutorials);
    * ``"packed"``: padding-free packing: samples concatenated (best-fit decreasing) into one row of up to
      ``max_tokens`` tokens per batch or, with ``max_length``, into rows of ``max_length`` tokens,
      ``max_tokens // max_length`` rows per batch; kept apart by restarted ``position_ids`` and block-diagonal masks
      (:class:`~lightning_txopt.data.packing.PackingCollator`). Needs ``max_tokens``; ``causal=True`` for decoders.

    Under ``Trainer(strategy="ddp")`` every loader deals its own batches to the ranks (equal counts, no duplicated
    samples), so Lightning's ``DistributedSampler`` injection is switched off for this trainer in :meth:`setup`.
    The training position is saved in checkpoints: ``Trainer.fit(ckpt_path=...)`` from a mid-epoch checkpoint
    continues with exactly the batches an uninterrupted run would have seen next, also with ``num_workers > 0``
    (the position comes from the batches the training loop consumed, not from what workers prefetched).

    Args:
        train_dataset: Training samples (or ``None`` when :meth:`build_datasets` provides them).
        val_dataset: Validation samples.
        test_dataset: Test samples.
        pad_token_id: Id that pads ``input_ids``; taken from ``tokenizer`` when not given.
        tokenizer: A Hugging Face tokenizer, used for its ``pad_token_id`` (and available to subclasses).
        strategy: ``"bucket"``, ``"dynamic"`` or ``"fixed"``.
        batch_size: Samples per training batch (exactly one of ``batch_size``/``max_tokens``).
        max_tokens: Padded tokens per training batch.
        eval_batch_size: Samples per evaluation batch (default: ``batch_size``).
        eval_max_tokens: Padded tokens per evaluation batch (default: ``max_tokens``).
        max_length: Longest sequence allowed (longer ones raise unless ``truncation``); the padded length of
            ``"fixed"``.
        pad_to_multiple_of: Round padded widths up to a multiple of this (e.g. 8 for tensor cores).
        pad_to_lengths: Pad every batch to the smallest of these widths that holds it, e.g. ``[64, 128, 256, 512]``
            (``"bucket"``/``"dynamic"``): with ``torch.compile`` the model meets one sequence length per rung, so
            recompilation is bounded. Batches are planned on the padded widths, so ``max_tokens`` holds.
        truncation: Cut sequences longer than ``max_length`` instead of raising.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory (only takes effect with a CUDA device).
        persistent_workers: Keep workers alive between epochs (needs ``num_workers > 0``).
        seed: Seed of the batching plan (same on all ranks).
        shuffle: Shuffle training batches.
        drop_last: Drop incomplete training batches.
        pool_size: Sort within pools of this many samples (see the sampler); ``None`` sorts globally.
        oversize: Policy for samples longer than ``max_tokens``: ``"error"``, ``"skip"`` or ``"single"``.
        length_key: Key of the token ids.
        padding_side: ``"right"`` or ``"left"``.
        label_pad_token_id: Fill value of token-level labels.
        causal: ``strategy="packed"`` only: causal block masks, and each sample's first label ignored (decoders).

    Raises:
        ValueError: On invalid or conflicting arguments (named in the message).

    Example:
        >>> samples = [{"input_ids": list(range(1, n + 1)), "labels": n % 2} for n in (3, 9, 4, 8, 5)]
        >>> dm = BucketDataModule(samples, pad_token_id=0, batch_size=2, shuffle=False)
        >>> dm.setup("fit")
        >>> [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
        [(2, 4), (2, 8), (1, 9)]
    """

    def __init__(
        self,
        train_dataset: Dataset | Any | None = None,
        val_dataset: Dataset | Any | None = None,
        test_dataset: Dataset | Any | None = None,
        *,
        pad_token_id: int | None = None,
        tokenizer: Any | None = None,
        strategy: Strategy = "bucket",
        batch_size: int | None = None,
        max_tokens: int | None = None,
        eval_batch_size: int | None = None,
        eval_max_tokens: int | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        pad_to_lengths: list[int] | None = None,
        truncation: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pool_size: int | None = None,
        oversize: OversizePolicy = "error",
        length_key: str = "input_ids",
        padding_side: Literal["right", "left"] = "right",
        label_pad_token_id: int = -100,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if strategy not in DATA_STRATEGIES:
            raise ValueError(f"`strategy` must be one of {DATA_STRATEGIES}, got {strategy!r}.")
        if (batch_size is None) == (max_tokens is None):
            raise ValueError(
                f"Give exactly one of `batch_size` and `max_tokens` (got batch_size={batch_size!r}, "
                f"max_tokens={max_tokens!r})."
            )
        if strategy == "fixed" and max_length is None:
            raise ValueError("strategy='fixed' pads every batch to `max_length`: set max_length (e.g. 512).")
        if strategy == "packed" and max_tokens is None:
            raise ValueError(
                "strategy='packed' fills batches of up to `max_tokens` tokens (one row, or rows of `max_length` "
                f"tokens when max_length is set): set max_tokens (got max_tokens={max_tokens!r})."
            )
        if pad_to_lengths is not None and strategy not in ("bucket", "dynamic"):
            raise ValueError(
                f"`pad_to_lengths` pads batches to a ladder of widths; strategy={strategy!r} has its own widths "
                "(use 'bucket' or 'dynamic')."
            )
        if max_tokens is not None and max_length is not None and max_length > max_tokens and oversize == "error":
            raise ValueError(
                f"max_length={max_length} > max_tokens={max_tokens}: a sample of max_length tokens would not fit a "
                "batch. Raise max_tokens or lower max_length."
            )
        if eval_batch_size is not None and max_tokens is not None:
            raise ValueError("`eval_batch_size` goes with `batch_size`; with `max_tokens` use `eval_max_tokens`.")
        if eval_max_tokens is not None and batch_size is not None:
            raise ValueError("`eval_max_tokens` goes with `max_tokens`; with `batch_size` use `eval_batch_size`.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0.")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                raise ValueError(
                    f"The tokenizer {type(tokenizer).__name__} has no pad token (GPT-2 and most causal LMs): set "
                    "`tokenizer.pad_token = tokenizer.eos_token` or pass `pad_token_id`."
                )
        if pad_token_id is None:
            raise ValueError("Give `pad_token_id` or a `tokenizer` with a pad token.")
        self.datasets: dict[str, Any] = {
            k: v for k, v in zip(_SPLITS, (train_dataset, val_dataset, test_dataset)) if v is not None
        }
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad_token_id)
        self.strategy: Strategy = strategy
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.eval_max_tokens = eval_max_tokens if eval_max_tokens is not None else max_tokens
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_lengths = list(pad_to_lengths) if pad_to_lengths is not None else None
        self.truncation = truncation
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pool_size = pool_size
        self.oversize: OversizePolicy = oversize
        self.length_key = length_key
        self.padding_side: Literal["right", "left"] = padding_side
        self.label_pad_token_id = label_pad_token_id
        self.causal = causal
        # packed: rows of max_length tokens (max_tokens // max_length per batch), or one row of max_tokens
        self.pack_length = (max_length or max_tokens) if strategy == "packed" else None
        self.collator: PaddingCollator | PackingCollator
        if strategy == "packed":
            self.collator = PackingCollator(
                self.pack_length,
                pad_token_id=self.pad_token_id,
                causal=causal,
                label_pad_token_id=label_pad_token_id,
                input_key=length_key,
            )
        else:
            self.collator = PaddingCollator(
                self.pad_token_id,
                padding="max_length" if strategy == "fixed" else "longest",
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                pad_to_lengths=pad_to_lengths,
                padding_side=padding_side,
                label_pad_token_id=label_pad_token_id,
                truncation=truncation,
                input_key=length_key,
            )
        self._lengths: dict[str, np.ndarray] = {}
        self._train_sampler: BucketBatchSampler | None = None
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ data
    def build_datasets(self, stage: str | None) -> Mapping[str, Any]:
        """Return the datasets by split (``"train"``, ``"val"``, ``"test"``); override to load or tokenise them.

        Called by :meth:`setup` on every rank. The default returns the datasets given to the constructor.
        """
        return self.datasets

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets, compute their lengths, and take over distributed sampling from the Trainer."""
        built = dict(self.build_datasets(stage))
        unknown = set(built) - set(_SPLITS)
        if unknown:
            raise ValueError(f"build_datasets returned unknown split(s) {sorted(unknown)}; use {_SPLITS}.")
        for split, dataset in built.items():
            if dataset is not None and (split not in self.datasets or self.datasets[split] is not dataset):
                self._lengths.pop(split, None)
            self.datasets[split] = dataset
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if (
            trainer is not None
            and connector is not None
            and getattr(connector, "use_distributed_sampler", False)
            and trainer.world_size > 1
        ):
            connector.use_distributed_sampler = False
            rank_zero_info(
                f"{type(self).__name__} deals batches to the {trainer.world_size} ranks itself; Lightning's "
                "DistributedSampler is not injected into its dataloaders."
            )

    def lengths(self, split: str = "train") -> np.ndarray:
        """Token lengths of a split's samples, computed once (truncated to ``max_length`` with ``truncation``)."""
        if split not in self._lengths:
            dataset = self.datasets.get(split)
            if dataset is None:
                raise ValueError(f"No {split!r} dataset: pass it to the constructor or return it from build_datasets.")
            lengths = compute_lengths(dataset, key=self.length_key)
            if self.truncation and self.max_length is not None:
                lengths = np.minimum(lengths, self.max_length)
            elif self.max_length is not None and lengths.max() > self.max_length:
                i = int(np.argmax(lengths))
                raise ValueError(
                    f"{split} sample {i} has {int(lengths[i])} tokens > max_length={self.max_length}. Truncate when "
                    "tokenising, or pass truncation=True."
                )
            self._lengths[split] = lengths
        return self._lengths[split]

    def _world(self) -> tuple[int | None, int | None]:
        trainer = self.trainer
        if trainer is None:
            return None, None
        return trainer.world_size, trainer.global_rank

    def make_sampler(self, split: str) -> BucketBatchSampler:
        """The batch sampler of a split (training: shuffled, with ``drop_last``; evaluation: ordered)."""
        lengths = self.lengths(split)
        padded = getattr(self.collator, "padded_lengths", None)  # duck-typed: a wrapped collator may forward it
        if self.strategy == "fixed":
            assert self.max_length is not None
            lengths = np.full_like(lengths, self.max_length)
        elif self.strategy != "packed" and callable(padded):
            # plan on the widths the collator pads to (ladder rungs, multiples), so that budgets hold when padded
            lengths = padded(lengths)
        train = split == "train"
        num_replicas, rank = self._world()
        return BucketBatchSampler(
            lengths,
            batch_size=self.batch_size if train else self.eval_batch_size,
            max_tokens=self.max_tokens if train else self.eval_max_tokens,
            shuffle=self.shuffle and train,
            seed=self.seed,
            drop_last=self.drop_last and train,
            num_replicas=num_replicas,
            rank=rank,
            group_by_length=self.strategy == "bucket",
            pool_size=self.pool_size,
            oversize=self.oversize,
            pack_length=None
            if self.strategy != "packed"
            else (self.pack_length if train else (self.max_length or self.eval_max_tokens)),
        )

    def _loader(self, split: str, sampler: BucketBatchSampler, cls: type[DataLoader] = DataLoader, **extra: Any) -> Any:
        return cls(
            self.datasets[split],
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            **extra,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Training loader; resumes mid-epoch when a checkpoint state was loaded.

        The loader has ``state_dict``/``load_state_dict`` (the training position), so Lightning treats it as
        resumable.
        """
        sampler = self.make_sampler("train")
        if self._resume_state is not None:
            sampler.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_sampler = sampler
        return self._loader("train", sampler, _ResumableDataLoader, datamodule=self)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation loader (length-ordered, every sample once over all ranks); ``[]`` (no validation) without one."""
        if self.datasets.get("val") is None:
            return []
        return self._loader("val", self.make_sampler("val"))

    @override
    def test_dataloader(self) -> DataLoader:
        """Test loader (length-ordered, every sample once over all ranks)."""
        return self._loader("test", self.make_sampler("test"))

    def padding_report(self, split: str = "train") -> list[PaddingRow]:
        """:func:`~lightning_txopt.data.report.padding_report` of a split with this module's batching options."""
        train = split == "train"
        return padding_report(
            self.lengths(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            max_tokens=self.max_tokens if train else self.eval_max_tokens,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            pad_to_lengths=self.pad_to_lengths,
            seed=self.seed,
            pack_length=self.pack_length,
        )

    # ------------------------------------------------------------------ state
    def _consumed(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self._train_sampler.state_dict()["consumed"] if self._train_sampler is not None else 0
        # what the training loop consumed; workers may have prefetched more from the sampler
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Training position: the epoch and how many of its batches the training loop consumed."""
        sampler = self._train_sampler
        if sampler is None:
            return dict(self._resume_state) if self._resume_state is not None else {}
        epoch, consumed = sampler.epoch, self._consumed()
        if consumed >= len(sampler):
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed, "seed": self.seed, "num_replicas": sampler.num_replicas}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position; the next training loader continues from it."""
        if not state_dict:
            return
        self._resume_state = dict(state_dict)
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(self._resume_state)
            self._resume_state = None


class _ResumableDataLoader(DataLoader):
    """A DataLoader whose state is its DataModule's training position."""

    def __init__(self, *args: Any, datamodule: BucketDataModule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return self._datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._datamodule.load_state_dict(state_dict)

"""``BucketDataModule``: the LightningDataModule users subclass to get length-aware batches for free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_txopt.data.collator import PaddingCollator
from lightning_txopt.data.flat import FlatSamples
from lightning_txopt.data.lengths import compute_lengths
from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.data.planning import OversizePolicy, next_fit_rows, worst_case_batches
from lightning_txopt.data.report import PaddingRow, padding_report
from lightning_txopt.data.sampler import BucketBatchSampler
from lightning_txopt.utils.checks import check_exactly_one_budget, check_positive_int, round_up

__all__ = ["DATA_STRATEGIES", "DEFAULT_PACK_LENGTH", "BucketDataModule"]

Strategy = Literal["bucket", "dynamic", "fixed", "packed"]
DATA_STRATEGIES: tuple[str, ...] = ("bucket", "dynamic", "fixed", "packed")
SPLITS = ("train", "val", "test", "predict")
#: Row width of packed batches when ``max_length`` is not set (or the longest sample, rounded up to a power of 2).
DEFAULT_PACK_LENGTH = 512


class _Indexed(Dataset):
    """A dataset whose samples carry their position as ``"index"`` (evaluation and prediction batches)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"Sample {i} is a {type(item).__name__}; BucketDataModule needs mappings of features.")
        return {**item, "index": i}


class BucketDataModule(pl.LightningDataModule):
    """Train/val/test/predict dataloaders with length-aware batching, DDP-ready and exactly resumable.

    Give the datasets to the constructor, or subclass and override :meth:`build_datasets` (called from
    :meth:`setup`, on every rank) to load and tokenise them. Samples are mappings with token ids under
    ``length_key`` (``"input_ids"``) and optionally ``attention_mask``, ``token_type_ids``, ``labels`` (scalar or
    per token) and other numeric features. Evaluation and prediction batches also carry each sample's position in its
    dataset as ``"index"`` (:func:`~lightning_txopt.restore_order` puts predictions back in dataset order).

    Strategies:

    * ``"bucket"`` (default): :class:`~lightning_txopt.data.sampler.BucketBatchSampler` groups similar lengths and
      pads each batch to its longest sample;
    * ``"dynamic"``: random batches, each padded to its longest sample;
    * ``"fixed"``: random batches padded to ``max_length`` (the baseline of most tutorials);
    * ``"packed"``: padding-free packing: samples concatenated (best-fit decreasing) into rows of ``max_length``
      tokens (default :data:`DEFAULT_PACK_LENGTH`, or the longest sample rounded up to a power of 2),
      ``max_tokens // max_length`` rows per batch, with the samples' boundaries in the batch
      (:class:`~lightning_txopt.data.packing.PackingCollator`); never one dense mask over ``max_tokens``. The model
      side decides how to attend (``TransformerModule``: the varlen kernel reads the rows as one sequence, other
      paths build exact per-row block masks). With ``static_shapes=True`` every batch has exactly the same shapes
      (for ``torch.compile``).

    Distributed training: under ``Trainer(strategy="ddp")`` (or ``ddp_spawn``, FSDP) with any number of processes the
    batch sampler deals its own batches to the ranks (equal counts, no duplicated samples); Lightning re-creates it
    with the rank it should serve, so nothing needs configuring. The training position is saved in checkpoints
    through the training loader's ``state_dict`` (Lightning's stateful-loader channel): ``Trainer.fit(ckpt_path=...)``
    from a mid-epoch checkpoint continues with exactly the batches an uninterrupted run would have seen next, also
    with ``num_workers > 0`` (the position is what the training loop consumed, not what workers prefetched).

    Subclassing: override :meth:`build_datasets`. If you override :meth:`setup`, call ``super().setup(stage)``
    (it builds the datasets and resets cached lengths); nothing else depends on it.

    Args:
        train_dataset: Training samples (or ``None`` when :meth:`build_datasets` provides them).
        val_dataset: Validation samples.
        test_dataset: Test samples.
        predict_dataset: Samples for ``trainer.predict`` (labels optional).
        pad_token_id: Id that pads ``input_ids``; taken from ``tokenizer`` when not given.
        tokenizer: A Hugging Face tokenizer, used for its ``pad_token_id`` (and available to subclasses).
        strategy: ``"bucket"``, ``"dynamic"``, ``"fixed"`` or ``"packed"``.
        batch_size: Samples per training batch (exactly one of ``batch_size``/``max_tokens``).
        max_tokens: Padded tokens per training batch, or ``"auto"``: the
            :class:`~lightning_txopt.callbacks.TokenBudgetFinder` callback finds the largest budget that fits the
            device memory at fit start (:meth:`set_token_budget`).
        eval_batch_size: Samples per evaluation batch (default: ``batch_size``).
        eval_max_tokens: Padded tokens per evaluation/prediction batch (default: ``max_tokens``).
        max_length: Longest sequence allowed (longer ones raise unless ``truncation``); the padded length of
            ``"fixed"``; the row width of ``"packed"``.
        pad_to_multiple_of: Round padded widths up to a multiple of this (e.g. 8 for tensor cores).
        pad_to_lengths: Pad every batch to the smallest of these widths that holds it, e.g. ``[64, 128, 256, 512]``
            (``"bucket"``/``"dynamic"``): with ``torch.compile`` the model meets one sequence length per rung, so
            recompilation is bounded. Batches are planned on the padded widths, so ``max_tokens`` holds.
        static_shapes: ``"packed"`` only: every batch exactly ``max_tokens // max_length`` rows of ``max_length``
            tokens, per-sample tensors padded to a fixed number of slots (the most samples a batch can hold).
        truncation: Cut sequences longer than ``max_length`` instead of raising.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory (only takes effect with a CUDA device).
        persistent_workers: Keep workers alive between epochs (needs ``num_workers > 0``).
        seed: Seed of the batching plan (same on all ranks).
        shuffle: Shuffle training batches.
        drop_last: Drop incomplete training batches.
        pool_size: ``"bucket"`` only: sort within pools of this many samples (see the sampler); ``None`` sorts
            globally.
        oversize: Policy for samples longer than ``max_tokens``: ``"error"``, ``"skip"`` or ``"single"``.
        length_key: Key of the token ids.
        padding_side: ``"right"`` or ``"left"``.
        label_pad_token_id: Fill value of token-level labels.
        causal: ``"packed"`` only: per-token labels are next-token targets, so each sample's first label is ignored
            (no token learns to predict the next sample). Attention masks are the model's business: causal models
            attend causally whatever this says.
        flat_samples: Where a split's dataset is a list or tuple of mappings of numbers, its loader reads the samples
            as columns built once (:class:`~lightning_txopt.data.flat.FlatSamples`): each batch is gathered and
            collated with no Python work per sample, and is the same batch, element for element. Other datasets (a
            Hugging Face ``datasets.Dataset``, your own ``Dataset``), samples that do not fit columns, and collators
            that do not declare ``accepts_columns`` keep the per-sample path. ``False``: always the per-sample path
            (the columns are a second copy of the tokens in memory).

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
        predict_dataset: Dataset | Any | None = None,
        *,
        pad_token_id: int | None = None,
        tokenizer: Any | None = None,
        strategy: Strategy = "bucket",
        batch_size: int | None = None,
        max_tokens: int | Literal["auto"] | None = None,
        eval_batch_size: int | None = None,
        eval_max_tokens: int | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        pad_to_lengths: list[int] | None = None,
        static_shapes: bool = False,
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
        flat_samples: bool = True,
    ) -> None:
        super().__init__()
        if strategy not in DATA_STRATEGIES:
            raise ValueError(f"`strategy` must be one of {DATA_STRATEGIES}, got {strategy!r}.")
        check_exactly_one_budget(batch_size, max_tokens)
        auto = max_tokens == "auto"
        if isinstance(max_tokens, str) and not auto:
            raise ValueError(f"`max_tokens` must be a positive integer or 'auto', got {max_tokens!r}.")
        for name, value in (
            ("batch_size", batch_size),
            ("max_tokens", None if auto else max_tokens),
            ("eval_batch_size", eval_batch_size),
            ("eval_max_tokens", eval_max_tokens),
            ("max_length", max_length),
            ("pool_size", pool_size),
        ):
            check_positive_int(name, value, optional=True)
        check_positive_int("num_workers", num_workers, minimum=0)
        if strategy == "fixed" and max_length is None:
            raise ValueError("strategy='fixed' pads every batch to `max_length`: set max_length (e.g. 512).")
        if strategy == "packed" and max_tokens is None:
            raise ValueError(
                "strategy='packed' fills batches of `max_tokens` tokens in rows of `max_length` tokens: set "
                f"max_tokens (got max_tokens={max_tokens!r}, batch_size={batch_size!r})."
            )
        for flag, value, needed in (
            ("causal", causal, "packed"),
            ("static_shapes", static_shapes, "packed"),
            ("pool_size", pool_size is not None, "bucket"),
        ):
            if value and strategy != needed:
                raise ValueError(
                    f"`{flag}` only applies to strategy={needed!r}; with strategy={strategy!r} it would do nothing."
                )
        if pad_to_lengths is not None and strategy not in ("bucket", "dynamic"):
            raise ValueError(
                f"`pad_to_lengths` pads batches to a ladder of widths; strategy={strategy!r} has its own widths "
                "(use 'bucket' or 'dynamic')."
            )
        if isinstance(max_tokens, int) and max_length is not None and max_length > max_tokens and oversize == "error":
            raise ValueError(
                f"max_length={max_length} > max_tokens={max_tokens}: a sample of max_length tokens would not fit a "
                "batch. Raise max_tokens or lower max_length."
            )
        if eval_batch_size is not None and max_tokens is not None:
            raise ValueError("`eval_batch_size` goes with `batch_size`; with `max_tokens` use `eval_max_tokens`.")
        if eval_max_tokens is not None and batch_size is not None:
            raise ValueError("`eval_max_tokens` goes with `max_tokens`; with `batch_size` use `eval_batch_size`.")
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
        given = (train_dataset, val_dataset, test_dataset, predict_dataset)
        self.datasets: dict[str, Any] = {k: v for k, v in zip(SPLITS, given, strict=True) if v is not None}
        self.tokenizer = tokenizer
        self.pad_token_id = int(pad_token_id)
        self.strategy: Strategy = strategy
        self.batch_size = batch_size
        self.max_tokens: int | Literal["auto"] | None = max_tokens
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self._eval_max_tokens = eval_max_tokens
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_lengths = list(pad_to_lengths) if pad_to_lengths is not None else None
        self.static_shapes = static_shapes
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
        self.flat_samples = flat_samples
        self._padding: PaddingCollator | None = None
        if strategy != "packed":  # checks its arguments now
            self._padding = PaddingCollator(
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
        self._slots: dict[tuple[str, int], int] = {}  # static shapes: (split, budget) -> sample slots
        self._train_sampler: BucketBatchSampler | None = None
        self._columns: dict[str, Any] = {}  # split -> the dataset its loader reads

    # ------------------------------------------------------------------ budgets
    @property
    def eval_max_tokens(self) -> int | None:
        """Padded tokens per evaluation batch: ``eval_max_tokens`` if given, else the training budget."""
        if self._eval_max_tokens is not None:
            return self._eval_max_tokens
        return self.max_tokens if isinstance(self.max_tokens, int) else None

    def _budget(self, split: str) -> int | None:
        if split == "train":
            if self.max_tokens == "auto":
                raise ValueError(
                    "max_tokens='auto': no token budget yet. Add the TokenBudgetFinder callback to the Trainer (it "
                    "sets the budget at fit start), or call set_token_budget(n), or give max_tokens=<int>."
                )
            return self.max_tokens
        if self.batch_size is not None:
            return None
        budget = self.eval_max_tokens
        if budget is None:
            raise ValueError(
                f"max_tokens='auto' and no eval_max_tokens: the {split} loader needs a budget. Run fit with "
                "TokenBudgetFinder first, or give eval_max_tokens=<int>."
            )
        return budget

    def set_token_budget(self, max_tokens: int) -> None:
        """Set the training budget (and the evaluation budget, unless ``eval_max_tokens`` was given).

        Called by :class:`~lightning_txopt.callbacks.TokenBudgetFinder`; loaders built afterwards use it.

        Raises:
            ValueError: If the module plans by ``batch_size``, or on a budget that is not a positive integer or
                cannot hold a row (``"packed"``).
        """
        if self.batch_size is not None:
            raise ValueError("set_token_budget: this DataModule plans batches by batch_size, not by a token budget.")
        check_positive_int("max_tokens", max_tokens)
        if self.strategy == "packed" and max_tokens < self.pack_length:
            raise ValueError(
                f"A budget of {max_tokens} tokens cannot hold one packed row of {self.pack_length} tokens: use "
                f"a budget >= {self.pack_length} or a smaller max_length."
            )
        self.max_tokens = int(max_tokens)

    @property
    def token_budget_multiple(self) -> int:
        """What a token budget should be a multiple of: the packed row width, or 64 (tensor-core friendly)."""
        if self.strategy == "packed":
            return self.pack_length
        return 64

    @property
    def min_token_budget(self) -> int:
        """The smallest usable training budget: one packed row, or the longest training sample rounded up to 64."""
        if self.strategy == "packed":
            return self.pack_length
        longest = int(self.planned_lengths("train").max())
        return -(-longest // 64) * 64

    def planned_lengths(self, split: str = "train") -> np.ndarray:
        """The lengths a split's plan budgets on: the widths the collator pads to.

        ``max_length`` for ``"fixed"``, ladder rungs and multiples otherwise: a token budget then holds for padded
        batches.
        """
        lengths = self.lengths(split)
        if self.strategy == "fixed":
            assert self.max_length is not None
            return np.full_like(lengths, self.max_length)
        if self._padding is not None:
            return self._padding.padded_lengths(lengths)
        return lengths

    @property
    def pack_length(self) -> int:
        """Width of packed rows.

        ``max_length``, else :data:`DEFAULT_PACK_LENGTH` or the longest sample (the next power of 2) when that is
        longer, at most the budget.
        """
        if self.max_length is not None:
            return self.max_length
        longest = max((int(self.lengths(split).max()) for split in self.datasets), default=1)
        width = max(DEFAULT_PACK_LENGTH, 1 << (longest - 1).bit_length())
        budget = self.max_tokens if isinstance(self.max_tokens, int) else None
        return min(width, max(budget, longest)) if budget is not None else width

    # ------------------------------------------------------------------ data
    def build_datasets(self, stage: str | None) -> Mapping[str, Any]:
        """Return the datasets by split (``"train"``, ``"val"``, ``"test"``, ``"predict"``); override to load them.

        Tokenise them here too. Called by :meth:`setup` on every rank. The default returns the datasets given to the
        constructor.
        """
        return self.datasets

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (:meth:`build_datasets`) and forget the lengths of any that changed."""
        built = dict(self.build_datasets(stage))
        unknown = set(built) - set(SPLITS)
        if unknown:
            raise ValueError(f"build_datasets returned unknown split(s) {sorted(unknown)}; use {SPLITS}.")
        for split, dataset in built.items():
            if dataset is not None and (split not in self.datasets or self.datasets[split] is not dataset):
                self._lengths.pop(split, None)
                self._columns.pop(split, None)
                self._slots = {key: n for key, n in self._slots.items() if key[0] != split}
            self.datasets[split] = dataset

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

    @property
    def collator(self) -> PaddingCollator | PackingCollator:
        """The training collator (:meth:`collator_for` gives any split's)."""
        return self.collator_for("train")

    def _static_slots(self, split: str, budget: int) -> int:
        """Sample slots of a static batch of ``budget`` tokens: the planner caps each batch at this many samples.

        Every slot is a segment of the varlen kernel's grid, empty or not, so the count is the mean number of samples
        per batch plus the fullest row's (what :func:`~lightning_txopt.data.planning.group_rows` deals, at most), not
        the worst case of a batch of only the shortest samples; a multiple of 8, never over that worst case.
        """
        if (split, budget) in self._slots:  # the sampler and the collator both ask
            return self._slots[split, budget]
        lengths = self.planned_lengths(split)
        shortest = np.cumsum(np.sort(lengths))
        pack = self.pack_length
        worst = int(np.searchsorted(shortest, budget, side="right"))
        fullest_row = int(np.searchsorted(shortest, pack, side="right"))
        rows = budget // pack
        fewest_batches = max(-(-int(shortest[-1]) // (rows * pack)), 1)
        slots = min(-(-lengths.size // fewest_batches) + fullest_row, worst)
        self._slots[split, budget] = max(int(round_up(slots, 8)), 8)
        return self._slots[split, budget]

    def collator_for(self, split: str, max_tokens: int | None = None) -> PaddingCollator | PackingCollator:
        """The collator of a split (``max_tokens`` overrides the split's budget, for static packed shapes)."""
        if self._padding is not None:
            return self._padding
        pack = self.pack_length
        rows = slots = None
        if self.static_shapes:
            budget = max_tokens if max_tokens is not None else self._budget(split)
            assert budget is not None
            rows = budget // pack
            slots = self._static_slots(split, rows * pack)
        return PackingCollator(
            pack,
            rows=rows,
            num_slots=slots,
            pad_token_id=self.pad_token_id,
            causal=self.causal,
            label_pad_token_id=self.label_pad_token_id,
            input_key=self.length_key,
            max_length=self.max_length,
            truncation=self.truncation,
        )

    def _world(self) -> tuple[int | None, int | None]:
        trainer = self.trainer
        if trainer is None:
            return None, None
        return trainer.world_size, trainer.global_rank

    def make_sampler(self, split: str, max_tokens: int | None = None) -> BucketBatchSampler:
        """The batch sampler of a split (training: shuffled, with ``drop_last``; others: ordered)."""
        lengths = self.planned_lengths(split)
        train = split == "train"
        budget = max_tokens if max_tokens is not None else self._budget(split)
        num_replicas, rank = self._world()
        packed = self.strategy == "packed"
        slots = None
        if packed and self.static_shapes:
            assert budget is not None
            slots = self._static_slots(split, budget // self.pack_length * self.pack_length)
        return BucketBatchSampler(
            lengths,
            batch_size=self.batch_size if train else self.eval_batch_size,
            max_tokens=budget,
            shuffle=self.shuffle and train,
            seed=self.seed,
            drop_last=self.drop_last and train,
            num_replicas=num_replicas,
            rank=rank,
            group_by_length=self.strategy in ("bucket", "packed"),
            pool_size=self.pool_size,
            oversize=self.oversize,
            pack_length=self.pack_length if packed else None,
            max_samples=slots,
        )

    def loader_dataset(self, split: str) -> Any:
        """The dataset a split's loader reads, built once per dataset.

        That is the samples as columns (``flat_samples``) where that works, else the samples themselves (evaluation
        splits: each with its ``index``).

        Example:
            >>> dm = BucketDataModule([{"input_ids": [5, 6]}, {"input_ids": [7]}], pad_token_id=0, batch_size=2)
            >>> type(dm.loader_dataset("train")).__name__
            'FlatSamples'
        """
        if split in self._columns:  # forgotten by setup when the split's dataset changes, as its lengths are
            return self._columns[split]
        dataset = self.datasets[split]
        evaluation = split != "train"
        chosen: Any = _Indexed(dataset) if evaluation else dataset
        collate = self.collator_for(split)
        if self.flat_samples and isinstance(dataset, list | tuple) and getattr(collate, "accepts_columns", False):
            try:
                chosen = FlatSamples(dataset, input_key=self.length_key, with_index=evaluation)
            except (ValueError, TypeError, KeyError) as err:  # the per-sample path collates them, or says what is wrong
                rank_zero_debug(f"{split} samples read one by one, not as columns: {err}")
        self._columns[split] = chosen
        return chosen

    def _loader(self, split: str, sampler: BucketBatchSampler, cls: type[DataLoader] = DataLoader, **extra: Any) -> Any:
        return cls(
            self.loader_dataset(split),
            batch_sampler=sampler,
            collate_fn=self.collator_for(split),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            **extra,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Training loader; its ``state_dict``/``load_state_dict`` hold the training position (exact resume)."""
        sampler = self.make_sampler("train")
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

    @override
    def predict_dataloader(self) -> DataLoader:
        """Prediction loader: length-ordered batches under the evaluation budget, each with the samples' ``index``."""
        return self._loader("predict", self.make_sampler("predict"))

    def probe_batches(self, max_tokens: int) -> list[dict[str, Any]]:
        """Collated training batches with the worst-case shapes the plan makes at a budget of ``max_tokens``.

        A step's memory grows with the batch's padded tokens ``rows x width`` (activations) and with
        ``rows x width**2`` (attention over padded rows), so no single
        batch is the worst for every model. The batches probed are the widest, the one with the most rows (packed:
        the most samples), and every batch that has the most memory under some weighting of the two terms
        (:func:`~lightning_txopt.data.planning.worst_case_batches`); packed, the batch with the most rows, the one
        with the most samples and the one with the longest sample. Of real samples, on the CPU: what
        :class:`~lightning_txopt.callbacks.TokenBudgetFinder` runs its probe steps on. Measured on an H200 with
        BERT-base at 323,136 tokens: a batch of 1,335 rows of 242 tokens needed 1.5 GiB more than the one with the
        most padded tokens (9,232 rows of 35).
        """
        sampler = self.make_sampler("train", max_tokens=max_tokens)
        plan = sampler.plan(0)
        lengths = self.planned_lengths("train")
        if self.strategy == "packed":  # rows of pack_length: the most rows, the most samples, the longest sample
            per_batch = np.split(lengths[plan.indices], plan.offsets[1:-1])
            rows = np.array([int(next_fit_rows(b, self.pack_length)[-1]) + 1 for b in per_batch])
            picks = (np.argmax(rows), np.argmax(plan.sizes), np.argmax(plan.max_lengths(lengths)))
            chosen = list(dict.fromkeys(int(i) for i in picks))
        else:
            chosen = worst_case_batches(plan.sizes, plan.max_lengths(lengths))
        collate = self.collator_for("train", max_tokens=max_tokens)
        dataset = self.datasets["train"]
        return [collate([dataset[int(i)] for i in plan.batch(b)]) for b in chosen]

    def padding_report(self, split: str = "train") -> list[PaddingRow]:
        """:func:`~lightning_txopt.data.report.padding_report` of a split with this module's batching options."""
        train = split == "train"
        return padding_report(
            self.lengths(split),
            batch_size=self.batch_size if train else self.eval_batch_size,
            max_tokens=self._budget(split),
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            pad_to_lengths=self.pad_to_lengths,
            seed=self.seed,
            pack_length=self.pack_length if self.strategy == "packed" else None,
        )


class _ResumableDataLoader(DataLoader):
    """The training loader: its state is the training position, in Lightning's stateful-loader checkpoint slot.

    The position counts the batches the training loop consumed (``fit_loop.epoch_loop.batch_progress``), not what
    the sampler yielded: with workers, the loader fetches ahead.
    """

    def __init__(self, *args: Any, datamodule: BucketDataModule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        sampler = self.batch_sampler
        assert isinstance(sampler, BucketBatchSampler)
        trainer = self.datamodule.trainer
        consumed = (
            int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            if trainer is not None
            else sampler.state_dict()["consumed"]
        )
        epoch = sampler.epoch
        if consumed >= len(sampler):
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed, "seed": sampler.seed, "num_replicas": sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            sampler = self.batch_sampler
            assert isinstance(sampler, BucketBatchSampler)
            sampler.load_state_dict(state_dict)

"""Predictions back in dataset order: ``restore_order`` and an ``OrderedPredictionWriter`` for large sets.

Length-aware batches visit samples in length order, and under DDP each rank sees a part of them. Every evaluation and
prediction batch of :class:`~lightning_txopt.BucketDataModule` carries each sample's position in its dataset as
``"index"``, and :meth:`~lightning_txopt.TransformerModule.predict_step` returns it beside the predictions, so the
order can be restored exactly, whatever the batching, packing or number of ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

__all__ = ["OrderedPredictionWriter", "restore_order"]


def _flatten(outputs: Any) -> list[Mapping[str, Any]]:
    if isinstance(outputs, Mapping):
        return [outputs]
    if isinstance(outputs, Sequence) and not isinstance(outputs, str | bytes):
        return [item for part in outputs for item in _flatten(part)]
    raise TypeError(
        f"restore_order expects the dicts predict_step returns (or lists of them), got {type(outputs).__name__}."
    )


def restore_order(outputs: Any, *, index_key: str = "index") -> dict[str, torch.Tensor]:
    """Concatenate per-batch prediction dicts and sort them into dataset order.

    Args:
        outputs: What ``trainer.predict`` returns (a list of dicts, or a list of such lists with several predict
            loaders), or the lists of several ranks together (e.g. read back from :class:`OrderedPredictionWriter`'s
            files, or gathered with ``trainer.strategy.all_gather``): each dict maps names to tensors whose first
            dimension is the batch's samples, and holds ``index_key``.
        index_key: The key holding each sample's dataset position. Entries with a negative index (static-shape
            filler slots) are dropped.

    Returns:
        One tensor per key, row ``i`` being dataset sample ``i`` (on the CPU).

    Raises:
        TypeError: If ``outputs`` holds something other than dicts.
        KeyError: If a dict has no ``index_key``.
        ValueError: If a position appears twice, or positions are missing (``0 .. max``), or per-sample tensors do not
            match the index in length.

    Example:
        >>> batches = [{"index": torch.tensor([2, 0]), "preds": torch.tensor([7, 5])},
        ...            {"index": torch.tensor([1, -1]), "preds": torch.tensor([6, 0])}]
        >>> restore_order(batches)["preds"].tolist()
        [5, 6, 7]
    """
    parts = _flatten(outputs)
    if not parts:
        return {}
    for part in parts:
        if index_key not in part:
            raise KeyError(
                f"A prediction has no {index_key!r} (keys: {sorted(part)}): return the batch's {index_key!r} from "
                "predict_step (BucketDataModule's evaluation batches carry it)."
            )
    index = torch.cat([torch.as_tensor(p[index_key]).detach().cpu().reshape(-1) for p in parts])
    keep = index >= 0
    order = torch.argsort(index[keep])
    sorted_index = index[keep][order]
    if sorted_index.numel() and bool((sorted_index[1:] == sorted_index[:-1]).any()):
        dup = int(sorted_index[1:][sorted_index[1:] == sorted_index[:-1]][0])
        raise ValueError(f"Dataset position {dup} was predicted twice: were the same outputs passed twice?")
    expected = torch.arange(sorted_index.numel())
    if not torch.equal(sorted_index, expected):
        missing = sorted(set(range(int(sorted_index.max()) + 1)) - set(sorted_index.tolist()))[:5]
        raise ValueError(
            f"Dataset positions {missing} have no prediction: with several ranks, pass the outputs of every rank."
        )
    result: dict[str, torch.Tensor] = {index_key: sorted_index}
    for key in parts[0]:
        if key == index_key:
            continue
        values = torch.cat([torch.as_tensor(p[key]).detach().cpu() for p in parts])
        if values.shape[0] != index.shape[0]:
            raise ValueError(
                f"{key!r} has {values.shape[0]} rows for {index.shape[0]} indices: predict_step must return one row "
                "per sample."
            )
        result[key] = values[keep][order]
    return result


class OrderedPredictionWriter(BasePredictionWriter):
    """Write each rank's predictions to ``output_dir`` and, on rank 0, the whole set in dataset order.

    For prediction sets too large for the GPU or the Trainer's list: use
    ``trainer.predict(..., return_predictions=False)``. Every batch's outputs are moved to the CPU as they come; at the
    end each rank writes ``predictions_rank{r}.pt`` and, after a barrier, rank 0 merges all ranks' files with
    :func:`restore_order` into ``predictions.pt`` (load it with ``torch.load(..., weights_only=True)``).

    Args:
        output_dir: Folder of the files (created).

    Example:
        >>> writer = OrderedPredictionWriter("predictions")
        >>> writer.output_dir.name
        'predictions'
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = Path(output_dir)
        self._rows: list[dict[str, torch.Tensor]] = []

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._rows.extend(
            {k: torch.as_tensor(v).detach().cpu() for k, v in item.items()} for item in _flatten(prediction)
        )

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self._rows, self.output_dir / f"predictions_rank{trainer.global_rank}.pt")
        self._rows = []
        trainer.strategy.barrier("OrderedPredictionWriter")
        if trainer.is_global_zero:
            parts = [
                torch.load(self.output_dir / f"predictions_rank{r}.pt", weights_only=True)
                for r in range(trainer.world_size)
            ]
            torch.save(restore_order(parts), self.output_dir / "predictions.pt")

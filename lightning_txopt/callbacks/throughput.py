"""``TokenThroughputMonitor``: real (non-pad) tokens/s, padding, samples/s, memory and MFU, across ranks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from lightning_txopt.utils.checks import check_positive_int

__all__ = ["TokenThroughputMonitor", "batch_token_counts", "device_token_counts"]


def batch_token_counts(batch: Any) -> tuple[int, int, int]:
    """``(real tokens, processed tokens, samples)`` of a padded batch.

    Real tokens are ``attention_mask.sum()`` (or ``cu_seq_lens[-1]`` for packed batches without a mask); processed
    tokens are ``input_ids.numel()``.

    Example:
        >>> batch = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
        >>> batch_token_counts(batch)
        (4, 8, 2)
    """
    real, processed, samples = device_token_counts(batch)
    return int(real), processed, int(samples)


def device_token_counts(batch: Any) -> tuple[int | torch.Tensor, int, int | torch.Tensor]:
    """:func:`batch_token_counts` without reading the device: the real-token count stays a tensor where the batch is.

    ``TokenThroughputMonitor`` sums these on the device and reads them only when it logs: an ``int()`` of a CUDA
    tensor every step would stall the host until the GPU caught up.

    Example:
        >>> device_token_counts({"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 0, 0]] * 2)})
        (tensor(4), 8, 2)
    """
    ids = batch["input_ids"]
    processed = ids.numel()
    real: int | torch.Tensor
    if "attention_mask" in batch and batch["attention_mask"].dim() == ids.dim():
        real = batch["attention_mask"].sum()
    elif "cu_seq_lens" in batch:
        real = batch["cu_seq_lens"][-1]
    else:
        real = processed
    samples: int | torch.Tensor
    if "cu_seq_lens" in batch:  # packed: non-empty sample slots (static shapes pad the slots with empty ones)
        cu = batch["cu_seq_lens"]
        samples = (cu[1:] > cu[:-1]).sum()
    else:
        samples = int(ids.shape[0])
    return real, processed, samples


class TokenThroughputMonitor(Callback):
    """Log training throughput counted in real tokens, correct for variable batch shapes, accumulation and DDP.

    Every ``log_every_n_steps`` optimizer steps, logs (on all ranks' totals, gathered with torchmetrics'
    ``gather_all_tensors``):

    * ``throughput/real_tokens_per_sec`` and ``throughput/processed_tokens_per_sec`` (padding included),
    * ``throughput/padding_fraction`` = 1 - real / processed,
    * ``throughput/samples_per_sec``,
    * ``throughput/peak_memory_mib`` (CUDA, this rank's ``torch.cuda.max_memory_allocated``: the peak since the
      process started or user code last reset it; with ``reset_peak_memory=True``, the peak since the last log),
    * ``throughput/mfu`` when ``flops_per_token`` is known and the device's peak FLOP/s is known to Lightning.

    Lightning's ``ThroughputMonitor`` counts padding as work and assumes a constant batch; this one counts what is in
    each micro-batch.

    Args:
        log_every_n_steps: Log after this many optimizer steps.
        flops_per_token: Training FLOPs per real token; ``"auto"`` asks the LightningModule's ``flops_per_token()``
            (``TransformerModule`` has one) and skips MFU otherwise.
        count_tokens: Function of a batch giving ``(real, processed, samples)`` as integers or 0-dim tensors (summed
            where they are, read only when logging); default :func:`device_token_counts`.
        reset_peak_memory: Reset CUDA's peak-memory counter when training starts and after each log, so that
            ``peak_memory_mib`` is each window's peak. The counter is process-wide: resetting it changes what every
            other reader of ``torch.cuda.max_memory_allocated`` sees (a benchmark's own measurement, another
            callback), so the default leaves it alone.

    Raises:
        ValueError: If ``log_every_n_steps < 1``, ``flops_per_token`` is another string than ``"auto"`` or
            ``reset_peak_memory`` is not a bool.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_txopt import BucketDataModule, TransformerModule
        >>> module = TransformerModule(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 4,
        ...     "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}, num_labels=2)
        >>> samples = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in (2, 3, 4, 5) * 2]
        >>> data = BucketDataModule(samples, pad_token_id=0, batch_size=4, shuffle=False)
        >>> monitor = TokenThroughputMonitor(log_every_n_steps=1)
        >>> trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[monitor], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> monitor.totals  # batches of lengths 2, 2, 3, 3 and 4, 4, 5, 5: 28 real tokens, padded to 3 and 5: 32
        {'real_tokens': 28, 'processed_tokens': 32, 'samples': 8}
        >>> sorted(monitor.last)  # the last log's metrics (on a GPU also peak memory and MFU)
        ['throughput/padding_fraction', 'throughput/processed_tokens_per_sec', 'throughput/real_tokens_per_sec', \
'throughput/samples_per_sec']
    """

    def __init__(
        self,
        log_every_n_steps: int = 10,
        *,
        flops_per_token: float | str | None = "auto",
        count_tokens: Callable[[Any], tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]] | None = None,
        reset_peak_memory: bool = False,
    ) -> None:
        check_positive_int("log_every_n_steps", log_every_n_steps)
        if isinstance(flops_per_token, str) and flops_per_token != "auto":
            raise ValueError(f"`flops_per_token` must be a number, 'auto' or None, got {flops_per_token!r}.")
        if not isinstance(reset_peak_memory, bool):
            raise ValueError(f"`reset_peak_memory` must be True or False, got {reset_peak_memory!r}.")
        self.log_every_n_steps = int(log_every_n_steps)
        self.flops_per_token = flops_per_token
        self.count_tokens = count_tokens or device_token_counts
        self.reset_peak_memory = reset_peak_memory
        self._local: list[int | torch.Tensor] = [0, 0, 0]  # real, processed, samples since the last log, this rank
        self.totals = {"real_tokens": 0, "processed_tokens": 0, "samples": 0}
        self.last: dict[str, float] = {}
        self.train_seconds = 0.0
        self._t0: float | None = None
        self._steps = 0
        self._last_step = -1

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and self._steps == 0:  # nothing pending: do not count validation or epoch set-up
            self._sync(trainer)
            self._t0 = time.perf_counter()

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is None:
            self._sync(trainer)
            self._t0 = time.perf_counter()
            self._last_step = trainer.global_step
            if self.reset_peak_memory and trainer.strategy.root_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        for i, value in enumerate(self.count_tokens(batch)):
            self._local[i] = self._local[i] + (value.detach() if isinstance(value, torch.Tensor) else int(value))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._steps += trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._steps >= self.log_every_n_steps or last_batch:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._collect(trainer, pl_module)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and self._steps:  # a run stopped by max_steps between two logs
            self._collect(trainer, pl_module)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        assert self._t0 is not None
        self._sync(trainer)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self.train_seconds += elapsed
        real, processed, samples = self._global_counts(trainer)
        self._local = [0, 0, 0]
        self.totals["real_tokens"] += int(real)
        self.totals["processed_tokens"] += int(processed)
        self.totals["samples"] += int(samples)
        metrics = {
            "throughput/real_tokens_per_sec": real / elapsed,
            "throughput/processed_tokens_per_sec": processed / elapsed,
            "throughput/padding_fraction": 1.0 - real / processed if processed else 0.0,
            "throughput/samples_per_sec": samples / elapsed,
        }
        device = trainer.strategy.root_device
        if device.type == "cuda":
            metrics["throughput/peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            if self.reset_peak_memory:
                torch.cuda.reset_peak_memory_stats(device)
        mfu = self._mfu(trainer, pl_module, real / elapsed, processed / max(samples, 1))
        if mfu is not None:
            metrics["throughput/mfu"] = mfu
        self.last = metrics
        self._steps = 0
        self._t0 = time.perf_counter()
        return metrics

    def _mfu(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tokens_per_sec: float, seq: float
    ) -> float | None:
        fpt = self.flops_per_token
        if fpt == "auto":
            fn = getattr(pl_module, "flops_per_token", None)
            fpt = float(fn(seq_len=int(seq))) if callable(fn) else None
        if fpt is None or trainer.strategy.root_device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = (
            torch.bfloat16
            if "bf16" in str(trainer.precision)
            else (torch.float16 if "16" in str(trainer.precision) else torch.float32)
        )
        peak = get_available_flops(trainer.strategy.root_device, dtype)
        if not peak:
            return None
        return float(fpt) * tokens_per_sec / (peak * trainer.world_size)

    def _global_counts(self, trainer: pl.Trainer) -> tuple[float, float, float]:
        """This window's counts summed over all ranks (torchmetrics' all-gather; every rank gets the sums)."""
        device = trainer.strategy.root_device
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in self._local])
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            local = torch.stack(gather_all_tensors(local)).sum(0)
        real, processed, samples = (float(v) for v in local.tolist())
        return real, processed, samples

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update(state_dict.get("totals", {}))

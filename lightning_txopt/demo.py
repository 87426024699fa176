"""The runs behind ``txopt demo`` and ``txopt bench``: one fine-tuning run measured, as a plain function."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_txopt.callbacks.throughput import TokenThroughputMonitor
from lightning_txopt.data.text import TextDataModule
from lightning_txopt.module import TransformerModule

__all__ = ["RunResult", "measure_run"]


@dataclasses.dataclass
class RunResult:
    """What one measured run produced."""

    name: str
    real_tokens: int
    processed_tokens: int
    train_seconds: float
    wall_seconds: float
    peak_memory_mib: float
    val_accuracy: float
    val_loss: float
    optimizer_steps: int
    precision: str
    settings: dict[str, Any]

    @property
    def real_tokens_per_sec(self) -> float:
        """Real (non-pad) tokens per second of training time."""
        return self.real_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def padding_efficiency(self) -> float:
        """Real / processed tokens."""
        return self.real_tokens / self.processed_tokens if self.processed_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with the derived rates."""
        out = dataclasses.asdict(self)
        out["real_tokens_per_sec"] = self.real_tokens_per_sec
        out["padding_efficiency"] = self.padding_efficiency
        return out


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def measure_run(
    name: str,
    *,
    datamodule: TextDataModule,
    model: str | None = None,
    config: Any | None = None,
    callbacks: list[Callback] | None = None,
    precision: str = "32-true",
    accelerator: str = "auto",
    max_epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 5e-5,
    seed: int = 0,
    enable_progress_bar: bool = True,
    validate: bool = True,
) -> RunResult:
    """Fine-tune once and measure it: real tokens/s of training time, padding, peak memory, validation accuracy."""
    pl.seed_everything(seed, verbose=False)
    module = TransformerModule(
        model, config=config, num_labels=max(datamodule.num_labels, 2), learning_rate=learning_rate
    )
    monitor = TokenThroughputMonitor(log_every_n_steps=10**9)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=max_epochs,
        max_steps=max_steps,
        callbacks=[*(callbacks or []), monitor],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
    )
    device = trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return RunResult(
        name=name,
        real_tokens=monitor.totals["real_tokens"],
        processed_tokens=monitor.totals["processed_tokens"],
        train_seconds=monitor.train_seconds,  # training batches only: validation and set-up excluded
        wall_seconds=wall,
        peak_memory_mib=_peak_memory_mib(device),
        val_accuracy=metrics.get("val_acc", float("nan")),
        val_loss=metrics.get("val_loss", float("nan")),
        optimizer_steps=trainer.global_step,
        precision=str(trainer.precision),
        settings={
            "strategy": datamodule.strategy,
            "batch_size": datamodule.batch_size,
            "max_tokens": datamodule.max_tokens,
            "max_length": datamodule.max_length,
            "callbacks": [type(c).__name__ for c in callbacks or []],
        },
    )

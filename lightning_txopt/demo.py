"""The runs behind ``txopt demo`` and ``txopt bench``: one fine-tuning run measured, as a plain function."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_txopt.callbacks.throughput import TokenThroughputMonitor
from lightning_txopt.data.text import TextDataModule
from lightning_txopt.module import TransformerModule

__all__ = ["RunResult", "largest_categories", "measure_in_subprocess", "measure_run", "peak_rss_mib", "reset_peak_rss"]


@dataclasses.dataclass
class RunResult:
    """What one measured run produced.

    ``peak_memory_mib`` is measured during this run only: on CUDA ``torch.cuda.max_memory_allocated()`` (reset before
    the run), on CPU the process's peak resident memory (:func:`reset_peak_rss` before the run); NaN where neither
    can be measured. ``memory_measure`` says which. ``val_majority_accuracy`` is the accuracy of always answering the
    most frequent validation label: what ``val_accuracy`` must beat to mean anything.

    Example:
        >>> run = RunResult("r", real_tokens=900, processed_tokens=1000, train_seconds=2.0, wall_seconds=3.0,
        ...                 peak_memory_mib=1.0, val_accuracy=0.5, val_loss=1.0, optimizer_steps=4, precision="32-true",
        ...                 settings={})
        >>> run.real_tokens_per_sec, run.padding_efficiency
        (450.0, 0.9)
    """

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
    memory_measure: str = "not measured"
    val_majority_accuracy: float = math.nan

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


def largest_categories(records: Sequence[Mapping[str, Any]], k: int, label: str = "label") -> list[dict[str, Any]]:
    """The records of the ``k`` most frequent labels (ties broken by label), in their original order.

    Example:
        >>> rows = [{"label": x} for x in "abacbcd"]
        >>> [r["label"] for r in largest_categories(rows, 2)]
        ['a', 'b', 'a', 'b']
    """
    counts = Counter(r[label] for r in records)
    keep = {name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:k]}
    return [dict(r) for r in records if r[label] in keep]


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current one, so that :func:`peak_rss_mib` covers what follows.

    Linux only: collects garbage, hands freed heap memory back to the system (glibc ``malloc_trim``) and writes ``5``
    to ``/proc/self/clear_refs``, which sets the kernel's high-water mark (``VmHWM``) to the current resident size.

    Returns:
        Whether the reset took place (``False`` where ``/proc/self/clear_refs`` is missing, e.g. macOS).

    Example:
        >>> import numpy as np, sys
        >>> big = np.ones(2**27 // 8); del big  # 128 MiB, resident for a moment
        >>> reset_peak_rss() or sys.platform != "linux"
        True
        >>> peak_rss_mib() < _current_rss_mib() + 64 or sys.platform != "linux"  # the 128 MiB peak is forgotten
        True
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            libc = ctypes.CDLL(libc_name)
            if hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
        except OSError:
            pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return math.nan


def peak_rss_mib() -> float:
    """The process's peak resident memory (``VmHWM``) in MiB since the start or the last :func:`reset_peak_rss`.

    NaN where ``/proc/self/status`` is missing.

    Example:
        >>> import sys
        >>> peak_rss_mib() > 10 or sys.platform != "linux"
        True
    """
    return _status_mib("VmHWM")


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


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
    head_lr_factor: float = 1.0,
    seed: int = 0,
    enable_progress_bar: bool = True,
    validate: bool = True,
) -> RunResult:
    """Fine-tune once and measure it: real tokens/s of training time, padding, peak memory, validation accuracy.

    Peak memory is this run's own (see :class:`RunResult`), so runs measured one after another in one process can be
    compared.

    Example:
        >>> from lightning_txopt.data.text import TextDataModule
        >>> class Chars:  # a tokenizer: one id per character
        ...     pad_token_id = 0
        ...     def __call__(self, texts, truncation, max_length):
        ...         return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}
        >>> dm = TextDataModule(None, Chars(), limit=40, max_length=32, batch_size=8)
        >>> config = {"model_type": "bert", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1,
        ...           "num_attention_heads": 2, "intermediate_size": 32}
        >>> run = measure_run("tiny", datamodule=dm, config=config, accelerator="cpu", enable_progress_bar=False)
        >>> run.optimizer_steps, run.real_tokens > 0
        (5, True)
    """
    pl.seed_everything(seed, verbose=False)
    module = TransformerModule(
        model,
        config=config,
        num_labels=max(datamodule.num_labels, 2),
        learning_rate=learning_rate,
        head_lr_factor=head_lr_factor,
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
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        memory_measure = "torch.cuda.max_memory_allocated during the run"
    else:
        memory_measure = "process peak RSS during the run" if reset_peak_rss() else "not measured"
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib() if memory_measure != "not measured" else math.nan
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val_labels = [s["labels"] for s in datamodule.datasets.get("val") or []]
    scalar = bool(val_labels) and all(isinstance(v, int | np.integer) for v in val_labels)
    majority = float(np.bincount(np.asarray(val_labels)).max() / len(val_labels)) if scalar else math.nan
    return RunResult(
        name=name,
        real_tokens=monitor.totals["real_tokens"],
        processed_tokens=monitor.totals["processed_tokens"],
        train_seconds=monitor.train_seconds,  # training batches only: validation and set-up excluded
        wall_seconds=wall,
        peak_memory_mib=peak,
        val_accuracy=metrics.get("val_acc", math.nan),
        val_loss=metrics.get("val_loss", math.nan),
        optimizer_steps=trainer.global_step,
        precision=str(trainer.precision),
        settings={
            "strategy": datamodule.strategy,
            "batch_size": datamodule.batch_size,
            "max_tokens": datamodule.max_tokens,
            "max_length": datamodule.max_length,
            "learning_rate": learning_rate,
            "head_lr_factor": head_lr_factor,
            "callbacks": [type(c).__name__ for c in callbacks or []],
        },
        memory_measure=memory_measure,
        val_majority_accuracy=majority,
    )


def measure_in_subprocess(name: str, **kwargs: Any) -> RunResult:
    """:func:`measure_run` in a fresh Python process (``spawn``), which ends with the run.

    Each run then starts from the same state: its peak memory is its own (none is left over from an earlier run) and
    no run warms caches for the next. The arguments must pickle (a ``TextDataModule``, callbacks and configs do). An
    exception of the run is raised here. Costs one interpreter start and import of torch/Lightning (a few seconds).

    Example:
        >>> from lightning_txopt.data.text import TextDataModule
        >>> dm = TextDataModule(None, limit=40, max_length=32, batch_size=8)  # the demo model's tokenizer
        >>> config = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1,
        ...           "num_attention_heads": 2, "intermediate_size": 32}
        >>> run = measure_in_subprocess("tiny", datamodule=dm, config=config, accelerator="cpu", max_steps=2,
        ...                             enable_progress_bar=False)
        >>> run.optimizer_steps
        2
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_run, name, **kwargs).result()

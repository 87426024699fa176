"""``TokenThroughputMonitor`` and CUDA's process-wide peak-memory counter. Skipped without a CUDA device.

The counter behind ``torch.cuda.max_memory_allocated`` is shared by everything in the process: a benchmark or a demo
that resets it before ``fit`` and reads it after must see the run's true peak, so the monitor must not reset it unless
asked to (``reset_peak_memory=True``, per-window peaks)."""

from __future__ import annotations

import pytest
import torch

from lightning_txopt.callbacks import TokenThroughputMonitor
from lightning_txopt.data import BucketDataModule
from lightning_txopt.module import TransformerModule
from tests.helpers import BERT_DICT, cpu_trainer, make_samples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_BLOCK = 2**30  # a 1 GiB allocation before fit: far above the tiny model's own peak


def _fit_after_a_peak(monitor: TokenThroughputMonitor) -> tuple[float, float]:
    """Reset the counter, allocate and free 1 GiB, fit; the counter's value after fit and the monitor's last log."""
    dm = BucketDataModule(make_samples(200, seed=2), pad_token_id=0, max_tokens=256)
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = cpu_trainer(accelerator="cuda", precision="bf16-mixed", max_steps=6, callbacks=[monitor])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(_BLOCK, dtype=torch.uint8, device="cuda")
    del block
    trainer.fit(module, datamodule=dm)
    return torch.cuda.max_memory_allocated() / 2**20, monitor.last["throughput/peak_memory_mib"]


def test_default_leaves_the_process_peak_alone():
    after_fit, logged = _fit_after_a_peak(TokenThroughputMonitor(log_every_n_steps=3))
    assert after_fit >= _BLOCK / 2**20  # the caller's measurement still holds its 1 GiB peak
    assert logged >= _BLOCK / 2**20


def test_reset_peak_memory_logs_each_windows_peak():
    after_fit, logged = _fit_after_a_peak(TokenThroughputMonitor(log_every_n_steps=3, reset_peak_memory=True))
    assert logged < _BLOCK / 2**20 / 4  # the window's own peak: the tiny model, not the earlier 1 GiB block
    assert after_fit < _BLOCK / 2**20 / 4

"""Token-normalised accumulation across 2 GPUs (NCCL): each step equals the single-process reference over the same
global window, within bf16 tolerance. Skipped without 2 CUDA devices; for the multi-GPU machine kinds."""

from __future__ import annotations

import pytest
import torch

from lightning_txopt.callbacks import AccumulationScheduler
from tests.callbacks.test_accumulation import SumLossModule, _dm, _reference_grad, _synced_windows
from tests.helpers import cpu_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_two_gpus_step_is_the_global_window_gradient(tmp_path):
    module = SumLossModule(reduction="sum", record_dir=str(tmp_path))
    trainer = cpu_trainer(
        accelerator="cuda",
        devices=2,
        strategy="ddp_spawn",
        precision="bf16-mixed",
        max_epochs=1,
        callbacks=[AccumulationScheduler({0: 2}, normalize="tokens")],
    )
    trainer.fit(module, datamodule=_dm())
    for before, after, micro0, micro1 in _synced_windows(tmp_path):
        ref = _reference_grad(before, micro0 + micro1, "tokens")
        num = sum(float(((before[n] - after[n]) - g).pow(2).sum()) for n, g in ref.items()) ** 0.5
        den = sum(float(g.pow(2).sum()) for g in ref.values()) ** 0.5
        assert num / den < 6e-2

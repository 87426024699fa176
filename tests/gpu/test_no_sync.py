"""Training steps queue GPU work without waiting for it: no host-device synchronisation inside a step.

A read of a device value (``int(t)``, ``t.item()``) or a blocking copy of a Python number to the device makes the host
wait for the GPU every step, so the GPU idles while the next step is launched. CUDA's sync debug mode turns any such
call into an error. Skipped without a CUDA device.

Hugging Face's SDPA mask builder (transformers 5) reads ``padding_mask.all()`` in every forward to decide whether the
mask can be dropped: a sync of the model's own. The default backend (``attn_implementation="auto"``) builds an
encoder's mask without that check, so the steps below run under the guard unpatched; with ``"sdpa"`` the check is
switched off (the mask is then always built: the same results) so that the test sees only the syncs of Lightning and
lightning_txopt."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_txopt.callbacks import AccumulationScheduler, FreezeEmbeddings, TokenThroughputMonitor
from lightning_txopt.data import BucketDataModule
from lightning_txopt.module import TransformerModule
from tests.helpers import BERT_DICT, cpu_trainer, make_samples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class SyncGuard(pl.Callback):
    """Errors on synchronising CUDA calls from the start of batch ``first`` until the epoch ends."""

    def __init__(self, first: int = 3) -> None:
        self.first = first
        self.guarded = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            torch.cuda.set_sync_debug_mode("error")
        if batch_idx >= self.first:
            self.guarded += 1

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)

    def on_exception(self, trainer, pl_module, exception):  # before teardown copies the model back to the host
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize(("normalize", "attention"), [("mean", "auto"), ("tokens", "auto"), ("mean", "sdpa")])
def test_training_steps_do_not_synchronise(normalize, attention, monkeypatch):
    if attention == "sdpa":  # transformers' own mask builder reads the mask on the host: switched off
        import transformers.masking_utils as masking

        monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *a, **k: False, raising=False)
    guard = SyncGuard()
    dm = BucketDataModule(make_samples(600, seed=1), pad_token_id=0, max_tokens=256)
    module = TransformerModule(config=BERT_DICT, num_labels=3, attn_implementation=attention)
    trainer = cpu_trainer(
        accelerator="cuda",
        precision="bf16-mixed",
        max_steps=8,
        log_every_n_steps=1000,
        # the guard first: it must switch the debug mode off before the monitor reads its counts at the end
        callbacks=[
            guard,
            FreezeEmbeddings(),
            TokenThroughputMonitor(log_every_n_steps=10**6),
            AccumulationScheduler({0: 2}, normalize=normalize),
        ],
    )
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.global_step == 8
    assert guard.guarded >= 10  # batches 3..15 ran under the guard

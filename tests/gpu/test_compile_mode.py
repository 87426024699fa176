"""``TransformerModule(compile=True, compile_mode="reduce-overhead")`` on a CUDA GPU: the compiled graphs replayed as
CUDA graphs train and validate exactly as the default compile does (skipped without a GPU).

Results of the last GPU run are recorded in docs/results/gpu_tests.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_txopt import BucketDataModule
from lightning_txopt.models.attention import varlen_kernel_available
from lightning_txopt.module import CompileMode, TransformerModule
from tests.helpers import BERT_DICT, cpu_trainer, make_samples

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and varlen_kernel_available("cuda", torch.bfloat16)),
        reason="needs a CUDA device with the varlen kernel",
    ),
]

# no dropout (the helpers' tiny BERT): both modes must give the same losses step for step
BERT = dict(BERT_DICT, vocab_size=100, hidden_size=64, intermediate_size=128)


def _fit(mode: CompileMode | None) -> tuple[list[float], float]:
    torch.compiler.reset()
    samples = make_samples(240, seed=7, max_len=60)
    dm = BucketDataModule(
        samples[:200],
        val_dataset=samples[200:],
        pad_token_id=0,
        strategy="packed",
        max_tokens=256,
        max_length=64,
        static_shapes=True,
    )
    torch.manual_seed(0)
    module = TransformerModule(config=BERT, num_labels=3, compile=True, compile_mode=mode, learning_rate=1e-3)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            losses.append(float(outputs["loss"]))  # read before the next replay reuses the graph's output memory

    trainer = cpu_trainer(
        accelerator="cuda", precision="bf16-mixed", max_steps=8, val_check_interval=4, callbacks=[Losses()]
    )
    trainer.fit(module, datamodule=dm)
    return losses, float(trainer.callback_metrics["val_loss"])


def test_reduce_overhead_trains_and_validates_as_the_default_compile():
    default, val_default = _fit(None)
    graphed, val_graphed = _fit("reduce-overhead")
    assert len(default) == len(graphed) == 8
    assert graphed == pytest.approx(default, rel=1e-3, abs=1e-4)
    assert val_graphed == pytest.approx(val_default, rel=1e-3)

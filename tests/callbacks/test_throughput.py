from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from lightning_txopt.callbacks import AccumulationScheduler, TokenThroughputMonitor, batch_token_counts
from lightning_txopt.data import BucketBatchSampler, BucketDataModule
from tests.helpers import ModelModule, cpu_trainer, make_samples, tiny_bert


def _expected(dm: BucketDataModule, epochs: int = 1, world: int = 1) -> dict[str, int]:
    """Hand count over the planned batches: real = sum of lengths, processed = batch size x longest."""
    dm.setup("fit")
    lengths = dm.lengths("train")
    real = processed = samples = 0
    for epoch, rank in ((e, r) for e in range(epochs) for r in range(world)):
        sampler = BucketBatchSampler(
            lengths, batch_size=7, seed=2, group_by_length=False, num_replicas=world, rank=rank
        )
        sampler.set_epoch(epoch)
        for batch in sampler:
            real += int(lengths[batch].sum())
            processed += len(batch) * int(lengths[batch].max())
            samples += len(batch)
    return {"real_tokens": real, "processed_tokens": processed, "samples": samples}


def _dm() -> BucketDataModule:
    return BucketDataModule(make_samples(60, seed=13), pad_token_id=0, strategy="dynamic", batch_size=7, seed=2)


def test_counts_for_uneven_batches():
    batch = {"input_ids": torch.zeros(3, 5), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1] + [0] * 4])}
    assert batch_token_counts(batch) == (8, 15, 3)
    monitor = TokenThroughputMonitor(log_every_n_steps=2)
    trainer = cpu_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(ModelModule(tiny_bert()), datamodule=_dm())
    assert monitor.totals == _expected(_dm(), epochs=2)
    assert monitor.train_seconds > 0
    m = monitor.last
    assert 0 < m["throughput/padding_fraction"] < 1
    assert m["throughput/processed_tokens_per_sec"] > m["throughput/real_tokens_per_sec"] > 0


def test_counts_with_accumulation():
    monitor = TokenThroughputMonitor(log_every_n_steps=1)
    cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 3}), monitor]).fit(
        ModelModule(tiny_bert()), datamodule=_dm()
    )
    assert monitor.totals == _expected(_dm())


def test_argument_errors():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TokenThroughputMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="flops_per_token"):
        TokenThroughputMonitor(flops_per_token="fast")
    with pytest.raises(ValueError, match="reset_peak_memory"):
        TokenThroughputMonitor(reset_peak_memory="yes")  # type: ignore[arg-type]


class _Record(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        monitor = next(c for c in trainer.callbacks if isinstance(c, TokenThroughputMonitor))
        with open(f"{self.path}/rank{trainer.global_rank}.json", "w") as fh:
            json.dump(monitor.totals, fh)


@pytest.mark.ddp
def test_two_ranks_count_all_ranks(tmp_path):
    monitor = TokenThroughputMonitor(log_every_n_steps=2)
    trainer = cpu_trainer(max_epochs=1, devices=2, strategy="ddp_spawn", callbacks=[monitor, _Record(str(tmp_path))])
    trainer.fit(ModelModule(tiny_bert()), datamodule=_dm())
    totals = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert totals[0] == totals[1] == _expected(_dm(), world=2)  # both ranks see the global (summed) counts

"""Host time per training step that Lightning, `TransformerModule` and the DataModule's loader add to a plain loop.

    python benchmarks/host_overhead.py [--steps 600] [--repeats 2]

On a GPU whose step is partly host-bound (eager BERT-base on bucketed batches of 16,384 tokens: ~46 ms per step on an
H200), every millisecond of host work per step shows in the throughput. This measures that work where nothing else
hides it: a one-layer BERT of width 8 on the CPU, one thread, batches of 8 samples, so the step is nearly all Python
and dispatch. Rows, in each repeat:

* a plain loop (forward, cross-entropy, backward, ``AdamW``) over the same batches collated before timing;
* ``Trainer.fit`` with ``TransformerModule`` and ``BucketDataModule`` (``num_workers=0``), samples read as columns
  (the default) and one by one (``flat_samples=False``).

The difference between the plain loop and the Lightning rows is the overhead per step. The first 100 steps of each
row are not timed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import environment, markdown_table
from transformers import AutoModelForSequenceClassification, BertConfig

from lightning_txopt import BucketDataModule, TransformerModule

WARMUP = 100


def config() -> BertConfig:
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=8,
        max_position_embeddings=64,
    )
    cfg.num_labels = 3
    return cfg


def samples(n: int = 4000) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(10), 0.6, n).astype(int), 3, 40)
    return [{"input_ids": rng.integers(5, 100, int(m)).tolist(), "labels": int(rng.integers(3))} for m in lengths]


def plain(data: list[dict[str, Any]], steps: int) -> float:
    dm = BucketDataModule(data, pad_token_id=0, batch_size=8, seed=0)
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps), iter(dm.train_dataloader()), strict=False)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == WARMUP:
            t0 = time.perf_counter()
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / (len(batches) - WARMUP)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.t0 = 0.0
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == WARMUP:  # not the batch index: it restarts every epoch
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.t0


def lightning(data: list[dict[str, Any]], steps: int, flat: bool) -> float:
    dm = BucketDataModule(data, pad_token_id=0, batch_size=8, seed=0, flat_samples=flat)
    module = TransformerModule(config=config(), num_labels=3, attn_implementation="sdpa")
    timer = _Timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return timer.seconds / (steps - WARMUP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help=f"steps per row, the first {WARMUP} untimed")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} untimed steps, got {args.steps}.")
    torch.set_num_threads(1)
    data = samples()
    rows = []
    for repeat in range(1, args.repeats + 1):
        base = plain(data, args.steps)
        columns = lightning(data, args.steps, flat=True)
        one_by_one = lightning(data, args.steps, flat=False)
        rows.append([repeat, base * 1e6, columns * 1e6, one_by_one * 1e6, (columns - base) * 1e6])
    header = ["repeat", "plain loop, us/step", "Lightning, columns", "Lightning, one by one", "added, columns"]
    print(markdown_table(header, rows))
    print(f"\n{args.steps - WARMUP} timed steps per row; {environment()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

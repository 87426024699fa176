"""What every example shares: arguments, the LightningModule (the library's TransformerModule) and the trainer."""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
from transformers import BertConfig

from lightning_txopt import TokenThroughputMonitor, TransformerModule
from lightning_txopt.data.fortunes import default_tokenizer_path


def parse_args(description: str, *, ladder: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if ladder:
        parser.add_argument("--ladder", type=int, nargs="+", default=None, help="pad_to_lengths: widths to pad to")
    parser.add_argument("--limit", type=int, default=None, help="use the first N records of the corpus")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per batch instead of --batch-size")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of the pretrained MiniLM")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto")
    return parser.parse_args()


def make_module(num_labels: int, tiny: bool) -> TransformerModule:
    """The pretrained MiniLM (demo extra) or, with --tiny, a tiny random BERT of the same vocabulary."""
    if tiny:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        return TransformerModule(config=config, num_labels=num_labels, learning_rate=1e-4)
    return TransformerModule(str(default_tokenizer_path()), num_labels=num_labels)


def run(args: argparse.Namespace, datamodule: pl.LightningDataModule, num_labels: int, **trainer_kwargs: Any) -> None:
    model = make_module(num_labels, args.tiny)
    monitor = TokenThroughputMonitor(log_every_n_steps=10)
    trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), monitor]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        precision=args.precision,
        accelerator=args.accelerator,
        logger=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    tokens = monitor.totals["real_tokens"]
    print(f"{tokens:,} real tokens in {seconds:.1f} s ({tokens / seconds:,.0f} real tokens/s); {metrics}")

"""What every example shares: arguments, a minimal classification LightningModule and the trainer."""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from lightning_txopt.data.fortunes import default_tokenizer_path


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
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


class Classifier(pl.LightningModule):
    """Fine-tunes a sequence classifier; logs loss and accuracy."""

    def __init__(self, num_labels: int, tiny: bool = False, lr: float = 5e-5) -> None:
        super().__init__()
        if tiny:
            config = BertConfig(
                vocab_size=30522,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                num_labels=num_labels,
            )
            self.model = BertForSequenceClassification(config)
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(default_tokenizer_path()), num_labels=num_labels
            )
        self.lr = lr
        self.tokens = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.tokens += int(batch["attention_mask"].sum())
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        n = batch["input_ids"].shape[0]
        self.log_dict({"val_loss": out.loss, "val_acc": acc}, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def run(args: argparse.Namespace, datamodule: pl.LightningDataModule, num_labels: int, **trainer_kwargs: Any) -> None:
    model = Classifier(num_labels, tiny=args.tiny)
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
    print(f"{model.tokens:,} real tokens in {seconds:.1f} s ({model.tokens / seconds:,.0f} real tokens/s); {metrics}")

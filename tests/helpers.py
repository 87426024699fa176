"""Shared test helpers: tiny models and synthetic tokenised samples (importable by spawned DDP workers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 64


def make_samples(n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 40, num_labels: int = 3) -> list[dict]:
    """Tokenised samples with long-tailed lengths, an `idx` key to trace them and a scalar label."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(10), 0.6, n).astype(int), min_len, max_len)
    return [
        {
            "input_ids": rng.integers(5, VOCAB, size=int(length)).tolist(),
            "labels": int(rng.integers(num_labels)),
            "idx": i,
        }
        for i, length in enumerate(lengths)
    ]


def tiny_bert_config(**kwargs: Any) -> BertConfig:
    defaults: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    defaults.update(kwargs)
    return BertConfig(**defaults)


class RecordingClassifier(pl.LightningModule):
    """A tiny BERT classifier that records the sample ids of every training batch it consumes."""

    def __init__(self, record_dir: str | None = None, lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = BertForSequenceClassification(tiny_bert_config())
        self.record_dir = record_dir
        self.lr = lr
        self.seen: list[list[int]] = []
        self.val_seen: list[int] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        inputs = {k: v for k, v in batch.items() if k != "idx"}
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["idx"].tolist())
        loss = self(batch).loss
        self.log("train_loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_seen.extend(batch["idx"].tolist())
        self.log("val_loss", self(batch).loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_fit_end(self) -> None:
        if self.record_dir is not None:
            path = Path(self.record_dir) / f"rank{self.global_rank}.json"
            path.write_text(json.dumps({"train": self.seen, "val": self.val_seen, "pid": os.getpid()}))


def cpu_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)

"""Shared test helpers: tiny models and synthetic tokenised samples (importable by spawned DDP workers)."""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification

T = TypeVar("T")

VOCAB = 64
# tiny configs as dicts (TransformerModule(config=...), YAML-style)
BERT_DICT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
GPT2_DICT: dict[str, Any] = {  # a 2-layer GPT-2 causal LM config, no dropout
    "model_type": "gpt2",
    "vocab_size": VOCAB,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def assert_same_batch(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two collated batches are the same: keys in the same order, tensors equal with the same dtype, the rest equal."""
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


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
    """A quiet one-device Trainer (no logger, checkpoints, bars or sanity steps); CPU unless ``accelerator`` says."""
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


def tiny_gpt2(**kwargs: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=16,
        n_layer=4,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg.update(kwargs)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def tiny_bert(num_hidden_layers: int = 4, **kwargs: Any) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_hidden_layers=num_hidden_layers, **kwargs))


class PlainTransformer(torch.nn.Module):
    """A plain PyTorch encoder classifier: token + position embeddings, a stack of TransformerEncoderLayer, a head."""

    def __init__(self, num_layers: int = 4, d_model: int = 16, num_labels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = torch.nn.Embedding(VOCAB, d_model)
        self.pos = torch.nn.Embedding(64, d_model)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(d_model, 2, 32, dropout=0.0, batch_first=True) for _ in range(num_layers)
        )
        self.head = torch.nn.Linear(d_model, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        pad = None if attention_mask is None else attention_mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return self.head(x[:, 0])


def batch_for(model: torch.nn.Module, seed: int = 0, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if type(model).__name__.startswith("GPT2"):
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    return out


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(model, PlainTransformer):
        return torch.nn.functional.cross_entropy(model(**batch), batch["labels"])
    return model(**batch).loss


def grads_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class ModelModule(pl.LightningModule):
    """Wraps any test model with a loss, SGD or AdamW, and an optional LambdaLR schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: str = "sgd",
        lr: float = 0.1,
        schedule: bool = False,
        record_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr
        self.schedule = schedule
        self.record_dir = record_dir

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "idx"}
        return loss_of(self.model, batch)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.record_dir is not None:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            torch.save(state, Path(self.record_dir) / f"params_rank{self.global_rank}.pt")


def assert_close_relative(
    actual: torch.Tensor | None, expected: torch.Tensor, rel: float, msg: str = "", atol: float = 1e-9
) -> None:
    """``max |actual - expected| <= rel * max |expected|``: a tolerance relative to the tensor's scale.

    Element-wise relative tolerances fail on entries that are near zero only by rounding; what matters for a gradient
    or a loss is the error against the tensor's magnitude.
    """
    assert actual is not None, f"{msg}: no value"
    scale = float(expected.detach().abs().max()) or 1.0
    error = float((actual.detach().float() - expected.detach().float()).abs().max())
    assert error <= rel * scale + atol, f"{msg}: max error {error:.3g} > {rel:g} x {scale:.3g}"


def as_dataset(samples: Sequence[T]) -> Dataset[T]:
    """A list as a map-style dataset: what ``DataLoader`` takes at runtime (its annotation asks for a ``Dataset``)."""
    return cast("Dataset[T]", samples)


def one_loader(loaders: DataLoader | list[DataLoader]) -> DataLoader:
    """The loader of a ``*_dataloader()`` hook that may return a list (``val_dataloader``), asserting it is one."""
    assert isinstance(loaders, DataLoader), f"expected one DataLoader, got {loaders!r}"
    return loaders


def prefixed(prefix: str) -> Callable[[str], str]:
    """A ``torch.testing.assert_close`` message: ``prefix`` before the message it would give (a string replaces it)."""
    return lambda message: f"{prefix}: {message}"


def tensor_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(tensors)`` of at least one tensor, typed as a tensor (the builtin's start 0 types it ``Tensor | int``).

    The same additions in the same order as the builtin's: ``0 + t`` is ``t``.
    """
    return functools.reduce(operator.add, tensors)


def assert_same_gradients(
    model: torch.nn.Module, reference: torch.nn.Module, rel: float = 1e-5, atol: float = 1e-7
) -> None:
    """Every parameter with a reference gradient has the same gradient (relative to its scale, plus ``atol``)."""
    pairs = zip(model.named_parameters(), reference.parameters(), strict=True)
    checked = 0
    for (name, p), q in pairs:
        if q.grad is not None:
            assert_close_relative(p.grad, q.grad, rel, msg=name, atol=atol)
            checked += 1
    assert checked, "no gradients to compare"


@contextlib.contextmanager
def restoring_process_group() -> Iterator[None]:
    """Undo what an in-process ``strategy="ddp"`` (or FSDP) run leaves behind: the process group, and the
    rendezvous variables it sets in ``os.environ``."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)

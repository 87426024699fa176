"""The embedded default corpus: BSD fortune(6) texts with their category labels.

14,396 English texts in 40 categories with naturally long-tailed lengths (median 27 BERT tokens, max 512): the kind
of distribution where padding decides training speed. Licence: BSD (see ``corpus/NOTICE`` in the package).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import TypedDict

__all__ = ["FortuneRecord", "fortunes_path", "load_fortunes"]


class FortuneRecord(TypedDict):
    """One record of the corpus.

    Example:
        >>> record: FortuneRecord = load_fortunes(limit=1)[0]
        >>> sorted(record)
        ['label', 'text']
    """

    text: str
    label: str


def fortunes_path() -> Path:
    """Path of the packaged ``fortunes.jsonl.gz`` file.

    Example:
        >>> fortunes_path().name
        'fortunes.jsonl.gz'
    """
    return Path(str(resources.files("lightning_txopt.data") / "corpus" / "fortunes.jsonl.gz"))


def load_fortunes(limit: int | None = None) -> list[FortuneRecord]:
    """Load the embedded corpus.

    Args:
        limit: Return only the first ``limit`` records (for quick runs). ``None`` returns all 14,396.

    Returns:
        A list of ``{"text": str, "label": str}`` records, in file order.

    Raises:
        ValueError: If ``limit`` is negative.

    Example:
        >>> records = load_fortunes()
        >>> len(records), len({r["label"] for r in records})
        (14396, 40)
        >>> sorted(load_fortunes(limit=1)[0])
        ['label', 'text']
    """
    if limit is not None and limit < 0:
        raise ValueError(f"`limit` must be >= 0 or None, got {limit!r}.")
    records: list[FortuneRecord] = []
    with gzip.open(fortunes_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                obj = json.loads(line)
                records.append(FortuneRecord(text=obj["text"], label=obj["label"]))
    return records

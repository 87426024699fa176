from __future__ import annotations

import json

import pytest

from lightning_txopt.data.text import TextDataModule, read_records


class Chars:
    """A tokenizer stand-in: one id per character, with a pad token."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}


def test_read_records_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "a"}\n\n{"text": "yy", "label": "b"}\n')
    assert [r["text"] for r in read_records(tmp_path / "a.jsonl")] == ["x", "yy"]
    (tmp_path / "b.tsv").write_text("text\tlabel\nhello\ta\n")
    assert read_records(tmp_path / "b.tsv") == [{"text": "hello", "label": "a"}]
    with pytest.raises(FileNotFoundError, match="No such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match="Unknown data file type"):
        read_records(tmp_path / "c.txt")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(tmp_path / "d.jsonl")


def test_text_datamodule_classification_and_causal(tmp_path):
    rows = [{"text": "word " * (i % 7 + 1), "label": "ab"[i % 2]} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = TextDataModule(str(path), Chars(), batch_size=4, max_length=64, val_fraction=0.2)
    dm.setup("fit")
    assert dm.num_labels == 2 and len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 6
    lm = TextDataModule(str(path), Chars(), task="causal-lm", strategy="packed", max_tokens=64, max_length=32)
    assert lm.causal and lm.num_labels == 0
    lm.setup("fit")
    batch = next(iter(lm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(val_fraction=1.0), ValueError, "val_fraction"),
        (dict(task="translation"), ValueError, "task"),
        (dict(limit=0), ValueError, "limit"),
        (dict(text_column="body"), ValueError, "No text column 'body'"),
        (dict(label_column="topic"), ValueError, "No label column 'topic'"),
        (dict(tokenizer="/no/such/folder"), FileNotFoundError, "Could not load a tokenizer"),
    ],
)
def test_text_datamodule_errors(kwargs, error, match):
    kwargs.setdefault("tokenizer", Chars())
    with pytest.raises(error, match=match):
        TextDataModule(None, batch_size=4, **kwargs)


def test_tokenizer_without_pad_token():
    class NoPad(Chars):
        pad_token_id = None

    with pytest.raises(ValueError, match="no pad token"):
        TextDataModule(None, NoPad(), batch_size=4)

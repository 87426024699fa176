from __future__ import annotations

import gzip
import json

import pytest

from lightning_txopt.data.text import TextDataModule, load_records, read_records


class Chars:
    """A tokenizer stand-in: one id per character, with a pad token."""

    pad_token_id: int | None = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_records_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "a"}\n\n{"text": "yy", "label": "b"}\n')
    assert [r["text"] for r in read_records(tmp_path / "a.jsonl")] == ["x", "yy"]
    (tmp_path / "b.tsv").write_text("text\tlabel\nhello\ta\n")
    assert read_records(tmp_path / "b.tsv") == [{"text": "hello", "label": "a"}]
    with pytest.raises(FileNotFoundError, match=r"No such file or folder: '.*missing\.jsonl'"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"Unknown data file type 'c\.txt'"):
        read_records(tmp_path / "c.txt")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl', line 2: not a JSON object"):
        read_records(tmp_path / "d.jsonl")


def test_read_records_gzip_bom_json_array_and_csv_lines(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"text": "zipped"}\n')
    assert read_records(tmp_path / "a.jsonl.gz") == [{"text": "zipped"}]
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nhi,a\n".encode())
    assert read_records(tmp_path / "bom.csv") == [{"text": "hi", "label": "a"}]  # no '\ufefftext' column
    (tmp_path / "arr.json").write_text('[{"text": "a"}, {"text": "b"}]')
    assert [r["text"] for r in read_records(tmp_path / "arr.json")] == ["a", "b"]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_records(tmp_path / "bad.jsonl.gz")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("latin1.csv", "text\ncaf\xe9\nok\n".encode("latin-1"), r"latin1.csv', line 2: not UTF-8 text \(byte 0xe9\)"),
        ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', r"list.jsonl', line 2: a JSON list, not an object"),
        ("num.json", b'[{"text": "a"}, 3]', r"num.json', item 1 of the array: a JSON int"),
    ],
)
def test_read_records_names_the_bad_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_records(tmp_path / name)


def test_load_records_accepts_the_corpus_and_good_files(tmp_path):
    assert len(load_records(None, label_column="label")) == 14396
    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a b", "label": 1}, {"text": "c", "label": "x"}])
    assert len(load_records(path, label_column="label")) == 2


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "ok"}, {"text": None}], r"ok.jsonl', line 2: the text \('text'\) is null"),
        ([{"text": "ok"}, {"text": 42}], r"line 2: the text \('text'\) is 42, a int, not a string"),
        ([{"text": "ok"}, {"text": ""}], r"line 2: the text \('text'\) is empty \(''\)"),
        ([{"text": "ok"}, {"text": "  \n"}], r"line 2: the text \('text'\) is empty"),
        ([{"text": "ok"}, {"body": "x"}], r"line 2: no column 'text' \(the record has \['body'\]\)"),
        ([{"body": "x"}], r"No text column 'text' in '.*ok.jsonl' \(its columns: \['body'\]\)"),
        ([{"text": "ok", "label": "a"}, {"text": "b", "label": None}], r"line 2: the label \('label'\) is None"),
        ([{"text": "ok", "label": "a"}, {"text": "b"}], r"line 2: no label column 'label'"),
        ([{"text": "ok", "label": "a"}, {"text": "b", "label": [1]}], r"line 2: the label \('label'\) is a list"),
        ([{"text": "ok"}], r"No label column 'label' in .*task='causal-lm'"),
    ],
)
def test_load_records_names_file_and_line(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "ok.jsonl", rows)
    labelled = "label" in rows[0] or "causal" in match
    with pytest.raises(ValueError, match=match):
        load_records(path, label_column="label" if labelled else None)


def test_load_records_counts_physical_lines_and_csv_lines(tmp_path):
    (tmp_path / "gaps.jsonl").write_text('{"text": "a"}\n\n\n{"text": null}\n')
    with pytest.raises(ValueError, match="line 4"):
        load_records(tmp_path / "gaps.jsonl")
    (tmp_path / "d.csv").write_text('text,label\n"two\nlines",a\n,b\n')
    with pytest.raises(ValueError, match=r"d.csv', line 4: the text \('text'\) is empty"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "short.csv").write_text("label,text\na,hello\nb\n")  # a row with fewer fields than the header
    with pytest.raises(ValueError, match=r"line 3: the text \('text'\) is null \(or missing\)"):
        load_records(tmp_path / "short.csv")
    with pytest.raises(ValueError, match="holds no records"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="No such file"):
        load_records(tmp_path / "missing.csv")


def test_text_datamodule_classification_and_causal(tmp_path):
    rows = [{"text": "word " * (i % 7 + 1), "label": "ab"[i % 2]} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = TextDataModule(str(path), Chars(), batch_size=4, max_length=64, val_fraction=0.2)
    dm.setup("fit")
    assert dm.num_labels == 2 and len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 6
    lm = TextDataModule(str(path), Chars(), task="causal-lm", strategy="packed", max_tokens=64, max_length=32)
    assert lm.causal and lm.num_labels == 0
    lm.setup("fit")
    batch = next(iter(lm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape


def test_causal_lm_needs_no_label_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some words"}, {"text": "more words here"}])
    dm = TextDataModule(str(path), Chars(), task="causal-lm", batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(val_fraction=1.0), ValueError, "val_fraction"),
        (dict(task="translation"), ValueError, "task"),
        (dict(limit=0), ValueError, "`limit` must be a positive integer"),
        (dict(max_length=0), ValueError, "`max_length` must be a positive integer"),
        (dict(batch_size=0), ValueError, "`batch_size` must be a positive integer or None, got 0"),
        (dict(batch_size=None, max_tokens=0), ValueError, "`max_tokens` must be a positive integer or None, got 0"),
        (dict(batch_size=None, max_tokens=2.5), ValueError, "`max_tokens` must be a positive integer"),
        (dict(batch_size=True), ValueError, "`batch_size` must be a positive integer"),
        (dict(text_column="body"), ValueError, "No text column 'body'"),
        (dict(label_column="topic"), ValueError, "No label column 'topic'"),
        (dict(limit=1, val_fraction=0.9), ValueError, "1 record.* leave no training sample"),
        (dict(tokenizer="/no/such/folder"), FileNotFoundError, "Could not load a tokenizer"),
    ],
)
def test_text_datamodule_errors(kwargs, error, match):
    kwargs.setdefault("tokenizer", Chars())
    kwargs.setdefault("batch_size", 4)
    with pytest.raises(error, match=match):
        TextDataModule(None, **kwargs)


def test_text_datamodule_checks_records_before_tokenising(tmp_path):
    class NoCalls(Chars):
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenised before the records were checked")

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, {"text": 7, "label": "b"}])
    with pytest.raises(ValueError, match=r"d.jsonl', line 2: the text \('text'\) is 7"):
        TextDataModule(str(path), NoCalls(), batch_size=2)


def test_text_the_tokenizer_drops_is_named(tmp_path):
    class DropsZ(Chars):
        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[] if t == "zzz" else [1, 2] for t in texts]}

    rows = [{"text": "fine", "label": "a"}, {"text": "ok", "label": "b"}, {"text": "zzz", "label": "a"}]
    dm = TextDataModule(str(write_jsonl(tmp_path / "d.jsonl", rows)), DropsZ(), batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"d.jsonl', line 3: the tokenizer gives no tokens for the text 'zzz'"):
        dm.setup("fit")


def test_tokenizer_without_pad_token():
    class NoPad(Chars):
        pad_token_id = None
        eos_token_id = 50256

    with pytest.raises(ValueError, match=r"no pad token.*--data\.pad_token_id ID\); its eos token id is 50256"):
        TextDataModule(None, NoPad(), batch_size=4)
    assert TextDataModule(None, NoPad(), batch_size=4, pad_token_id=50256).pad_token_id == 50256

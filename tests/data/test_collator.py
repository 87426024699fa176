from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_txopt.data.collator import PaddingCollator, pad_sequences, padded_widths


def _samples():
    return [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": 2, "weight": 0.5},
        {"input_ids": np.array([8]), "token_type_ids": [0], "labels": 0, "weight": 1.5},
    ]


def test_pads_every_per_token_key_and_stacks_scalars():
    batch = PaddingCollator(pad_token_id=1)(_samples())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]
    assert batch["weight"].dtype == torch.float64 and batch["weight"].tolist() == [0.5, 1.5]
    assert batch["input_ids"].dtype == torch.int64


def test_token_labels_padded_with_label_pad_id_and_left_padding():
    samples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=0, padding_side="left", label_pad_token_id=-7)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-7, -7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_given_attention_mask_is_padded_not_replaced():
    samples = [{"input_ids": [5, 6], "attention_mask": [1, 0]}, {"input_ids": [8], "attention_mask": [1]}]
    assert PaddingCollator(0)(samples)["attention_mask"].tolist() == [[1, 0], [1, 0]]


def test_fixed_padding_and_multiple_of():
    assert PaddingCollator(0, padding="max_length", max_length=8)(_samples())["input_ids"].shape == (2, 8)
    assert PaddingCollator(0, pad_to_multiple_of=4)(_samples())["input_ids"].shape == (2, 4)
    assert PaddingCollator(0, pad_to_multiple_of=4, max_length=8)(_samples())["input_ids"].shape == (2, 4)


def test_tensors_in_samples():
    samples = [
        {"input_ids": torch.tensor([3, 4]), "labels": torch.tensor(1)},
        {"input_ids": torch.tensor([5]), "labels": torch.tensor(0)},
    ]
    batch = PaddingCollator(0)(samples)
    assert batch["input_ids"].tolist() == [[3, 4], [5, 0]] and batch["labels"].tolist() == [1, 0]


def test_too_long_is_an_error_or_truncated():
    with pytest.raises(ValueError, match="Sample 0 of the batch has 3 tokens > max_length=2"):
        PaddingCollator(0, max_length=2)(_samples())
    batch = PaddingCollator(0, max_length=2, truncation=True)(_samples())
    assert batch["input_ids"].tolist() == [[5, 6], [8, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pad_token_id=None), "pad_token_id"),
        (dict(pad_token_id=0, padding="do_not_pad"), "padding"),
        (dict(pad_token_id=0, padding="max_length"), "needs `max_length`"),
        (dict(pad_token_id=0, padding_side="middle"), "padding_side"),
        (dict(pad_token_id=0, max_length=0), "max_length"),
        (dict(pad_token_id=0, pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(pad_token_id=0, max_length=10, pad_to_multiple_of=8), "not a multiple"),
        (dict(pad_token_id=0, truncation=True), "truncation=True needs"),
        (dict(pad_token_id=0, pad_to_lengths=[]), "pad_to_lengths"),
        (dict(pad_token_id=0, pad_to_lengths=[64, 32]), "strictly increasing"),
        (dict(pad_token_id=0, pad_to_lengths=[0, 8]), "positive"),
        (dict(pad_token_id=0, pad_to_lengths=[12, 24], pad_to_multiple_of=8), "multiple of pad_to_multiple_of=8"),
        (dict(pad_token_id=0, pad_to_lengths=[64, 128], max_length=100), "exceeds max_length=100"),
        (dict(pad_token_id=0, pad_to_lengths=[64], padding="max_length", max_length=64), "padding='longest'"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaddingCollator(**kwargs)


def test_keys_it_cannot_pad_are_errors():
    with pytest.raises(TypeError, match="'text'"):
        PaddingCollator(0)([{"input_ids": [1], "text": "a"}, {"input_ids": [2], "text": "b"}])
    with pytest.raises(ValueError, match="Cannot pad key 'spans'"):
        PaddingCollator(0)([{"input_ids": [1, 2], "spans": [1, 2, 3]}, {"input_ids": [2], "spans": [1]}])
    with pytest.raises(KeyError, match="input_ids"):
        PaddingCollator(0)([{"ids": [1]}])
    with pytest.raises(ValueError, match="empty"):
        PaddingCollator(0)([])
    with pytest.raises(TypeError, match="mappings"):
        PaddingCollator(0)([[1, 2]])  # type: ignore[list-item]


def test_pad_sequences_matches_a_python_reference():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 9, rng.integers(0, 7)) for _ in range(20)]
    for side in ("right", "left"):
        out = pad_sequences(seqs, 8, -1, side=side)
        for row, seq in zip(out, seqs, strict=True):
            pad = [-1] * (8 - len(seq))
            assert row.tolist() == (seq.tolist() + pad if side == "right" else pad + seq.tolist())


def test_ladder_pads_each_batch_to_the_smallest_rung_that_holds_it():
    collate = PaddingCollator(0, pad_to_lengths=(4, 8, 16))
    widths = [collate([{"input_ids": [1] * n}, {"input_ids": [1, 2]}])["input_ids"].shape[1] for n in (1, 4, 5, 16, 17)]
    assert widths == [4, 4, 8, 16, 17]  # above the top rung: the batch keeps its own width
    batch = collate([{"input_ids": [5, 6, 7, 8, 9]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


@given(
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=50),
    rungs=st.lists(st.integers(1, 32), min_size=1, max_size=5, unique=True),
    multiple=st.sampled_from([None, 1, 8]),
)
def test_padded_widths_matches_a_python_reference(lengths, rungs, multiple):
    ladder = sorted(r * (multiple or 1) * 8 for r in set(rungs))
    ladder = sorted(set(ladder))
    expected = []
    for n in lengths:
        w = next((r for r in ladder if r >= n), n)
        if multiple:
            w = -(-w // multiple) * multiple
        expected.append(w)
    assert padded_widths(lengths, pad_to_multiple_of=multiple, pad_to_lengths=ladder).tolist() == expected
    collate = PaddingCollator(0, pad_to_multiple_of=multiple, pad_to_lengths=ladder)
    batch = collate([{"input_ids": [1] * n} for n in lengths])
    assert batch["input_ids"].shape[1] == max(expected)  # padding is monotone: a batch's width is its widest sample's

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt.data.collator import PaddingCollator
from lightning_txopt.data.flat import FlatSamples, SampleBatch, as_sample_batch, concatenated
from lightning_txopt.data.packing import PackingCollator
from tests.helpers import assert_same_batch


def _samples(lengths, *, token_labels=False, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, 50, n)
        sample = {"input_ids": ids.tolist() if i % 2 else ids, "token_type_ids": rng.integers(0, 2, n).tolist()}
        sample["labels"] = ids.tolist() if token_labels else int(rng.integers(0, 3))
        sample["weight"] = float(i) / 2
        out.append(sample)
    return out


def test_columns_classify_per_token_per_sample_and_mismatched_keys():
    samples = [
        {"input_ids": [5, 6, 7], "tags": [1, 2, 3], "labels": 1, "span": [0, 2], "ragged": [1]},
        {"input_ids": [8], "tags": [4], "labels": 0, "span": [0, 0], "ragged": [1, 2]},
    ]
    batch = SampleBatch.from_samples(samples)
    assert batch.keys == ("input_ids", "tags", "labels", "span", "ragged")
    assert batch.lengths.tolist() == [3, 1]
    assert batch.tokens["input_ids"].tolist() == [5, 6, 7, 8] and batch.tokens["tags"].tolist() == [1, 2, 3, 4]
    assert batch.values["labels"].tolist() == [1, 0] and batch.values["span"].tolist() == [[0, 2], [0, 0]]
    assert batch.mismatched == ("ragged",)
    assert batch.starts.tolist() == [0, 3]


def test_an_empty_sample_does_not_change_the_dtype():
    batch = SampleBatch.from_samples([{"input_ids": []}, {"input_ids": np.array([3], dtype=np.int32)}])
    assert batch.tokens["input_ids"].dtype == np.int32
    assert concatenated([]).dtype == np.int64 and concatenated([np.array([])]).size == 0


def test_columns_are_also_a_sequence_of_the_samples():
    batch = SampleBatch.from_samples([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}])
    assert len(batch) == 2
    assert [s["input_ids"].tolist() for s in batch] == [[5, 6], [7]]
    assert batch[-1]["labels"] == 0
    with pytest.raises(IndexError, match="Sample 2 of a batch of 2"):
        batch[2]


def test_from_samples_refuses_what_cannot_be_collated():
    with pytest.raises(ValueError, match="empty list"):
        SampleBatch.from_samples([])
    with pytest.raises(TypeError, match="expect mappings"):
        SampleBatch.from_samples([[1, 2]])  # type: ignore[list-item]
    with pytest.raises(KeyError, match="Tokenise them first"):
        SampleBatch.from_samples([{"text": "a"}])
    with pytest.raises(ValueError, match="must be one-dimensional"):
        SampleBatch.from_samples([{"input_ids": [[1, 2]]}])
    with pytest.raises(TypeError, match="only numbers can be padded"):
        SampleBatch.from_samples([{"input_ids": ["a", "b"]}])
    with pytest.raises(TypeError, match="Sample 0: 'tags' holds <U1 values"):
        SampleBatch.from_samples([{"input_ids": [1, 2], "tags": ["a", "b"]}])
    with pytest.raises(TypeError, match="Cannot collate key 'text'"):
        SampleBatch.from_samples([{"input_ids": [1], "text": "a"}])


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=20),
    data=st.data(),
)
def test_take_gives_the_columns_of_the_chosen_samples(lengths, data):
    samples = _samples(lengths, token_labels=True)
    indices = data.draw(st.lists(st.integers(0, len(samples) - 1), min_size=1, max_size=25))
    taken = SampleBatch.from_samples(samples).take(indices)
    reference = SampleBatch.from_samples([samples[i] for i in indices])
    assert taken.keys == reference.keys and taken.lengths.tolist() == reference.lengths.tolist()
    for name in reference.tokens:
        np.testing.assert_array_equal(taken.tokens[name], reference.tokens[name])
    for name in reference.values:
        np.testing.assert_array_equal(taken.values[name], reference.values[name])
    cut = data.draw(st.integers(1, 12))
    truncated = SampleBatch.from_samples(samples).truncated(cut)
    by_hand = [
        {k: (v[:cut] if k in ("input_ids", "token_type_ids", "labels") else v) for k, v in s.items()} for s in samples
    ]
    np.testing.assert_array_equal(truncated.tokens["labels"], SampleBatch.from_samples(by_hand).tokens["labels"])
    assert truncated.lengths.tolist() == [min(n, cut) for n in lengths]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=20),
    side=st.sampled_from(["right", "left"]),
    multiple=st.sampled_from([None, 4]),
    token_labels=st.booleans(),
    data=st.data(),
)
def test_padding_columns_give_the_list_s_batch(lengths, side, multiple, token_labels, data):
    samples = _samples(lengths, token_labels=token_labels)
    indices = data.draw(st.lists(st.integers(0, len(samples) - 1), min_size=1, max_size=10))
    collate = PaddingCollator(0, padding_side=side, pad_to_multiple_of=multiple, max_length=8, truncation=True)
    assert_same_batch(collate(FlatSamples(samples).__getitems__(indices)), collate([samples[i] for i in indices]))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=20),
    static=st.booleans(),
    causal=st.booleans(),
    data=st.data(),
)
def test_packing_columns_give_the_list_s_batch(lengths, static, causal, data):
    samples = _samples(lengths, token_labels=causal)
    indices = data.draw(st.lists(st.integers(0, len(samples) - 1), min_size=1, max_size=8, unique=True))
    shape: dict[str, Any] = {"rows": 8, "num_slots": 8} if static else {}
    collate = PackingCollator(8, causal=causal, **shape)
    flat = FlatSamples(samples, with_index=True)
    assert_same_batch(collate(flat.__getitems__(indices)), collate([flat[i] for i in indices]))


def test_flat_samples_keep_the_samples_and_add_the_index():
    samples = [{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}]
    flat = FlatSamples(samples, with_index=True)
    assert len(flat) == 2 and flat[0] == {"input_ids": [5, 6], "labels": 1, "index": 0}
    batch = flat.__getitems__([1, 0])
    assert batch.keys == ("input_ids", "labels", "index") and batch.values["index"].tolist() == [1, 0]
    assert FlatSamples(samples)[0] is samples[0]


def test_flat_samples_refuse_samples_that_do_not_fit_columns():
    with pytest.raises(ValueError, match=r"Key\(s\) \['ragged'\] are neither"):
        FlatSamples([{"input_ids": [5], "ragged": [1]}, {"input_ids": [6, 7], "ragged": [1, 2, 3]}])
    with pytest.raises(ValueError, match="Not every sample is a mapping with the keys"):
        FlatSamples([{"input_ids": [5], "labels": 1}, {"input_ids": [6]}])
    with pytest.raises(ValueError, match="Key 'span' holds 2 values per sample"):
        FlatSamples([{"input_ids": [5, 6], "span": [0, 1]}, {"input_ids": [6, 7, 8], "span": [0, 2]}])
    with pytest.raises(KeyError, match="Tokenise them first"):
        FlatSamples([{"text": "a"}])


def test_columns_built_for_another_input_key_are_refused():
    batch = FlatSamples([{"ids": [5, 6]}], input_key="ids").__getitems__([0])
    with pytest.raises(ValueError, match="input_key='ids', the collator reads 'input_ids'"):
        as_sample_batch(batch, "input_ids")
    assert PaddingCollator(0, input_key="ids")(batch)["ids"].tolist() == [[5, 6]]


def test_a_collator_given_mismatched_columns_says_what_is_wrong():
    batch = SampleBatch.from_samples([{"input_ids": [5], "spans": [1, 2]}, {"input_ids": [6], "spans": [1]}])
    with pytest.raises(ValueError, match="Cannot pad key 'spans'"):
        PaddingCollator(0)(batch)
    with pytest.raises(ValueError, match="Cannot pack key 'spans'"):
        PackingCollator(4)(batch)

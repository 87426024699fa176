from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt.data import BucketBatchSampler, BucketDataModule
from lightning_txopt.data.packing import PackingCollator, is_packed
from lightning_txopt.data.planning import next_fit_rows
from tests.helpers import make_samples, one_loader


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=200),
    pack=st.integers(64, 128),
    rows=st.integers(1, 4),
    world=st.integers(1, 3),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 3),
)
def test_packing_plan_properties(lengths, pack, rows, world, seed, epoch):
    if len(lengths) < world:
        return
    lengths = np.asarray(lengths)
    per_rank = []
    for rank in range(world):
        sampler = BucketBatchSampler(
            lengths, max_tokens=pack * rows, pack_length=pack, seed=seed, num_replicas=world, rank=rank
        )
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    assert len({len(b) for b in per_rank}) == 1  # equal counts
    flat = sorted(i for r in per_rank for b in r for i in b)
    repeated = (
        BucketBatchSampler(lengths, max_tokens=pack * rows, pack_length=pack, seed=seed, num_replicas=world, rank=0)
        .plan(epoch)
        .repeated.tolist()
    )
    assert flat == sorted(list(range(len(lengths))) + repeated)  # every sample once (repeats: see the sampler)
    assert len(repeated) < world
    collate = PackingCollator(pack, rows=rows, num_slots=pack * rows)
    for batches in per_rank:
        for b in batches:
            row_of = next_fit_rows(lengths[b], pack)
            assert max(row_of) + 1 <= rows  # the collator rebuilds at most `rows` rows...
            assert np.bincount(row_of, weights=lengths[b]).max() <= pack  # ...of at most `pack` tokens
            batch = collate([{"input_ids": np.arange(1, n + 1)} for n in lengths[b]])
            assert batch["input_ids"].shape == (rows, pack)  # static shapes hold for every planned batch


def _reference_rows(samples: list[list[int]], width: int) -> list[list[list[int]]]:
    """Lay samples into rows by next fit with plain Python: ids, positions, segment lengths (samples, then pad)."""
    rows: list[list[list[int]]] = []
    cur: list[list[int]] = []
    for s in samples:
        if cur and sum(map(len, cur)) + len(s) > width:
            rows.append(cur)
            cur = []
        cur.append(s)
    rows.append(cur)
    return rows


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 12), min_size=1, max_size=20),
    width=st.integers(12, 30),
    static=st.booleans(),
    causal=st.booleans(),
)
def test_collator_layout_matches_a_plain_python_reference(lens, width, static, causal):
    samples = [list(range(10 * i + 1, 10 * i + 1 + n)) for i, n in enumerate(lens)]
    ref_rows = _reference_rows(samples, width)
    rows_needed = len(ref_rows)
    kwargs: dict[str, Any] = dict(rows=rows_needed + 1, num_slots=len(samples) + 3) if static else {}
    batch = PackingCollator(width, causal=causal, **kwargs)(
        [{"input_ids": s, "labels": s, "idx": i} for i, s in enumerate(samples)]
    )
    n_rows = rows_needed + 1 if static else rows_needed
    w = width if static else max(sum(map(len, r)) for r in ref_rows)
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape == (n_rows, w)
    seg_lens, k = [], 0
    for r in range(n_rows):
        row = ref_rows[r] if r < rows_needed else []
        ids = [t for s in row for t in s]
        pad = w - len(ids)
        assert batch["input_ids"][r].tolist() == ids + [0] * pad
        assert batch["position_ids"][r].tolist() == [p for s in row for p in range(len(s))] + [0] * pad
        labels = [(-100 if (causal and j == 0) else t) for s in row for j, t in enumerate(s)] + [-100] * pad
        assert batch["labels"][r].tolist() == labels
        col = 0
        for s in row:
            assert batch["cls_index"][k].tolist() == [r, col] and batch["last_index"][k].tolist() == [
                r,
                col + len(s) - 1,
            ]
            col += len(s)
            k += 1
        seg_lens += [len(s) for s in row] + [pad]  # each row: its samples, then its (maybe empty) padding run
    cu = np.concatenate([[0], np.cumsum(seg_lens)])
    n_seg = len(samples) + n_rows
    expected_cu = np.concatenate([cu, np.full(len(samples) + 3 + n_rows - n_seg, cu[-1])]) if static else cu
    assert batch["cu_seq_lens_q"].tolist() == expected_cu.tolist() == batch["cu_seq_lens_k"].tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == (w if static else max(seg_lens))
    real = np.concatenate([[0], np.cumsum(lens)])
    assert batch["cu_seq_lens"].tolist()[: len(lens) + 1] == real.tolist()
    assert batch["idx"].tolist()[: len(lens)] == list(range(len(lens)))
    if static:  # filler slots: index -1 for "index"-like keys is not used here; numbers fill with 0
        assert batch["idx"].shape == (len(samples) + 3,)
    assert is_packed(batch) and "attention_mask" not in batch  # the boundaries say it; no mask to misuse


def test_collator_scalar_labels_static_slots_and_index_fill():
    batch = PackingCollator(8, rows=2, num_slots=4)(
        [{"input_ids": [5, 6, 7], "labels": 1, "index": 7}, {"input_ids": [8, 9], "labels": 0, "index": 3}]
    )
    assert batch["labels"].tolist() == [1, 0, -100, -100]  # filler slots are ignored by the loss
    assert batch["index"].tolist() == [7, 3, -1, -1]  # and by restore_order
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 5, 5]


def test_collator_errors():
    with pytest.raises(ValueError, match="pack_length"):
        PackingCollator(0)
    with pytest.raises(ValueError, match="needs `pack_length`"):
        PackingCollator(None, rows=2, num_slots=2)
    with pytest.raises(ValueError, match="both `rows` and `num_slots`"):
        PackingCollator(8, rows=2)
    with pytest.raises(ValueError, match="no tokens"):
        PackingCollator(4)([{"input_ids": []}])
    with pytest.raises(ValueError, match="Cannot pack labels"):
        PackingCollator(8)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="fits no row"):
        PackingCollator(4)([{"input_ids": [1, 2, 3, 4, 5]}])
    with pytest.raises(ValueError, match="does not fit the static shape"):
        PackingCollator(4, rows=1, num_slots=8)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    with pytest.raises(TypeError, match="holds str"):
        PackingCollator(8)([{"input_ids": [1, 2], "text": "a"}])


def test_datamodule_packed_rows_default_width_and_static_shapes():
    samples = make_samples(200, seed=2)
    dm = BucketDataModule(samples, samples[:30], pad_token_id=0, strategy="packed", max_tokens=128)
    dm.setup("fit")
    assert dm.pack_length == 128  # the 512 default, capped by the budget: one row per batch
    seen, total = [], 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 128
        seen.extend(batch["idx"].tolist())
        total += int(batch["cu_seq_lens"][-1])
    assert sorted(seen) == list(range(200)) and total == dm.lengths("train").sum()
    static = BucketDataModule(
        samples, samples[:30], pad_token_id=0, strategy="packed", max_tokens=128, max_length=64, static_shapes=True
    )
    static.setup("fit")
    shapes = {
        (k, tuple(v.shape)) for b in static.train_dataloader() for k, v in b.items() if isinstance(v, torch.Tensor)
    }
    assert len(shapes) == len({k for k, _ in shapes})  # one shape per key over the whole epoch
    val = next(iter(one_loader(static.val_dataloader())))
    assert val["input_ids"].shape == (2, 64) and (val["index"][val["index"] >= 0]).numel() > 0


def test_static_slots_follow_the_dealt_plan_on_a_long_tailed_corpus():
    """The embedded corpus (many 3-10 token texts): every batch of two epochs fits the static shape, whose sample
    slots are sized by the dealt plan (mean plus the fullest row), far below a batch of only the shortest texts."""
    from pathlib import Path

    lengths = np.load(Path(__file__).parent / "fortune_lengths.npy")
    rng = np.random.default_rng(0)
    samples = [{"input_ids": rng.integers(5, 100, int(n)).tolist(), "labels": 0} for n in lengths]
    dm = BucketDataModule(
        samples, pad_token_id=0, strategy="packed", max_tokens=16384, max_length=512, static_shapes=True
    )
    dm.setup("fit")
    worst = int(np.searchsorted(np.cumsum(np.sort(lengths)), 16384, side="right"))
    collator = dm.collator
    assert isinstance(collator, PackingCollator) and collator.num_slots is not None
    assert collator.num_slots % 8 == 0 and collator.num_slots * 3 < worst
    shapes, seen = set(), 0
    for epoch in range(2):
        loader = dm.train_dataloader()
        sampler = loader.batch_sampler
        assert isinstance(sampler, BucketBatchSampler)
        sampler.set_epoch(epoch)
        for batch in loader:
            shapes.add(tuple((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor)))
            seen += int((batch["labels"] != -100).sum())
    assert len(shapes) == 1 and seen == 2 * lengths.size


def test_packed_settings_that_would_do_nothing_are_errors():
    with pytest.raises(ValueError, match="strategy='packed'"):
        BucketDataModule([], pad_token_id=0, strategy="packed", batch_size=4)
    with pytest.raises(ValueError, match="`causal` only applies to strategy='packed'"):
        BucketDataModule([], pad_token_id=0, batch_size=4, causal=True)
    with pytest.raises(ValueError, match="`static_shapes` only applies to strategy='packed'"):
        BucketDataModule([], pad_token_id=0, max_tokens=64, static_shapes=True)
    with pytest.raises(ValueError, match="`pool_size` only applies to strategy='bucket'"):
        BucketDataModule([], pad_token_id=0, max_tokens=64, strategy="dynamic", pool_size=8)


def test_rows_wider_than_the_position_table_run():
    """Padding has position 0: a row of 512 tokens runs on a model with 64 positions when every sample fits."""
    from lightning_txopt.module import TransformerModule
    from tests.helpers import BERT_DICT

    dm = BucketDataModule(make_samples(40, seed=7), pad_token_id=0, strategy="packed", max_tokens=512, max_length=512)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] > 64 and int(batch["position_ids"].max()) < 64
    TransformerModule(config=BERT_DICT, num_labels=3).loss_and_items(batch, "mean")


def test_truncation_applies_to_packed_batches():
    dm = BucketDataModule(
        [{"input_ids": list(range(1, 101))}],
        pad_token_id=0,
        strategy="packed",
        max_tokens=128,
        max_length=64,
        truncation=True,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (1, 64) and batch["input_ids"][0].tolist() == list(range(1, 65))

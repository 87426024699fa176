from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt.data import BucketBatchSampler, BucketDataModule
from lightning_txopt.data.packing import (
    PackingCollator,
    best_fit_decreasing,
    check_packing_support,
    next_fit_rows,
    packed_classification_logits,
)
from lightning_txopt.data.planning import plan_epoch
from lightning_txopt.data.report import padding_report
from lightning_txopt.module import TransformerModule
from tests.helpers import BERT_DICT, VOCAB, PlainTransformer, cpu_trainer, make_samples, tiny_bert, tiny_gpt2

FORTUNES = Path(__file__).parent / "fortune_lengths.npy"


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
    for batches in per_rank:
        for b in batches:
            row_of = next_fit_rows(lengths[b], pack)
            assert max(row_of) + 1 <= rows  # the collator rebuilds at most `rows` rows...
            assert np.bincount(row_of, weights=lengths[b]).max() <= pack  # ...of at most `pack` tokens


def test_bfd_rows_are_recovered_by_next_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500)
    order, offsets = best_fit_decreasing(lengths, np.arange(500), 128, rng)
    expected = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    assert next_fit_rows(lengths[order], 128) == expected.tolist()


def test_corpus_target_and_minimum_batches():
    lengths = np.load(FORTUNES)
    row = {r.strategy: r for r in padding_report(lengths, max_tokens=16384, max_length=512)}["packed"]
    assert row.efficiency >= 0.995
    assert row.batches <= 1.02 * math.ceil(lengths.sum() / 16384)
    plan = plan_epoch(lengths, max_tokens=16384, pack_length=512, seed=0)
    assert plan.num_batches == row.batches


def test_collator_layout_causal_labels_and_errors():
    samples = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [8, 9]},
        {"input_ids": [3, 4, 5, 6], "labels": [3, 4, 5, 6]},
    ]
    batch = PackingCollator(6, causal=True)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 5, 6, 0]]  # width: the longest row
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, 5, 6, -100]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 9] and int(batch["max_length"]) == 4
    mask = batch["attention_mask"][0, 0].int()
    assert mask[4].tolist() == [0, 0, 0, 1, 1]  # second sample's 2nd token: itself and its predecessor only
    assert mask[1].tolist() == [1, 1, 0, 0, 0]  # causal inside the first sample
    assert batch["attention_mask"][1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # a pad attends to itself only
    with pytest.raises(ValueError, match="pack_length"):
        PackingCollator(0)
    with pytest.raises(ValueError, match="no tokens"):
        PackingCollator(4)([{"input_ids": []}])
    with pytest.raises(ValueError, match="Cannot pack labels"):
        PackingCollator(8)([{"input_ids": [1, 2], "labels": [1]}])


def _samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (int(k),), generator=g) for k in torch.randint(2, 12, (n,), generator=g)]


def test_packed_bert_classification_equals_unpacked_per_sample():
    model = tiny_bert()
    model.eval()
    seqs = _samples()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = PackingCollator(24)([{"input_ids": s, "labels": int(y)} for s, y in zip(seqs, labels)])
    assert batch["input_ids"].shape[0] < len(seqs)  # really packed
    packed = packed_classification_logits(model, batch)
    alone = torch.cat([model(input_ids=s[None]).logits for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    # backward: the packed loss gradient equals the unpacked one
    ref = copy.deepcopy(model)
    F.cross_entropy(packed, labels).backward()
    F.cross_entropy(torch.cat([ref(input_ids=s[None]).logits for s in seqs]), labels).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_gpt2_causal_lm_equals_unpacked_per_sample():
    model = tiny_gpt2()
    model.eval()
    seqs = _samples(seed=1)
    batch = PackingCollator(24, causal=True)([{"input_ids": s, "labels": s} for s in seqs])
    module = TransformerModule(
        config={"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 16, "n_layer": 4, "n_head": 2, "n_positions": 64},
        task="causal-lm",
    )
    module.model = model
    loss_sum, items, logits = module.loss_and_items(batch, "sum")
    ref_sum = sum(F.cross_entropy(model(input_ids=s[None]).logits[0, :-1], s[1:], reduction="sum") for s in seqs)
    assert int(items) == sum(len(s) - 1 for s in seqs)
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-5, atol=1e-5)
    row_of = next_fit_rows([len(s) for s in seqs], 24)
    starts = batch["cls_index"][:, 1]
    for i, s in enumerate(seqs):  # logits of each sample equal its unpacked logits
        got = logits[row_of[i], starts[i] : starts[i] + len(s)]
        torch.testing.assert_close(got, model(input_ids=s[None]).logits[0], rtol=1e-5, atol=1e-5)


class _AbsolutePositions(torch.nn.Module):
    """A model whose positions ignore position_ids (cannot be packed)."""

    def __init__(self):
        super().__init__()
        self.inner = PlainTransformer()
        self.config = type("C", (), {"vocab_size": VOCAB})()

    @property
    def base_model(self):
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.inner.tok(input_ids) + self.inner.pos(torch.arange(input_ids.shape[1]))
        return type("O", (), {"last_hidden_state": self.inner.layers[0](x)})()


def test_models_that_cannot_pack_are_clear_errors():
    check_packing_support(tiny_bert(), causal=False)
    check_packing_support(tiny_gpt2(), causal=True)
    with pytest.raises(ValueError, match=r"mixes packed samples|cannot take packed input"):
        check_packing_support(_AbsolutePositions(), causal=False)
    with pytest.raises(ValueError, match="cannot take packed input"):
        check_packing_support(PlainTransformer(), causal=False)  # no position_ids argument, no hidden states


def test_datamodule_packed_fit_with_transformer_module():
    dm = BucketDataModule(
        make_samples(80, seed=2),
        make_samples(20, seed=3),
        pad_token_id=0,
        strategy="packed",
        max_tokens=128,
        max_length=64,
    )
    dm.setup("fit")
    lengths = dm.lengths("train")
    seen = []
    for batch in dm.train_dataloader():
        seen.extend(batch["idx"].tolist())  # per-sample keys pass through, one entry per sample
        assert batch["input_ids"].shape[0] <= 2 and batch["input_ids"].shape[1] <= 64
    assert sorted(seen) == list(range(80))
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = cpu_trainer(max_epochs=1)
    trainer.fit(module, datamodule=dm)
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    report = {r.strategy: r for r in dm.padding_report()}
    assert report["packed"].efficiency > report["bucket"].efficiency
    assert lengths.sum() == report["packed"].real_tokens


def test_packed_with_only_a_budget_is_one_row_per_batch():
    dm = BucketDataModule(make_samples(50, seed=4), pad_token_id=0, strategy="packed", max_tokens=128)
    dm.setup("fit")
    lengths = dm.lengths("train")
    total = 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 128  # one row, no padding
        assert batch["input_ids"].shape[1] == int(batch["cu_seq_lens"][-1])
        total += int(batch["cu_seq_lens"][-1])
    assert total == lengths.sum()
    assert PackingCollator()([{"input_ids": [1, 2]}, {"input_ids": [3]}])["input_ids"].tolist() == [[1, 2, 3]]


def test_packed_needs_budget_and_row_length():
    with pytest.raises(ValueError, match="strategy='packed'"):
        BucketDataModule([], pad_token_id=0, strategy="packed", batch_size=4)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_epoch(np.array([3, 4]), batch_size=2, pack_length=8)

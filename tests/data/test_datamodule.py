from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_txopt.data.datamodule import BucketDataModule, _ResumableDataLoader
from tests.helpers import RecordingClassifier, assert_same_batch, cpu_trainer, make_samples, one_loader


def _dm(**kwargs: Any) -> BucketDataModule:
    defaults: dict[str, Any] = dict(pad_token_id=0, max_tokens=160, seed=7)
    defaults.update(kwargs)
    return BucketDataModule(make_samples(120, seed=1), make_samples(30, seed=2), **defaults)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pad_token_id=0), "exactly one of"),
        (dict(pad_token_id=0, batch_size=2, strategy="sorted"), "strategy"),
        (dict(pad_token_id=0, batch_size=2, strategy="fixed"), "max_length"),
        (dict(batch_size=2), "pad_token_id"),
        (dict(pad_token_id=0, max_tokens=64, max_length=128), "max_length=128 > max_tokens=64"),
        (dict(pad_token_id=0, max_tokens=64, eval_batch_size=4), "eval_max_tokens"),
        (dict(pad_token_id=0, batch_size=4, eval_max_tokens=64), "eval_batch_size"),
        (dict(pad_token_id=0, batch_size=4, num_workers=-1), "num_workers"),
        (dict(pad_token_id=0, batch_size=4, persistent_workers=True), "persistent_workers"),
        (dict(pad_token_id=0, batch_size=4, pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(pad_token_id=0, batch_size=4, strategy="fixed", max_length=64, pad_to_lengths=[64]), "pad_to_lengths"),
        (dict(pad_token_id=0, batch_size=4, pad_to_lengths=[64, 32]), "strictly increasing"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketDataModule([], **kwargs)


def test_tokenizer_without_pad_token_is_a_clear_error():
    class Tok:
        pad_token_id = None

    with pytest.raises(ValueError, match="no pad token"):
        BucketDataModule([], tokenizer=Tok(), batch_size=2)


def test_pad_token_from_tokenizer():
    class Tok:
        pad_token_id = 3

    assert BucketDataModule([], tokenizer=Tok(), batch_size=2).pad_token_id == 3


def test_long_sample_is_an_error_unless_truncating():
    dm = BucketDataModule([{"input_ids": [1] * 30}], pad_token_id=0, batch_size=2, max_length=16)
    dm.setup("fit")
    with pytest.raises(ValueError, match="train sample 0 has 30 tokens > max_length=16"):
        dm.train_dataloader()
    dm = BucketDataModule([{"input_ids": [1] * 30}], pad_token_id=0, batch_size=2, max_length=16, truncation=True)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (1, 16)


@pytest.mark.parametrize("strategy", ["bucket", "dynamic", "fixed"])
def test_strategies_cover_every_sample_and_pad_as_promised(strategy):
    samples = make_samples(50, seed=3)
    dm = BucketDataModule(samples, samples[:10], pad_token_id=0, batch_size=8, strategy=strategy, max_length=48)
    dm.setup("fit")
    seen, padded = [], 0
    for batch in dm.train_dataloader():
        seen.extend(batch["idx"].tolist())
        width = batch["input_ids"].shape[1]
        longest = int(batch["attention_mask"].sum(1).max())
        assert width == (48 if strategy == "fixed" else longest)
        padded += batch["input_ids"].numel()
    assert sorted(seen) == list(range(50))
    report = {r.strategy: r for r in dm.padding_report()}
    assert padded == report[strategy].processed_tokens  # the report counts what the loader really pads
    assert sorted(i for b in one_loader(dm.val_dataloader()) for i in b["idx"].tolist()) == list(range(10))


def test_fit_through_trainer_and_batches_respect_budget():
    dm = _dm()
    model = RecordingClassifier()
    cpu_trainer(max_epochs=2).fit(model, datamodule=dm)
    lengths = dm.lengths("train")
    sampler = dm._train_sampler
    assert sampler is not None
    per_epoch = len(sampler)
    assert len(model.seen) == 2 * per_epoch
    for epoch in range(2):
        batches = model.seen[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(i for b in batches for i in b) == list(range(120))
        assert all(len(b) * lengths[b].max() <= 160 for b in batches)
    assert model.seen[:per_epoch] != model.seen[per_epoch:]  # new order each epoch


@pytest.mark.parametrize(
    "padding", [dict(pad_to_multiple_of=16), dict(pad_to_lengths=[16, 32, 64]), dict(pad_to_lengths=[8, 24])]
)
def test_token_budget_holds_for_padded_batches_with_rounding_and_ladders(padding):
    samples = make_samples(120, seed=1)
    dm = BucketDataModule(samples, pad_token_id=0, max_tokens=160, seed=7, **padding)
    dm.setup("fit")
    lengths = dm.lengths("train")
    seen, shapes, processed = [], set(), 0
    for batch in dm.train_dataloader():
        rows, width = batch["input_ids"].shape
        assert rows * width <= 160  # the budget counts padded tokens, rounding and rungs included
        longest = int(lengths[batch["idx"].numpy()].max())
        if "pad_to_lengths" in padding:
            rungs = padding["pad_to_lengths"]
            assert width == next((r for r in rungs if r >= longest), longest)
        else:
            assert width == -(-longest // 16) * 16
        seen.extend(batch["idx"].tolist())
        shapes.add((rows, width))
        processed += rows * width
    assert sorted(seen) == list(range(120))
    assert processed == {r.strategy: r for r in dm.padding_report()}["bucket"].processed_tokens
    if padding.get("pad_to_lengths") == [16, 32, 64]:  # lengths 4..40 here: two rungs, a few row counts each
        assert {w for _, w in shapes} <= {16, 32, 64}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_matches_uninterrupted_run(tmp_path, num_workers):
    # uninterrupted run: 3 epochs, a checkpoint after every 5 optimizer steps
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{epoch}-{step}")
    full = RecordingClassifier()
    trainer = cpu_trainer(max_epochs=3, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(full, datamodule=_dm(num_workers=num_workers))
    per_epoch = int(trainer.num_training_batches)
    assert per_epoch % 5 != 0  # so that some checkpoint falls in the middle of an epoch
    # resume from a mid-epoch checkpoint of the second epoch
    step = next(s for s in range(5, 3 * per_epoch, 5) if s > per_epoch and s % per_epoch)
    resumed = RecordingClassifier()
    cpu_trainer(max_epochs=3).fit(
        resumed, datamodule=_dm(num_workers=num_workers), ckpt_path=str(tmp_path / f"epoch=1-step={step}.ckpt")
    )
    assert resumed.seen == full.seen[step:]


def test_resume_from_end_of_epoch_checkpoint(tmp_path):
    full = RecordingClassifier()
    trainer = cpu_trainer(max_epochs=2, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(full, datamodule=_dm())
    first = RecordingClassifier()
    t1 = cpu_trainer(max_epochs=1, default_root_dir=tmp_path / "a", enable_checkpointing=True)
    t1.fit(first, datamodule=_dm())
    checkpoint = t1.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint)
    path = checkpoint.best_model_path
    second = RecordingClassifier()
    cpu_trainer(max_epochs=2).fit(second, datamodule=_dm(), ckpt_path=path)
    assert first.seen + second.seen == full.seen


def test_state_dict_roundtrip_without_trainer():
    dm = _dm()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, _ResumableDataLoader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()  # the one resume channel: the training loader's state (Lightning saves it)
    assert state["consumed"] == 2 and state["epoch"] == 0
    assert dm.state_dict() == {}  # the DataModule saves no second copy
    other = _dm()
    other.setup("fit")
    resumed = other.train_dataloader()
    assert isinstance(resumed, _ResumableDataLoader)
    resumed.load_state_dict(state)
    rest = [b["idx"].tolist() for b in resumed]
    assert rest == [b["idx"].tolist() for b in it]


def test_the_position_is_saved_once_in_a_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    cpu_trainer(max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(RecordingClassifier(), datamodule=_dm())
    saved = torch.load(tmp_path / "step=3.ckpt", weights_only=True)
    assert "BucketDataModule" not in saved  # no DataModule copy of the position...
    loop = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loop == [{"epoch": 0, "consumed": 3, "seed": 7, "num_replicas": 1}]  # ...only the loader's


class _Tokenised(BucketDataModule):
    """A subclass that builds its datasets in the documented hook."""

    def build_datasets(self, stage):
        return {"train": make_samples(40, seed=5), "val": make_samples(9, seed=6)}


def test_build_datasets_hook():
    dm = _Tokenised(pad_token_id=0, batch_size=4)
    dm.setup("fit")
    assert sum(len(b["idx"]) for b in dm.train_dataloader()) == 40
    assert sum(len(b["idx"]) for b in one_loader(dm.val_dataloader())) == 9
    with pytest.raises(ValueError, match="No 'test' dataset"):
        dm.test_dataloader()


@pytest.mark.ddp
def test_ddp_two_processes_equal_counts_and_coverage(tmp_path):
    model = RecordingClassifier(record_dir=str(tmp_path))
    trainer = cpu_trainer(max_epochs=2, devices=2, strategy="ddp_spawn")
    trainer.fit(model, datamodule=_dm())
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert records[0]["pid"] != records[1]["pid"]
    train = [r["train"] for r in records]
    assert len(train[0]) == len(train[1]) > 0  # equal batch counts: no hang, no straggler
    per_epoch = len(train[0]) // 2
    lengths = np.array([len(s["input_ids"]) for s in make_samples(120, seed=1)])
    for epoch in range(2):
        chunk = [b for t in train for b in t[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sorted(i for b in chunk for i in b) == list(range(120))  # ranks together: every sample once
        # batches of one step have similar padded cost
        costs = np.array(
            [[len(b) * lengths[b].max() for b in t[epoch * per_epoch : (epoch + 1) * per_epoch]] for t in train]
        )
        assert (costs.max(0) / costs.min(0)).mean() <= 1.25
    val = sorted(i for r in records for i in r["val"])
    assert val == sorted(list(range(30)) * 2)  # each validation sample once per epoch over both ranks


def test_probe_batches_hold_the_worst_shapes_of_the_epoch():
    """Against the training loader's own batches at that budget: the widest, the fullest, and for every weighting
    of padded tokens and the attention term (rows x width**2) a batch at least as costly as the loader's worst."""
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(2, 12, 300), rng.integers(40, 90, 40), rng.integers(150, 200, 6)])
    samples = [{"input_ids": [1] * int(n), "labels": int(n) % 2} for n in lengths]
    dm = BucketDataModule(samples, pad_token_id=0, max_tokens=1024, seed=0)
    dm.setup("fit")
    probes = [tuple(b["input_ids"].shape) for b in dm.probe_batches(1024)]
    loader = [tuple(b["input_ids"].shape) for b in dm.train_dataloader()]
    assert len(probes) == len(set(probes)) >= 3 and set(probes) <= set(loader)
    assert max(w for _, w in probes) == max(w for _, w in loader)
    assert max(r for r, _ in probes) == max(r for r, _ in loader)

    def cost(shape: tuple[int, ...], a: float) -> float:
        rows, width = shape
        return (1 - a) * rows * width / 1024 + a * rows * width**2 / (1024 * 200)

    for a in np.linspace(0, 1, 21):
        assert max(cost(s, a) for s in probes) >= max(cost(s, a) for s in loader) * (1 - 1e-12)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_packed_probe_batches_hold_the_most_rows_and_the_most_samples(static_shapes):
    """Packed: a step's memory follows its rows (and per-sample tensors), so the probes hold the loader's batch
    with the most rows and the one with the most samples (measured on an H200: 616 rows needed 0.2 GiB more than
    the 615 rows of the batch with the most samples)."""
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(2, 30, 400), rng.integers(60, 120, 60)])
    samples = [{"input_ids": [1] * int(n), "labels": int(n) % 2} for n in lengths]
    dm = BucketDataModule(
        samples, pad_token_id=0, strategy="packed", max_length=128, max_tokens=1024, static_shapes=static_shapes
    )
    dm.setup("fit")

    def shape(batch: dict[str, Any]) -> tuple[int, int]:  # (rows, samples); static shapes: rows are all equal
        return int(batch["input_ids"].shape[0]), int((batch["labels"] != -100).sum())

    probes = [shape(b) for b in dm.probe_batches(1024)]
    loader = [shape(b) for b in dm.train_dataloader()]
    assert max(r for r, _ in probes) == max(r for r, _ in loader)
    assert max(n for _, n in probes) == max(n for _, n in loader)


class _OwnDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def _batches(dm: BucketDataModule, split: str) -> list[dict]:
    loader = getattr(
        dm, {"train": "train_dataloader", "val": "val_dataloader", "predict": "predict_dataloader"}[split]
    )()
    return list(loader)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert_same_batch(x, y)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="bucket", max_tokens=160),
        dict(strategy="dynamic", batch_size=4, pad_to_multiple_of=8),
        dict(strategy="fixed", batch_size=4, max_length=64),
        dict(strategy="bucket", max_tokens=160, max_length=24, truncation=True),
        dict(strategy="packed", max_tokens=256, max_length=64),
        dict(strategy="packed", max_tokens=256, max_length=64, static_shapes=True),
    ],
)
def test_flat_samples_give_the_same_batches_as_the_samples_one_by_one(kwargs):
    samples = make_samples(120, seed=1)
    for sample in samples[::2]:  # ids as lists and as arrays, mixed
        sample["input_ids"] = np.asarray(sample["input_ids"])
    held_out = make_samples(30, seed=2)
    dms = {
        flat: BucketDataModule(
            samples, held_out, predict_dataset=held_out, pad_token_id=0, seed=3, flat_samples=flat, **kwargs
        )
        for flat in (True, False)
    }
    for dm in dms.values():
        dm.setup("fit")
    assert type(dms[True].loader_dataset("train")).__name__ == "FlatSamples"
    assert dms[False].loader_dataset("train") is samples
    for split in ("train", "val", "predict"):
        _assert_same_batches(_batches(dms[True], split), _batches(dms[False], split))


def test_flat_samples_only_for_lists_of_mappings_that_fit_columns():
    samples = make_samples(20, seed=1)
    own = _OwnDataset(samples)
    dm = BucketDataModule(own, pad_token_id=0, batch_size=4)
    assert dm.loader_dataset("train") is own
    ragged = [{**s, "spans": list(range(i % 3))} for i, s in enumerate(samples)]
    dm = BucketDataModule(ragged, pad_token_id=0, batch_size=4, shuffle=False)
    assert dm.loader_dataset("train") is ragged  # the per-sample path collates them, or says what is wrong
    with pytest.raises(ValueError, match="Cannot pad key 'spans'"):
        list(dm.train_dataloader())


def test_flat_samples_follow_a_new_dataset_from_setup():
    class Rebuilt(BucketDataModule):
        rounds = 0

        def build_datasets(self, stage):
            return {"train": make_samples(10 + self.rounds, seed=self.rounds)}

    dm = Rebuilt(pad_token_id=0, batch_size=4)
    dm.setup("fit")
    first = dm.loader_dataset("train")
    assert dm.loader_dataset("train") is first  # built once
    dm.rounds = 1
    dm.setup("fit")
    assert len(dm.loader_dataset("train")) == 11


def test_flat_samples_through_worker_processes():
    samples = make_samples(60, seed=4)
    batches = {}
    for workers in (0, 1):
        dm = BucketDataModule(samples, pad_token_id=0, max_tokens=160, seed=5, num_workers=workers)
        dm.setup("fit")
        batches[workers] = _batches(dm, "train")
    _assert_same_batches(batches[0], batches[1])

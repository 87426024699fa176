"""Support matrix: every family of ``tests/zoo.py`` x batching and accumulation through ``TransformerModule``.

Each cell is exact against an independent reference (fp32: each packed sample's logits and the loss's gradients
equal those of the sample run alone within 1e-5 relative; a bucketed batch's loss equals the Hugging Face model's
own loss; the first update under ``AccumulationScheduler(normalize="tokens")`` is the window's gradient computed by
hand, every item loss over the window's item count) or refused with a ``ValueError`` at the first packed batch that
names the model, the reason and the alternative. ``EXPECTED`` is the matrix; ``docs/support.md`` is rendered from it
and from ``tests/test_support_model_techniques.py`` (``python -m tests.support_table``; a test checks the page is
current).

Samples are up to 24 tokens long, three times the zoo's attention windows, so a window that is ignored shows.
"""

from __future__ import annotations

import copy
import re
from typing import Any, cast

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_txopt.callbacks import AccumulationScheduler
from lightning_txopt.data import BucketDataModule
from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.module import Task, TransformerModule
from tests.helpers import assert_close_relative, assert_same_gradients, cpu_trainer, tensor_sum
from tests.zoo import FAMILIES, VOCAB, WINDOW

BUCKET_CLS = "bucketed classification"
BUCKET_LM = "bucketed causal LM"
PACKED_CLS = "packed classification"
PACKED_LM = "packed causal LM"
PACKED_EVAL = "packed validate/test/predict"
ACCUM_CLS = "token-normalised accumulation, classification"
ACCUM_LM = "token-normalised accumulation, causal LM"
TECHNIQUES = [BUCKET_CLS, BUCKET_LM, PACKED_CLS, PACKED_LM, PACKED_EVAL, ACCUM_CLS, ACCUM_LM]

_ENCODER_DECODER = "refused: encoder-decoder (use strategy='bucket')"


def _expected(family: str, technique: str) -> str:
    f = FAMILIES[family]
    if technique in (BUCKET_LM, PACKED_LM, ACCUM_LM) and not f.causal_lm:
        return "n/a: no causal-LM head"
    if f.encoder_decoder and technique in (PACKED_CLS, PACKED_EVAL):
        return _ENCODER_DECODER
    return "exact"


EXPECTED: dict[tuple[str, str], str] = {(family, t): _expected(family, t) for family in FAMILIES for t in TECHNIQUES}
_REFUSAL_PATTERNS = {_ENCODER_DECODER: r"T5ForSequenceClassification is an encoder-decoder model.*strategy='bucket'"}

LENGTHS = [3 * WINDOW, 5, 2 * WINDOW + 1, 2, WINDOW + 3, 11]


def _samples(family: str, task: str, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        if FAMILIES[family].encoder_decoder:  # T5's classifier pools its end-of-sequence token
            ids[-1] = FAMILIES[family].config["eos_token_id"]
        out.append({"input_ids": ids, "labels": ids.clone() if task == "causal-lm" else i % 3})
    return out


def _module(family: str, task: Task) -> TransformerModule:
    torch.manual_seed(0)
    return TransformerModule(config=FAMILIES[family].config_dict(), task=task, num_labels=3)


def _alone(model, sample, task):
    ids = sample["input_ids"][None]
    logits = model(input_ids=ids).logits
    if task == "causal-lm":
        return logits[0], F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return logits[0], F.cross_entropy(logits, torch.tensor([sample["labels"]]), reduction="sum")


def _check_bucketed(family: str, task: Task) -> None:
    module = _module(family, task)
    samples = _samples(family, task)
    dm = BucketDataModule(samples, pad_token_id=0, batch_size=len(samples), shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss, items, _ = module.loss_and_items(batch, "mean")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    labels = batch["labels"]
    if task == "causal-lm":  # Hugging Face's own loss ignores padding only through -100 labels
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    reference = module.model(**inputs, labels=labels).loss
    assert_close_relative(loss, reference, 1e-5, "bucketed loss")
    assert int(items) == (sum(n - 1 for n in LENGTHS) if task == "causal-lm" else len(LENGTHS))


def _check_packed(family: str, task: Task) -> None:
    module = _module(family, task)
    reference = copy.deepcopy(module.model)
    samples = _samples(family, task)
    batch = PackingCollator(3 * WINDOW + 8)(samples)
    assert batch["input_ids"].shape[0] < len(samples)  # really packed: several samples share a row
    loss, items, logits = module.loss_and_items(batch, "sum")
    if logits is None:  # causal LMs: the chunked loss never forms them
        with torch.no_grad():
            logits = module.forward_logits(batch)
    ref_losses = []
    for i, sample in enumerate(samples):
        ref_logits, ref_i = _alone(reference, sample, task)
        ref_losses.append(ref_i)
        if task == "causal-lm":
            r, c = batch["cls_index"][i].tolist()
            got = logits[r, c : c + len(sample["input_ids"])]
        else:
            got = logits[i]
        assert_close_relative(got, ref_logits, 1e-5, f"sample {i} logits")
    assert int(items) == (sum(n - 1 for n in LENGTHS) if task == "causal-lm" else len(LENGTHS))
    ref_loss = tensor_sum(ref_losses)
    assert_close_relative(loss, ref_loss, 1e-5, "packed loss")
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(module.model, reference)


def _check_packed_eval(family: str) -> None:
    """Validation, test and predict on a packed DataModule: the check runs there too, metrics and predictions are the
    unpacked ones (the support probe is not only a fit-start check)."""
    samples = _samples(family, "sequence-classification")
    dm = BucketDataModule(
        samples, samples, samples, samples, pad_token_id=0, strategy="packed", max_tokens=64, max_length=32
    )
    module = _module(family, "sequence-classification")
    reference = copy.deepcopy(module.model).eval()
    trainer = cpu_trainer()
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    predicted = trainer.predict(module, datamodule=dm)
    assert predicted is not None
    outputs = cast("list[dict[str, torch.Tensor]]", predicted)  # one predict loader: a list of batch outputs
    with torch.no_grad():
        alone = [_alone(reference, s, "sequence-classification") for s in samples]
    ref_loss = sum(float(loss) for _, loss in alone) / len(samples)
    assert metrics["val_loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert tested["test_loss"] == pytest.approx(ref_loss, rel=1e-5)
    got = {int(i): row for out in outputs for i, row in zip(out["index"], out["logits"], strict=True) if i >= 0}
    assert sorted(got) == list(range(len(samples)))
    for i, (logits, _) in enumerate(alone):
        assert_close_relative(got[i], logits, 1e-5, f"prediction {i}")


def _check_accumulation(family: str, task: Task) -> None:
    """``AccumulationScheduler({0: 2}, normalize="tokens")`` through a Trainer: the gradient of the first update is
    the exact window gradient (every item loss of both micro-batches over the window's item count), by hand."""
    samples = _samples(family, task) + _samples(family, task, seed=1)

    def data() -> BucketDataModule:
        return BucketDataModule(samples, pad_token_id=0, batch_size=4, seed=3)

    module = _module(family, task)
    reference = copy.deepcopy(module.model)
    captured: dict[str, torch.Tensor] = {}

    class Capture(pl.Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
            if not captured:
                captured.update(
                    {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
                )

    callbacks = [AccumulationScheduler({0: 2}, normalize="tokens"), Capture()]
    cpu_trainer(max_steps=1, callbacks=callbacks, limit_val_batches=0).fit(module, datamodule=data())
    dm = data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    window = [next(loader), next(loader)]
    probe = _module(family, task)
    probe.model = reference
    losses, items = [], 0
    for batch in window:
        loss, n, _ = probe.loss_and_items(batch, "sum")
        losses.append(loss)
        items += int(n)
    (tensor_sum(losses) / items).backward()
    assert captured
    for name, p in reference.named_parameters():
        if p.grad is not None and name in captured:
            assert_close_relative(captured[name], p.grad, 1e-5, name, atol=1e-7)


def run_cell(family: str, technique: str) -> None:
    if technique == BUCKET_CLS:
        _check_bucketed(family, "sequence-classification")
    elif technique == BUCKET_LM:
        _check_bucketed(family, "causal-lm")
    elif technique == PACKED_CLS:
        _check_packed(family, "sequence-classification")
    elif technique == PACKED_LM:
        _check_packed(family, "causal-lm")
    elif technique == ACCUM_CLS:
        _check_accumulation(family, "sequence-classification")
    elif technique == ACCUM_LM:
        _check_accumulation(family, "causal-lm")
    else:
        _check_packed_eval(family)


def test_the_matrix_is_complete():
    assert set(EXPECTED) == {(f, t) for f in FAMILIES for t in TECHNIQUES}


@pytest.mark.parametrize(("family", "technique"), list(EXPECTED))
def test_cell(family: str, technique: str) -> None:
    expected = EXPECTED[(family, technique)]
    if expected.startswith("n/a"):
        return
    if expected == "exact":
        run_cell(family, technique)
        return
    with pytest.raises(ValueError, match=_REFUSAL_PATTERNS[expected]) as info:
        run_cell(family, technique)
    assert re.search(r"strategy='bucket'", str(info.value))

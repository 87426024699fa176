"""The Lightning workflow as users write it: README's snippet, DDP on 1-3 processes, validate/test/predict in order."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_txopt import BucketDataModule, OrderedPredictionWriter, TransformerModule, restore_order
from tests.helpers import BERT_DICT, RecordingClassifier, cpu_trainer, make_samples, tiny_bert

README = Path(__file__).parents[1] / "README.md"


def _readme_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, f"no python block under {heading!r} in README.md"
    return found.group(1)


class _Tokenizer:
    pad_token_id = 0


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path, in_process_ddp):
    """Only the placeholders are substituted: the data, a tokenizer and a local model folder."""
    code = _readme_block("## Use it")
    tiny_bert(num_labels=40).save_pretrained(tmp_path / "model")
    code = code.replace('"path/to/local/model"', repr(str(tmp_path / "model")))
    namespace: dict[str, Any] = {
        "tokenised_train": make_samples(64, seed=1, num_labels=40),
        "tokenised_val": make_samples(16, seed=2, num_labels=40),
        "tokenised_test": make_samples(12, seed=3, num_labels=40),
        "tokenizer": _Tokenizer(),
        "__name__": "readme",
    }
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints where it runs
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    trainer, predictions = namespace["trainer"], namespace["predictions"]
    assert trainer.current_epoch == 3 and trainer.world_size == 1
    assert predictions["index"].tolist() == list(range(12)) and predictions["logits"].shape == (12, 40)


def _dm(**kwargs: Any) -> BucketDataModule:
    return BucketDataModule(
        make_samples(90, seed=1), make_samples(20, seed=2), pad_token_id=0, max_tokens=160, **kwargs
    )


def test_ddp_on_one_process_needs_nothing_switched_off(in_process_ddp):
    model = RecordingClassifier()
    trainer = cpu_trainer(max_epochs=1, strategy="ddp", devices=1)
    trainer.fit(model, datamodule=_dm())
    assert sorted(i for b in model.seen for i in b) == list(range(90))
    loader = trainer.train_dataloader
    assert loader is not None
    assert type(loader.batch_sampler).__name__ == "BucketBatchSampler"


@pytest.mark.ddp
@pytest.mark.parametrize("devices", [2, 3])
def test_ddp_spawn_on_two_and_three_processes(tmp_path, devices):
    model = RecordingClassifier(record_dir=str(tmp_path))
    cpu_trainer(max_epochs=1, devices=devices, strategy="ddp_spawn").fit(model, datamodule=_dm())
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(devices)]
    assert len({len(r["train"]) for r in records}) == 1  # equal batch counts: no hang
    seen = sorted(i for r in records for b in r["train"] for i in b)
    assert seen == list(range(90))  # every sample once over the ranks
    assert sorted(i for r in records for i in r["val"]) == list(range(20))


@pytest.mark.parametrize("strategy", ["bucket", "packed"])
def test_predictions_in_restored_order_equal_batch_of_one_forwards(strategy):
    samples = make_samples(40, seed=4)
    for s in samples:
        del s["labels"]  # prediction data need no labels
    extra: dict[str, Any] = dict(max_length=48) if strategy == "packed" else {}
    dm = BucketDataModule(predict_dataset=samples, pad_token_id=0, max_tokens=128, strategy=strategy, **extra)
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    out = restore_order(cpu_trainer().predict(module, datamodule=dm))
    module.eval()
    with torch.no_grad():
        expected = torch.cat([module.model(input_ids=torch.tensor([s["input_ids"]])).logits for s in samples])
    assert out["index"].tolist() == list(range(40))
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert out["preds"].tolist() == expected.argmax(-1).tolist()


def test_test_step_logs_the_unpacked_test_metrics():
    samples = make_samples(30, seed=5)
    dm = BucketDataModule(test_dataset=samples, pad_token_id=0, batch_size=7)
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    metrics = cpu_trainer().test(module, datamodule=dm, verbose=False)[0]
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module.model(input_ids=torch.tensor([s["input_ids"]])).logits for s in samples])
    labels = torch.tensor([s["labels"] for s in samples])
    assert metrics["test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert metrics["test_acc"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


@pytest.mark.ddp
def test_prediction_writer_merges_ranks_in_dataset_order(tmp_path):
    samples = make_samples(33, seed=6)
    dm = BucketDataModule(predict_dataset=samples, pad_token_id=0, max_tokens=96)
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = cpu_trainer(devices=2, strategy="ddp_spawn", callbacks=[OrderedPredictionWriter(tmp_path)])
    trainer.predict(module, datamodule=dm, return_predictions=False)
    merged = torch.load(tmp_path / "predictions.pt", weights_only=True)
    single = restore_order(cpu_trainer().predict(module, datamodule=dm))
    assert merged["index"].tolist() == list(range(33))
    torch.testing.assert_close(merged["logits"], single["logits"], rtol=1e-5, atol=1e-5)


def test_restore_order_errors():
    with pytest.raises(KeyError, match="no 'index'"):
        restore_order([{"logits": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="predicted twice"):
        restore_order([{"index": torch.tensor([0, 1])}, {"index": torch.tensor([1])}])
    with pytest.raises(ValueError, match="have no prediction"):
        restore_order([{"index": torch.tensor([0, 2])}])
    with pytest.raises(ValueError, match="3 rows for 2 indices"):
        restore_order([{"index": torch.tensor([0, 1]), "logits": torch.zeros(3, 2)}])
    with pytest.raises(TypeError, match="expects the dicts"):
        restore_order([1, 2])


def test_predict_on_a_loader_built_outside_a_hook_says_to_pass_the_datamodule():
    dm = BucketDataModule(make_samples(20, seed=1), make_samples(8, seed=2), pad_token_id=0, max_tokens=96)
    dm.setup("fit")
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    with pytest.raises(TypeError, match=r"Pass the DataModule instead \(trainer.predict\(model, datamodule=dm\)\)"):
        cpu_trainer().predict(module, dataloaders=dm.val_dataloader())

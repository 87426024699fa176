from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_txopt.callbacks import AccumulationScheduler
from lightning_txopt.data import BucketDataModule
from lightning_txopt.module import TransformerModule, linear_warmup_decay
from tests.helpers import BERT_DICT, GPT2_DICT, cpu_trainer, make_samples, one_loader

BERT = BERT_DICT


def _lm_samples(n: int) -> list[dict]:
    out = []
    for s in make_samples(n, seed=5):
        out.append({"input_ids": s["input_ids"], "labels": s["input_ids"]})
    return out


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        TransformerModule()
    with pytest.raises(ValueError, match="task"):
        TransformerModule(config=BERT, task="translation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_type"):
        TransformerModule(config={"hidden_size": 8})


def test_classification_validation_accuracy_matches_a_manual_count():
    dm = BucketDataModule(make_samples(40, seed=1), make_samples(23, seed=2), pad_token_id=0, batch_size=8)
    module = TransformerModule(config=BERT, num_labels=3)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=dm)
    module.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch in one_loader(dm.val_dataloader()):
            logits = module.model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(correct / total)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(loss_sum / total, rel=1e-5)


def test_causal_lm_perplexity_and_summed_loss_contract():
    dm = BucketDataModule(_lm_samples(24), _lm_samples(8), pad_token_id=0, max_tokens=128)
    module = TransformerModule(config=GPT2_DICT, task="causal-lm", learning_rate=1e-3)
    reductions: list[str] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            reductions.append(pl_module.loss_reduction)

    assert module.loss_reduction == "auto"
    callbacks = [AccumulationScheduler({0: 2}, normalize="tokens"), Record()]
    trainer = cpu_trainer(max_epochs=1, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    assert reductions and set(reductions) == {"sum"}  # tokens normalisation: training_step returns summed losses
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    summed, items, _ = module.loss_and_items(batch, "sum")
    mean, _, _ = module.loss_and_items(batch, "mean")
    lengths = batch["attention_mask"].sum(1)
    assert int(items) == int((lengths - 1).sum())  # shifted labels: one fewer item per sequence
    torch.testing.assert_close(summed / items, mean, rtol=1e-5, atol=1e-6)
    ppl, loss = float(trainer.callback_metrics["val_ppl"]), float(trainer.callback_metrics["val_loss"])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_optimizer_groups_and_schedule_use_true_step_count():
    dm = BucketDataModule(make_samples(40, seed=1), pad_token_id=0, batch_size=4)
    module = TransformerModule(config=BERT, num_labels=3, warmup=0.5)
    trainer = cpu_trainer(max_epochs=2, callbacks=[AccumulationScheduler({0: 1, 1: 5})])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 10 + 2
    optimizer = trainer.optimizers[0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    no_decay = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert all(id(p) in no_decay for n, p in module.named_parameters() if n.endswith("bias"))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the true last step


def test_head_lr_factor_gives_the_head_its_own_groups_on_the_same_schedule():
    """The head (outside ``base_model``) gets ``lr * factor`` in groups of its own; the schedule scales every group
    alike."""
    module = TransformerModule(config=BERT, num_labels=3, learning_rate=1e-3, head_lr_factor=10.0, warmup=10)
    assert module.head_parameter_names() == {"model.classifier.weight", "model.classifier.bias"}
    dm = BucketDataModule(make_samples(40, seed=1), pad_token_id=0, batch_size=8)
    trainer = cpu_trainer(max_steps=3)
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    head = {id(p) for g in groups[2:] for p in g["params"]}
    assert head == {id(module.model.classifier.weight), id(module.model.classifier.bias)}
    assert not head & {id(p) for g in groups[:2] for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len([p for p in module.parameters() if p.requires_grad])
    lrs = trainer.lr_scheduler_configs[0].scheduler.base_lrs
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    assert [g["lr"] for g in groups] == pytest.approx([3e-4, 3e-4, 3e-3, 3e-3])  # step 3 of a 10-step warm-up


def test_head_of_a_tied_causal_lm_is_empty_and_factor_is_checked():
    module = TransformerModule(config=GPT2_DICT, task="causal-lm", head_lr_factor=5.0)
    assert module.head_parameter_names() == set()  # lm_head is the input embedding matrix
    assert len(module.optimizer_groups()) == 2
    with pytest.raises(ValueError, match="head_lr_factor"):
        TransformerModule(config=BERT, num_labels=3, head_lr_factor=0.0)


def test_linear_warmup_decay_shape():
    f = linear_warmup_decay(10, 110)
    assert f(0) == 0 and f(10) == 1 and f(60) == pytest.approx(0.5) and f(110) == 0


def test_flops_per_token_formula():
    module = TransformerModule(config=BERT, num_labels=3)
    params = module.model.num_parameters(exclude_embeddings=True)
    assert module.flops_per_token(seq_len=10) == 6 * params + 12 * 2 * 16 * 10


def test_pretrained_folder_loads_in_train_mode(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**BERT, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    module = TransformerModule(str(tmp_path), num_labels=3)
    assert all(m.training for m in module.model.modules())  # dropout active when fine-tuning


def test_a_bf16_checkpoint_loads_as_fp32_master_weights(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**BERT, num_labels=3)
    reference = AutoModelForSequenceClassification.from_config(config).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    module = TransformerModule(str(tmp_path), num_labels=3)
    params = dict(module.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}  # the precision plugin, not the file, decides
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p.float(), rtol=0, atol=0)  # same values, upcast exactly


def test_gradients_are_freed_after_each_optimizer_step_but_kept_within_an_accumulation_window():
    import lightning.pytorch as pl

    seen: list[bool] = []  # at the start of each batch: does any parameter hold a gradient?

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(any(p.grad is not None for p in pl_module.parameters()))

    dm = BucketDataModule(make_samples(32, seed=1), pad_token_id=0, batch_size=4, shuffle=False)
    module = TransformerModule(config=BERT, num_labels=3)
    trainer = cpu_trainer(max_epochs=1, limit_train_batches=6, accumulate_grad_batches=2, callbacks=[Probe()])
    trainer.fit(module, datamodule=dm)
    # windows (0,1), (2,3), (4,5): gradients exist mid-window only; freed right after each step
    assert seen == [False, True, False, True, False, True]
    assert trainer.global_step == 3
    assert all(p.grad is None for p in module.parameters())


def _reads_from_library_code(monkeypatch, steps: int, **trainer_kwargs) -> int:
    """How many times lightning_txopt's own code read a tensor's value into Python during a fit of ``steps`` steps.

    On a GPU each such read (``int()``, ``float()``, ``.item()``, ``.tolist()``) stalls the host until the device
    catches up; a per-step read would serialise every step."""
    import sys

    from lightning_txopt.callbacks import TokenThroughputMonitor

    reads = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if "lightning_txopt" in sys._getframe(1).f_code.co_filename:
                reads["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("__int__", "__float__", "__index__", "item", "tolist"):
        counting(name)
    dm = BucketDataModule(make_samples(200, seed=1), pad_token_id=0, max_tokens=64, shuffle=False)
    module = TransformerModule(config=BERT, num_labels=3)
    callbacks = [TokenThroughputMonitor(log_every_n_steps=10**6), AccumulationScheduler({0: 2}, normalize="tokens")]
    trainer = cpu_trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    monkeypatch.undo()
    return reads["n"]


def test_training_steps_do_not_read_device_values(monkeypatch):
    # TransformerModule, TokenThroughputMonitor and AccumulationScheduler(normalize="tokens") together: the number of
    # reads must not grow with the number of steps (reads at the end of the fit are fine)
    assert _reads_from_library_code(monkeypatch, 2) == _reads_from_library_code(monkeypatch, 8)


def test_loss_goes_to_the_progress_bar_only_when_there_is_one():
    dm = BucketDataModule(make_samples(40, seed=1), pad_token_id=0, batch_size=8)
    for bar in (False, True):
        trainer = cpu_trainer(max_steps=2, enable_progress_bar=bar)
        trainer.fit(TransformerModule(config=BERT, num_labels=3), datamodule=dm)
        assert "train_loss" in trainer.callback_metrics  # logged either way
        assert ("train_loss" in trainer.progress_bar_metrics) is bar  # the number (a device read) only with a bar


@pytest.mark.slow
def test_compiled_model_does_not_recompile_with_static_packed_shapes(monkeypatch):
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    # dynamo's guards decide recompiles whatever the backend; the eager backend keeps this test fast on CPU
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    samples = make_samples(200, seed=3)
    dm = BucketDataModule(samples, pad_token_id=0, strategy="packed", max_tokens=128, max_length=64, static_shapes=True)
    module = TransformerModule(config=BERT, num_labels=3, compile=True)
    frames = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            frames.append(int(counters["stats"]["unique_graphs"]))

    cpu_trainer(max_steps=8, callbacks=[Count()], limit_val_batches=0).fit(module, datamodule=dm)
    assert frames[0] >= 1 and len(set(frames)) == 1  # graphs made by the first step only: no recompilation


def test_compile_mode_reaches_torch_compile(monkeypatch):
    import functools

    seen: list[Any] = []

    def spy(module: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("mode"))
        return functools.partial(module.__call__)

    monkeypatch.setattr(torch, "compile", spy)
    module = TransformerModule(config=BERT, num_labels=3, compile=True, compile_mode="reduce-overhead")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    module.loss_and_items({**batch, "labels": torch.tensor([1])}, "mean")
    assert seen == ["reduce-overhead"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(compile=True, compile_mode="fast"), r"compile_mode.*one of.*'fast'"),
        (dict(compile_mode="reduce-overhead"), r"compile_mode='reduce-overhead'.*needs `compile=True`"),
    ],
)
def test_a_bad_compile_mode_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerModule(config=BERT, num_labels=3, **kwargs)


@pytest.mark.parametrize("where", ["training step", "backward pass"])
def test_an_out_of_memory_error_explains_the_batch_and_the_budget(where):
    dm = BucketDataModule(make_samples(20, seed=1), pad_token_id=0, max_tokens=96)
    module = TransformerModule(config=BERT, num_labels=3)

    def out_of_memory(*_: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "training step":
        module.model.register_forward_pre_hook(out_of_memory)
    else:
        module.model.classifier.weight.register_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=rf"(?s){where}.*max_tokens=96") as info:
        cpu_trainer(max_steps=1).fit(module, datamodule=dm)
    assert "TokenBudgetFinder" in str(info.value) and "shape" in str(info.value)

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset, RandomIterableDataset
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader

from lightning_txopt import TransformerModule
from lightning_txopt.callbacks.accumulation import (
    AccumulationScheduler,
    causal_lm_items,
    count_label_items,
    count_optimizer_steps,
    estimated_optimizer_steps,
    factor_at,
    lightning_divisor,
    window_end,
)
from lightning_txopt.data import BucketDataModule
from tests.fsdp_helpers import windows as step_windows
from tests.helpers import BERT_DICT, GPT2_DICT, ModelModule, cpu_trainer, make_samples, prefixed, tensor_sum, tiny_bert


class SumLossModule(pl.LightningModule):
    """Returns the loss summed over its items (normalize='tokens') or their mean; records every micro-batch.

    It declares what it returns (``loss_reduction``), as AccumulationScheduler requires.
    """

    def __init__(self, reduction: str = "sum", record_dir: str | None = None, lr_schedule: bool = False) -> None:
        super().__init__()
        self.model = tiny_bert()
        self.reduction = reduction
        self.loss_reduction = reduction
        self.record_dir = record_dir
        self.lr_schedule = lr_schedule
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.total_steps: int | None = None

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("idx", "labels")}
        logits = self.model(**inputs).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction=self.reduction, ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.micro_batches.append({k: v.detach().cpu() for k, v in batch.items()})
        return self.loss(batch)

    def on_train_start(self) -> None:
        self.total_steps = estimated_optimizer_steps(self.trainer)  # where TransformerModule calls it
        self.snapshots.append((self.trainer.global_step, self._params()))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.snapshots.append((self.trainer.global_step, self._params()))

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        if not self.lr_schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.record_dir is not None:
            torch.save(
                {"micro": self.micro_batches, "snapshots": self.snapshots},
                Path(self.record_dir) / f"rank{self.global_rank}.pt",
            )


def _samples(n: int = 40) -> list[dict]:
    samples = make_samples(n, seed=21)
    for s in samples[::3]:
        s["labels"] = -100  # ignored items: counts differ from sample counts
    return samples


def _dm(**kwargs: Any) -> BucketDataModule:
    defaults: dict[str, Any] = dict(
        pad_token_id=0, max_tokens=96, seed=4
    )  # token budget: uneven samples per micro-batch
    defaults.update(kwargs)
    return BucketDataModule(_samples(), **defaults)


def _synced_windows(record_dir: Any) -> list[tuple[dict, dict, list[dict], list[dict]]]:
    """The optimizer steps two recorded ranks ran: ``(weights before, after, rank 0's micro-batches, rank 1's)``.

    Asserts that both ranks stepped the same number of times (at least twice) and hold identical weights after each.
    """
    ranks = [torch.load(Path(record_dir) / f"rank{r}.pt") for r in range(2)]
    windows = [step_windows(r["snapshots"]) for r in ranks]
    assert len(windows[0]) == len(windows[1]) >= 2
    out = []
    for (s0, e0, before, after), (s1, e1, _, after1) in zip(windows[0], windows[1], strict=True):
        for k in after:
            torch.testing.assert_close(after[k], after1[k], rtol=0, atol=0)  # ranks in sync
        out.append((before, after, ranks[0]["micro"][s0:e0], ranks[1]["micro"][s1:e1]))
    return out


def _reference_grad(params: dict, micro: list[dict], normalize: str) -> dict[str, torch.Tensor]:
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean")
    module.model.load_state_dict(params, strict=False)
    module.model.zero_grad()
    if normalize == "tokens":
        items = sum(int((b["labels"] != -100).sum()) for b in micro)
        total = tensor_sum(module.loss(b) for b in micro) / items
    else:
        total = tensor_sum(module.loss(b) for b in micro) / len(micro)
    total.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _check_windows(module: SumLossModule, normalize: str, expected_sizes: list[int]) -> None:
    """Each optimizer step covered the expected micro-batches and moved the weights by minus the exact gradient."""
    windows = step_windows(module.snapshots)
    assert [end - start for start, end, _, _ in windows] == expected_sizes
    for start, end, before, after in windows:
        ref = _reference_grad(before, module.micro_batches[start:end], normalize)
        for name, g in ref.items():
            delta = before[name] - after[name]
            torch.testing.assert_close(delta, g, rtol=1e-5, atol=1e-7, msg=prefixed(f"window {start}:{end} {name}"))


def _expected_sizes(
    n: int, epochs: int, scheduling: dict[int, int], interval: str, max_steps: int = -1, first_step: int = 0
) -> list[int]:
    """The issue's specification of the windows, written out: epoch schedules keep Lightning's windows (multiples of
    the factor from the epoch start); a step schedule starts full windows at the step its factor starts."""
    sizes, steps = [], 0
    for epoch in range(epochs):
        pos = 0
        while pos < n:
            position = epoch if interval == "epoch" else steps
            k = ([v for key, v in sorted(scheduling.items()) if key <= position] or [1])[-1]
            end = min((pos // k + 1) * k if interval == "epoch" else pos + k, n)
            if steps >= first_step:
                sizes.append(end - pos)
            pos, steps = end, steps + 1
            if steps == max_steps:
                return sizes
    return sizes


# ---------------------------------------------------------------------------------------------------------------------
# the plan, without a Trainer


def test_lightning_divisor_makes_exactly_the_window_under_lightnings_rule():
    """Brute force over every window of epochs of up to 30 micro-batches, against Lightning's rule written out."""

    def lightning_window_ok(v: int, start: int, end: int, n: int) -> bool:
        steps = [c for c in range(start, end + 1) if c % v == 0 or c == n]  # optimizer step after micro-batch c
        zeroes = [c for c in range(start + 1, end + 1) if (c - 1) % v == 0]  # zero_grad before micro-batch c
        return steps == [end] and not zeroes

    for n in range(1, 31):
        for start in range(1, n + 1):
            for end in range(start, n + 1):
                v = lightning_divisor(start, end, epoch_end=end == n)
                assert lightning_window_ok(v, start, end, n), (start, end, n, v)
                assert v >= end - start + 1
                assert not any(lightning_window_ok(w, start, end, n) for w in range(1, v)), (start, end, n, v)


def test_lightning_divisor_error():
    with pytest.raises(ValueError, match=r"1 <= start <= end, got start=5, end=4"):
        lightning_divisor(5, 4)


def test_window_end_and_step_count_of_the_issue_example():
    # {0: 1, 2: 4} by optimizer step over 10 micro-batches: 1, 1, then full windows 3-6 and 7-10: 4 steps, not 5
    assert count_optimizer_steps(10, 1, {0: 1, 2: 4}, interval="step") == 4
    assert [window_end(s, k, "step", 10) for s, k in ((1, 1), (2, 1), (3, 4), (7, 4))] == [1, 2, 6, 10]
    assert _expected_sizes(10, 1, {0: 1, 2: 4}, "step") == [1, 1, 4, 4]
    assert window_end(3, 4, "epoch", 10) == 4  # epoch schedules keep Lightning's aligned windows
    assert window_end(9, 4, "step", float("inf")) == 12  # no length: the window is not cut


@pytest.mark.parametrize(
    ("n", "epochs", "scheduling", "interval", "max_steps"),
    [
        (13, 3, {0: 1, 1: 4}, "epoch", -1),
        (13, 2, {0: 1, 3: 4}, "step", -1),
        (13, 3, {0: 2, 5: 3, 9: 5}, "step", -1),
        (10, 4, {0: 3, 4: 2}, "step", 9),
        (7, 5, {2: 3}, "epoch", 8),
    ],
)
def test_count_optimizer_steps_matches_the_specified_windows(n, epochs, scheduling, interval, max_steps):
    expected = len(_expected_sizes(n, epochs, scheduling, interval, max_steps))
    assert count_optimizer_steps(n, epochs, scheduling, interval, max_steps) == expected


def test_count_optimizer_steps_errors():
    with pytest.raises(ValueError, match="must be >= 0, got -1, 2"):
        count_optimizer_steps(-1, 2, {0: 2})
    with pytest.raises(ValueError, match="non-empty"):
        count_optimizer_steps(10, 2, {})
    with pytest.raises(ValueError, match="`interval` must be 'epoch' or 'step', got 'batch'"):
        count_optimizer_steps(10, 2, {0: 2}, interval="batch")  # type: ignore[arg-type]


def test_yaml_style_keys_and_helpers():
    assert AccumulationScheduler({"0": 2, "3": 4}).scheduling == {0: 2, 3: 4}  # type: ignore[dict-item]  # YAML keys
    assert factor_at({2: 4}, 0) == 1
    assert int(causal_lm_items({"labels": torch.tensor([[1, 2, -100]])})) == 1
    assert int(count_label_items({"labels": torch.tensor([[1, 2, -100]])})) == 2


# ---------------------------------------------------------------------------------------------------------------------
# exactness and step counts through Lightning's own loop


@pytest.mark.parametrize("normalize", ["tokens", "mean"])
def test_each_step_is_the_exact_window_gradient_with_final_incomplete_window(normalize):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean")
    callback = AccumulationScheduler({0: 3}, normalize=normalize)
    trainer = cpu_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(module, datamodule=_dm())
    n = int(trainer.num_training_batches)
    assert n % 3 != 0  # the last window of each epoch is incomplete
    sizes = ([3] * (n // 3) + [n % 3]) * 2
    _check_windows(module, normalize, sizes)
    assert module.total_steps == len(sizes) == trainer.global_step == callback.optimizer_steps


def test_lightning_native_accumulation_is_biased():
    """The same run with Lightning's own accumulate_grad_batches: full windows are exact, the final incomplete window
    of L micro-batches gets L/3 of its gradient. That is what the callback fixes."""
    module = SumLossModule(reduction="mean")
    trainer = cpu_trainer(max_epochs=1, accumulate_grad_batches=3)
    trainer.fit(module, datamodule=_dm())
    windows = step_windows(module.snapshots)
    n = int(trainer.num_training_batches)
    assert [end - start for start, end, _, _ in windows] == [3] * (n // 3) + [n % 3]
    for start, end, before, after in windows:
        ref = _reference_grad(before, module.micro_batches[start:end], "mean")
        for name, g in ref.items():
            torch.testing.assert_close(before[name] - after[name], g * (end - start) / 3, rtol=1e-5, atol=1e-7)
    assert n % 3 != 0 and torch.linalg.norm(ref["classifier.weight"]) > 0  # the last window is biased, not zero


@pytest.mark.parametrize(
    ("scheduling", "interval", "epochs", "max_steps", "normalize"),
    [
        ({0: 1, 1: 4}, "epoch", 3, -1, "mean"),
        ({0: 1, 3: 4}, "step", 2, -1, "tokens"),  # the factor switches after 3 steps, mid-epoch
        ({0: 2, 3: 3, 7: 5}, "step", 3, -1, "tokens"),  # two mid-epoch switches, windows crossing no boundary
        ({0: 3, 2: 2}, "step", 3, 9, "mean"),  # max_steps stops mid-epoch
    ],
)
def test_steps_and_windows_match_the_schedule(scheduling, interval, epochs, max_steps, normalize):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean", lr_schedule=True)
    callback = AccumulationScheduler(scheduling, interval=interval, normalize=normalize)
    trainer = cpu_trainer(max_epochs=epochs, max_steps=max_steps, callbacks=[callback])
    trainer.fit(module, datamodule=_dm())
    n = int(trainer.num_training_batches)
    sizes = _expected_sizes(n, epochs, scheduling, interval, max_steps)
    assert len(sizes) == trainer.global_step == callback.optimizer_steps == module.total_steps
    _check_windows(module, normalize, sizes)
    last_factor = factor_at(scheduling, epochs - 1 if interval == "epoch" else len(sizes) - 1)
    assert trainer.callback_metrics["accumulation/factor"] == callback.factor == last_factor
    assert trainer.accumulate_grad_batches == 1  # as the callback found it: the Trainer can fit again


def test_step_schedule_switch_starts_full_windows():
    """The issue's example through a Trainer: {0: 1, 2: 4} over 10 micro-batches makes 4 steps (1, 1, 4, 4)."""
    module = SumLossModule(reduction="sum")
    dm = BucketDataModule(_samples(), pad_token_id=0, batch_size=4, seed=4)  # 40 samples: 10 micro-batches
    trainer = cpu_trainer(
        max_epochs=1, callbacks=[AccumulationScheduler({0: 1, 2: 4}, interval="step", normalize="tokens")]
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == 10
    _check_windows(module, "tokens", [1, 1, 4, 4])
    assert trainer.global_step == module.total_steps == 4


# ---------------------------------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize(("scheduling", "interval"), [({0: 1, 1: 3}, "epoch"), ({0: 1, 3: 4}, "step")])
def test_mid_epoch_resume_is_the_uninterrupted_run(tmp_path, scheduling, interval):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full = SumLossModule(reduction="sum")
    cb = AccumulationScheduler(scheduling, interval=interval, normalize="tokens")
    trainer = cpu_trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(full, datamodule=_dm(max_tokens=48))
    n = int(trainer.num_training_batches)
    sizes = _expected_sizes(n, 2, scheduling, interval)
    # a checkpoint after the factor switched and before the epoch it happened in ends
    step = 4 if interval == "step" else n + 1
    assert 0 < sum(sizes[:step]) % n < n - 1
    resumed = SumLossModule(reduction="sum")
    cb2 = AccumulationScheduler(scheduling, interval=interval, normalize="tokens")
    t2 = cpu_trainer(max_epochs=2, callbacks=[cb2])
    t2.fit(resumed, datamodule=_dm(max_tokens=48), ckpt_path=str(tmp_path / f"step={step}.ckpt"))
    assert t2.global_step == trainer.global_step == len(sizes) == cb2.optimizer_steps == resumed.total_steps
    _check_windows(resumed, "tokens", sizes[step:])
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), p, rtol=1e-5, atol=1e-6)
    assert cb2.factor == factor_at(scheduling, 1 if interval == "epoch" else t2.global_step - 1)


class _SaveAt(pl.Callback):
    def __init__(self, path: Path, epoch: int, batch_idx: int) -> None:
        self.path, self.epoch, self.batch_idx = path, epoch, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch_idx):
            trainer.save_checkpoint(self.path)


def test_resume_from_a_checkpoint_inside_a_window_keeps_the_windows(tmp_path):
    """A checkpoint inside a window (here after micro-batch 6 of the window 4-7 of a step schedule): the resumed run
    finishes that window where the uninterrupted run did, on its remaining micro-batch, and then makes the same
    windows and the same number of steps."""
    scheduling = {0: 1, 3: 4}
    path = tmp_path / "mid.ckpt"
    full = SumLossModule(reduction="sum")
    cb = AccumulationScheduler(scheduling, interval="step", normalize="tokens")
    trainer = cpu_trainer(max_epochs=2, callbacks=[cb, _SaveAt(path, epoch=0, batch_idx=5)])
    trainer.fit(full, datamodule=_dm(max_tokens=48))
    n = int(trainer.num_training_batches)
    sizes = _expected_sizes(n, 2, scheduling, "step")
    assert sizes[:4] == [1, 1, 1, 4] and n > 7  # micro-batches 4-7 are one window; the checkpoint is after 6
    resumed = SumLossModule(reduction="sum")
    cb2 = AccumulationScheduler(scheduling, interval="step", normalize="tokens")
    t2 = cpu_trainer(max_epochs=2, callbacks=[cb2])
    t2.fit(resumed, datamodule=_dm(max_tokens=48), ckpt_path=str(path))
    assert t2.global_step == trainer.global_step == len(sizes) == cb2.optimizer_steps == resumed.total_steps
    _check_windows(resumed, "tokens", [1, *sizes[4:]])  # the rest of the cut window (micro-batch 7), then the same
    # Lightning's own count of stepped batches (what loggers use as their step) agrees with the uninterrupted run
    assert t2.fit_loop.epoch_loop._batches_that_stepped == trainer.fit_loop.epoch_loop._batches_that_stepped


# ---------------------------------------------------------------------------------------------------------------------
# the module contract: loss_reduction and count_loss_items


class _Reductions(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(pl_module.loss_reduction)


def test_auto_loss_reduction_is_sum_for_the_fit_only():
    dm = BucketDataModule(make_samples(24, seed=1), pad_token_id=0, batch_size=4)
    module = TransformerModule(config=BERT_DICT, num_labels=3)
    assert module.loss_reduction == "auto"
    during = _Reductions()
    cpu_trainer(max_steps=2, callbacks=[AccumulationScheduler({0: 2}, normalize="tokens"), during]).fit(
        module, datamodule=dm
    )
    assert during.seen == ["sum"] * 4
    assert module.loss_reduction == "auto"
    without = _Reductions()  # the same module in a Trainer without the callback trains on mean losses
    cpu_trainer(max_steps=2, callbacks=[without]).fit(module, datamodule=dm)
    assert without.seen == ["auto", "auto"]


def test_auto_loss_reduction_is_restored_after_an_exception():
    class Fail(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            raise RuntimeError("boom")

    module = TransformerModule(config=BERT_DICT, num_labels=3)
    trainer = cpu_trainer(max_steps=2, callbacks=[AccumulationScheduler({0: 2}, normalize="tokens"), Fail()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, datamodule=BucketDataModule(make_samples(8, seed=1), pad_token_id=0, batch_size=4))
    assert module.loss_reduction == "auto"
    assert trainer.accumulate_grad_batches == 1


def _declaring(reduction: str) -> SumLossModule:
    module = SumLossModule(reduction="sum")
    module.loss_reduction = reduction
    return module


@pytest.mark.parametrize(
    ("module", "normalize", "match"),
    [
        (lambda: ModelModule(tiny_bert()), "tokens", r"ModelModule must return .*`loss_reduction = \"sum\"`.*has no"),
        (lambda: _declaring("mean"), "tokens", r"SumLossModule .*declares loss_reduction='mean'.*normalize='mean'"),
        (lambda: _declaring("sum"), "mean", r"normalize='mean'.*SumLossModule declares loss_reduction='sum'"),
        (lambda: _declaring("none"), "tokens", r"SumLossModule.loss_reduction must be one of .*got 'none'"),
    ],
)
def test_loss_reduction_is_checked_at_setup(module, normalize, match):
    trainer = cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 2}, normalize=normalize)])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module(), datamodule=_dm())
    assert trainer.global_step == 0


def _lm_samples(n: int) -> list[dict]:
    return [{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in make_samples(n, seed=5)]


class _Record(pl.Callback):
    """After the scheduler: the micro-batches, and the gradients the optimizer gets at each step."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v.detach().clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def test_causal_lm_first_update_is_the_exact_window_gradient_with_the_default_counter():
    """TransformerModule(task="causal-lm") with the default item counter: the first step's gradient is the sum of the
    per-token losses of the window over its true number of predicted tokens (each row predicts one fewer)."""
    dm = BucketDataModule(_lm_samples(24), pad_token_id=0, max_tokens=128, seed=2)
    module = TransformerModule(config=GPT2_DICT, task="causal-lm", learning_rate=1e-3)
    reference = copy.deepcopy(module.model)
    record = _Record()
    cpu_trainer(max_steps=1, callbacks=[AccumulationScheduler({0: 3}, normalize="tokens"), record]).fit(
        module, datamodule=dm
    )
    window = record.batches[:3]
    assert len(record.grads) == 1 and len(window) == 3
    total = torch.zeros(())
    tokens = 0
    for b in window:
        logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = b["labels"][:, 1:]
        mask = target != -100
        total = total - logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].sum()
        tokens += int(mask.sum())
    assert tokens < sum(int((b["labels"] != -100).sum()) for b in window)  # count_label_items would be wrong
    (total / tokens).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(record.grads[0][f"model.{name}"], p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# fp16: the initial loss scale


def _fp16_cpu() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))


def _scale_for(items: int, init: float = 2.0**16) -> float:
    """The initial scale the callback sets: ``init`` lowered by ``items`` (the summed loss is ``items`` mean losses;
    Lightning's divisor is not counted on: it is as small as 1 in the window the epoch end cuts short)."""
    scale = init
    while scale * items > init:
        scale /= 2
    return scale


class _Scales(pl.Callback):
    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_fp16_initial_loss_scale_is_lowered_by_the_size_of_the_summed_loss():
    module = SumLossModule(reduction="sum")
    scales = _Scales()
    trainer = cpu_trainer(
        max_steps=2, plugins=[_fp16_cpu()], callbacks=[AccumulationScheduler({0: 2}, normalize="tokens"), scales]
    )
    trainer.fit(module, datamodule=_dm())
    items = int((module.micro_batches[0]["labels"] != -100).sum())
    assert items > 2 and scales.scales[0] == _scale_for(items) < 2.0**16
    first = step_windows(module.snapshots)[0]
    assert not all(torch.equal(first[2][k], first[3][k]) for k in first[2])  # the first step was taken


def test_fp16_summed_losses_take_every_step_of_uneven_windows():
    """CPU twin of ``tests/gpu/test_precision.py::test_accumulation_exact_under_amp[tokens-16-mixed]``: micro-batches
    of 1 to 9 items, windows of 3 and the epoch's last of 1 (divisor 1). A scale lowered by the first window's
    ``items / divisor`` (3 / 3: none) overflowed fp16 in the last two windows; lowered by ``items`` every step runs."""
    module = SumLossModule(reduction="sum")
    scales = _Scales()
    callback = AccumulationScheduler({0: 3}, normalize="tokens")
    cpu_trainer(max_epochs=1, plugins=[_fp16_cpu()], callbacks=[callback, scales]).fit(module, datamodule=_dm())
    steps = step_windows(module.snapshots)
    items = [int((b["labels"] != -100).sum()) for b in module.micro_batches]
    assert [end - start for start, end, _, _ in steps] == [3, 3, 1] and max(items) > 2 * items[0]
    assert scales.scales == [_scale_for(items[0])] * 3  # no overflow: GradScaler never halved it
    for _, _, before, after in steps:  # no step skipped
        assert not all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scheduling={}), "non-empty"),
        (dict(scheduling={0: 0}), "positive integers, got 0"),
        (dict(scheduling={-1: 2}), "non-negative integers .*got -1"),
        (dict(scheduling={0: 2}, interval="batch"), "`interval` must be 'epoch' or 'step', got 'batch'"),
        (dict(scheduling={0: 2}, normalize="sum"), "`normalize` must be 'mean' or 'tokens', got 'sum'"),
        (dict(scheduling={0: 2}, count_items=len), "only used with normalize='tokens', got normalize='mean'"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AccumulationScheduler(**kwargs)


def test_conflicts_with_trainer_accumulation():
    trainer = cpu_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[AccumulationScheduler({0: 2})])
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer.fit(SumLossModule(reduction="mean"), datamodule=_dm())
    assert trainer.accumulate_grad_batches == 2  # left as the user set it


def test_manual_optimisation_is_a_clear_error():
    module = SumLossModule(reduction="mean")
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="needs automatic optimisation"):
        cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 2})]).fit(module, datamodule=_dm())


class _AccumulatingStrategy(SingleDeviceStrategy):
    """Stands in for DeepSpeed, which accumulates gradients itself."""

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True


def test_strategy_that_accumulates_itself_is_refused():
    trainer = cpu_trainer(
        max_epochs=1,
        strategy=_AccumulatingStrategy(device=torch.device("cpu")),
        callbacks=[AccumulationScheduler({0: 2})],
    )
    with pytest.raises(ValueError, match="_AccumulatingStrategy accumulates gradients itself"):
        trainer.fit(SumLossModule(reduction="mean"), datamodule=_dm())


def test_missing_labels_is_a_clear_error():
    dm = BucketDataModule([{"input_ids": [1, 2, 3]}] * 4, pad_token_id=0, batch_size=2)
    with pytest.raises(KeyError, match="count_items"):
        cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 2}, normalize="tokens")]).fit(
            SumLossModule(reduction="sum"), datamodule=dm
        )


class _CountsSteps(BoringModel):
    def on_train_start(self) -> None:
        self.total_steps = estimated_optimizer_steps(self.trainer)


@pytest.mark.parametrize(
    ("trainer_kwargs", "loader", "match"),
    [
        (dict(max_epochs=1), DataLoader(RandomIterableDataset(32, 8), batch_size=2), "training loader has no length"),
        (dict(max_epochs=-1, max_steps=-1), DataLoader(RandomDataset(32, 8), batch_size=2), "Infinite training"),
    ],
)
def test_step_count_errors(trainer_kwargs, loader, match):
    trainer = cpu_trainer(limit_val_batches=0, callbacks=[AccumulationScheduler({0: 2})], **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(_CountsSteps(), train_dataloaders=loader)


def test_accumulate_grad_batches_changed_elsewhere_is_an_error():
    class Meddle(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                trainer.accumulate_grad_batches = 7

    trainer = cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 3}), Meddle()])
    with pytest.raises(RuntimeError, match="changed to 7 inside a window for which AccumulationScheduler set 3"):
        trainer.fit(SumLossModule(reduction="mean"), datamodule=_dm())


# ---------------------------------------------------------------------------------------------------------------------
# two ranks


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("normalize", "scheduling", "interval"),
    [("tokens", {0: 2}, "epoch"), ("mean", {0: 2}, "epoch"), ("tokens", {0: 1, 2: 3}, "step")],
)
def test_two_ranks_step_is_the_global_window_gradient(tmp_path, normalize, scheduling, interval):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean", record_dir=str(tmp_path))
    callback = AccumulationScheduler(scheduling, interval=interval, normalize=normalize)
    trainer = cpu_trainer(max_epochs=1, devices=2, strategy="ddp_spawn", callbacks=[callback])
    trainer.fit(module, datamodule=_dm())
    windows = _synced_windows(tmp_path)
    n = sum(len(m0) for _, _, m0, _ in windows)  # micro-batches per rank (the main process never set up a loader)
    # both ranks stepped where the plan says (Lightning's no_sync follows the same decision as its step)
    assert (
        [len(m0) for _, _, m0, _ in windows]
        == [len(m1) for *_, m1 in windows]
        == _expected_sizes(n, 1, scheduling, interval)
    )
    for before, after, micro0, micro1 in windows:
        if normalize == "mean":  # mean over ranks of per-rank means over micro-batches
            ref0 = _reference_grad(before, micro0, "mean")
            ref1 = _reference_grad(before, micro1, "mean")
            ref = {k: (ref0[k] + ref1[k]) / 2 for k in ref0}
        else:
            ref = _reference_grad(before, micro0 + micro1, "tokens")
        for name, g in ref.items():
            torch.testing.assert_close(before[name] - after[name], g, rtol=1e-5, atol=1e-7)


class _RankScales(pl.Callback):
    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.scales, Path(self.record_dir) / f"scales{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_two_ranks_fp16_start_at_the_same_loss_scale(tmp_path):
    """Each rank's first micro-batch holds a different item count; the lowered initial scale is the same on both
    (from the larger count), else DDP would average gradients scaled differently and the ranks would drift apart."""
    module = SumLossModule(reduction="sum", record_dir=str(tmp_path))
    trainer = cpu_trainer(
        max_steps=3,
        devices=2,
        strategy="ddp_spawn",
        plugins=[_fp16_cpu()],
        callbacks=[AccumulationScheduler({0: 2}, normalize="tokens"), _RankScales(str(tmp_path))],
    )
    trainer.fit(module, datamodule=_dm())
    _synced_windows(tmp_path)  # identical weights on both ranks after every step
    ranks = [torch.load(Path(tmp_path) / f"rank{r}.pt") for r in range(2)]
    items = [int((r["micro"][0]["labels"] != -100).sum()) for r in ranks]
    assert _scale_for(items[0]) != _scale_for(items[1])  # each rank's own count would give another scale
    scales = [torch.load(Path(tmp_path) / f"scales{r}.pt") for r in range(2)]
    assert scales[0] == scales[1] and scales[0][0] == _scale_for(max(items))

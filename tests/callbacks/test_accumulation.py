from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_txopt.callbacks.accumulation import (
    AccumulationScheduler,
    causal_lm_items,
    count_optimizer_steps,
    estimated_optimizer_steps,
    factor_at,
)
from lightning_txopt.data import BucketDataModule
from tests.helpers import cpu_trainer, make_samples, tiny_bert


class SumLossModule(pl.LightningModule):
    """Returns the loss summed over its items (normalize='tokens') or their mean; records every micro-batch."""

    def __init__(self, reduction: str = "sum", record_dir: str | None = None, lr_schedule: bool = False) -> None:
        super().__init__()
        self.model = tiny_bert()
        self.reduction = reduction
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
        self.snapshots.append((self.trainer.global_step, self._params()))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.snapshots.append((self.trainer.global_step, self._params()))

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        self.total_steps = estimated_optimizer_steps(self.trainer)
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


def _dm(**kwargs) -> BucketDataModule:
    defaults = dict(pad_token_id=0, max_tokens=96, seed=4)  # token budget: uneven samples per micro-batch
    defaults.update(kwargs)
    return BucketDataModule(_samples(), **defaults)


def _windows(snapshots: list[tuple[int, dict]]) -> list[tuple[int, int, dict, dict]]:
    """(first micro-batch, end micro-batch, params before, params after) of each optimizer step."""
    out = []
    start, before = 0, snapshots[0][1]
    for i in range(1, len(snapshots)):
        if snapshots[i][0] != snapshots[i - 1][0]:
            out.append((start, i, before, snapshots[i][1]))
            start, before = i, snapshots[i][1]
    return out


def _synced_windows(record_dir: Any) -> list[tuple[dict, dict, list[dict], list[dict]]]:
    """The optimizer steps two recorded ranks ran: ``(weights before, after, rank 0's micro-batches, rank 1's)``.

    Asserts that both ranks stepped the same number of times (at least twice) and hold identical weights after each.
    """
    ranks = [torch.load(Path(record_dir) / f"rank{r}.pt") for r in range(2)]
    windows = [_windows(r["snapshots"]) for r in ranks]
    assert len(windows[0]) == len(windows[1]) >= 2
    out = []
    for (s0, e0, before, after), (s1, e1, _, after1) in zip(windows[0], windows[1]):
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
        total = sum(module.loss(b) for b in micro) / items
    else:
        total = sum(module.loss(b) for b in micro) / len(micro)
    total.backward()
    return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


def _check_windows(module: SumLossModule, normalize: str, expected_sizes: list[int] | None = None) -> None:
    windows = _windows(module.snapshots)
    assert windows
    if expected_sizes is not None:
        assert [end - start for start, end, _, _ in windows] == expected_sizes
    for start, end, before, after in windows:
        ref = _reference_grad(before, module.micro_batches[start:end], normalize)
        for name, g in ref.items():
            delta = before[name] - after[name]
            torch.testing.assert_close(
                delta, g, rtol=1e-5, atol=1e-7, msg=lambda m, s=start, e=end, n=name: f"window {s}:{e} {n}: {m}"
            )


@pytest.mark.parametrize("normalize", ["tokens", "mean"])
def test_each_step_is_the_exact_window_gradient_with_final_incomplete_window(normalize):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean")
    trainer = cpu_trainer(max_epochs=2, callbacks=[AccumulationScheduler({0: 3}, normalize=normalize)])
    trainer.fit(module, datamodule=_dm())
    n = trainer.num_training_batches
    assert n % 3 != 0  # the last window of each epoch is incomplete
    sizes = ([3] * (n // 3) + [n % 3]) * 2
    _check_windows(module, normalize, sizes)
    assert module.total_steps == len(sizes) == trainer.global_step


def test_lightning_native_accumulation_is_not_exact():
    """The same check against Lightning's own accumulate_grad_batches fails: that is what the callback fixes."""
    module = SumLossModule(reduction="mean")
    trainer = cpu_trainer(max_epochs=1, accumulate_grad_batches=3)
    trainer.fit(module, datamodule=_dm())
    with pytest.raises(AssertionError):
        _check_windows(module, "mean")  # the final incomplete window is divided by 3, not by its size


def test_epoch_schedule_counts_and_logs():
    module = SumLossModule(reduction="mean", lr_schedule=True)
    callback = AccumulationScheduler({0: 1, 1: 4})
    trainer = cpu_trainer(max_epochs=3, callbacks=[callback])
    trainer.fit(module, datamodule=_dm())
    n = trainer.num_training_batches
    expected = n + 2 * -(-n // 4)
    assert trainer.global_step == expected == module.total_steps == callback.optimizer_steps
    assert trainer.callback_metrics["accumulation/factor"] == 4
    _check_windows(module, "mean", [1] * n + ([4] * (n // 4) + ([n % 4] if n % 4 else [])) * 2)


def test_step_schedule_realigns_and_counts():
    module = SumLossModule(reduction="sum")
    callback = AccumulationScheduler({0: 1, 3: 4}, interval="step", normalize="tokens")
    trainer = cpu_trainer(max_epochs=2, callbacks=[callback])
    trainer.fit(module, datamodule=_dm())
    n = trainer.num_training_batches
    assert trainer.global_step == module.total_steps == count_optimizer_steps(n, 2, {0: 1, 3: 4}, "step")
    # steps 0-2: single batches; from step 3 windows end at multiples of 4 counted from the epoch start
    sizes, steps = [], 0
    for _ in range(2):
        pos = 0
        while pos < n:
            k = 1 if steps < 3 else 4
            end = min((pos // k + 1) * k, n)
            sizes.append(end - pos)
            pos, steps = end, steps + 1
    assert sizes[:4] == [1, 1, 1, 1]
    _check_windows(module, "tokens", sizes)


def test_mid_epoch_resume_keeps_the_factor(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    full = SumLossModule(reduction="sum")
    cb = AccumulationScheduler({0: 1, 1: 3}, normalize="tokens")
    trainer = cpu_trainer(max_epochs=3, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(full, datamodule=_dm())
    n = trainer.num_training_batches
    # a checkpoint inside epoch 1 (factor 3), not at its start
    steps_epoch0 = n
    step = next(s for s in range(2, trainer.global_step, 2) if steps_epoch0 < s < steps_epoch0 + -(-n // 3))
    resumed = SumLossModule(reduction="sum")
    cb2 = AccumulationScheduler({0: 1, 1: 3}, normalize="tokens")
    t2 = cpu_trainer(max_epochs=3, callbacks=[cb2])
    t2.fit(resumed, datamodule=_dm(), ckpt_path=str(tmp_path / f"step={step}.ckpt"))
    assert t2.global_step == trainer.global_step
    for name, p in full.model.named_parameters():
        torch.testing.assert_close(resumed.model.get_parameter(name), p, rtol=1e-5, atol=1e-6)
    assert cb2.factor == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scheduling={}), "non-empty"),
        (dict(scheduling={0: 0}), "positive"),
        (dict(scheduling={-1: 2}), "non-negative"),
        (dict(scheduling={0: 2}, interval="batch"), "interval"),
        (dict(scheduling={0: 2}, normalize="sum"), "normalize"),
        (dict(scheduling={0: 2}, count_items=len), "only used with"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AccumulationScheduler(**kwargs)


def test_conflicts_with_trainer_accumulation():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        cpu_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[AccumulationScheduler({0: 2})]).fit(
            SumLossModule(), datamodule=_dm()
        )


def test_missing_labels_is_a_clear_error():
    class NoLabels(SumLossModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    dm = BucketDataModule([{"input_ids": [1, 2, 3]}] * 4, pad_token_id=0, batch_size=2)
    with pytest.raises(KeyError, match="count_items"):
        cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 2}, normalize="tokens")]).fit(
            NoLabels(), datamodule=dm
        )


def test_yaml_style_keys_and_helpers():
    assert AccumulationScheduler({"0": 2, "3": 4}).scheduling == {0: 2, 3: 4}
    assert factor_at({2: 4}, 0) == 1
    assert int(causal_lm_items({"labels": torch.tensor([[1, 2, -100]])})) == 1


@pytest.mark.ddp
@pytest.mark.parametrize("normalize", ["tokens", "mean"])
def test_two_ranks_step_is_the_global_window_gradient(tmp_path, normalize):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean", record_dir=str(tmp_path))
    trainer = cpu_trainer(
        max_epochs=1, devices=2, strategy="ddp_spawn", callbacks=[AccumulationScheduler({0: 2}, normalize=normalize)]
    )
    trainer.fit(module, datamodule=_dm())
    for before, after, micro0, micro1 in _synced_windows(tmp_path):
        if normalize == "mean":  # mean over ranks of per-rank means over micro-batches
            ref0 = _reference_grad(before, micro0, "mean")
            ref1 = _reference_grad(before, micro1, "mean")
            ref = {k: (ref0[k] + ref1[k]) / 2 for k in ref0}
        else:
            ref = _reference_grad(before, micro0 + micro1, "tokens")
        for name, g in ref.items():
            torch.testing.assert_close(before[name] - after[name], g, rtol=1e-5, atol=1e-7)


def test_manual_optimisation_is_a_clear_error():
    class Manual(SumLossModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimisation"):
        cpu_trainer(max_epochs=1, callbacks=[AccumulationScheduler({0: 2})]).fit(Manual(), datamodule=_dm())

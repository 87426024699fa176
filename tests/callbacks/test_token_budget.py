"""TokenBudgetFinder on CPU with a fake memory probe (SavedTensorsMemory: activation bytes, simulated OOM).

References: a run without the finder at the budget it found (identical weights: the probes left no trace), a run
resumed from a checkpoint (the saved budget, no probe), an exhaustive scan of budgets (the largest that fits), and
two gloo ranks of which one runs out of memory sooner (they agree, nobody hangs).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_txopt import TokenBudgetFinder, TransformerModule
from lightning_txopt.callbacks import (
    GradientCheckpointing,
    StepProber,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
)
from lightning_txopt.callbacks.token_budget import _check_strategy, _logging_discarded, _shapes
from lightning_txopt.data import BucketBatchSampler, BucketDataModule, PaddingCollator
from lightning_txopt.memory import CudaMemory, SavedTensorsMemory, _memory_fraction, checkpointing_candidates
from tests.helpers import BERT_DICT, ModelModule, as_dataset, cpu_trainer, make_samples, tiny_bert

CONFIG = {**BERT_DICT, "hidden_dropout_prob": 0.1}  # dropout on: the probes must restore the random generators
SAMPLES = make_samples(160, seed=1, max_len=40)
CAPACITY = 1_000_000  # activation bytes of the pretend device: ~500 tokens fit (the data holds ~1,900)


class BudgetDataModule(pl.LightningDataModule):
    """A DataModule that follows the token-budget protocol of ``BucketDataModule(max_tokens="auto")``.

    Stand-in until main's BucketDataModule implements it: ``max_tokens`` is ``"auto"`` until
    ``set_token_budget``; ``probe_batches`` collates the widest batch, the one with the most rows and the one with
    the most padded tokens of the (shuffled) plan at a budget; ``token_budget_multiple``; ``min_token_budget``.
    """

    def __init__(self, samples: list[dict], max_tokens: int | str = "auto", multiple: int = 8) -> None:
        super().__init__()
        self.samples = [{k: v for k, v in s.items() if k != "idx"} for s in samples]
        self.lengths = np.array([len(s["input_ids"]) for s in samples])
        self.max_tokens = max_tokens
        self.token_budget_multiple = multiple
        self.min_token_budget = -(-int(self.lengths.max()) // multiple) * multiple
        self.collate = PaddingCollator(0)
        self.probed: list[int] = []

    def set_token_budget(self, max_tokens: int) -> None:
        if not isinstance(max_tokens, int) or max_tokens % self.token_budget_multiple:
            raise ValueError(f"bad budget {max_tokens!r}")
        self.max_tokens = max_tokens

    def _plan(self, budget: int, **kwargs: Any) -> BucketBatchSampler:
        return BucketBatchSampler(self.lengths, max_tokens=budget, seed=0, **kwargs)

    def probe_batches(self, max_tokens: int) -> list[dict[str, torch.Tensor]]:
        self.probed.append(max_tokens)
        plan = [list(b) for b in self._plan(max_tokens, num_replicas=1, rank=0)]
        width = [int(self.lengths[b].max()) for b in plan]
        picks = {int(np.argmax(width)), int(np.argmax([len(b) for b in plan]))}
        picks.add(int(np.argmax([len(b) * w for b, w in zip(plan, width, strict=True)])))
        return [self.collate([self.samples[i] for i in plan[j]]) for j in sorted(picks)]

    def train_dataloader(self) -> Any:
        if self.max_tokens == "auto":
            raise RuntimeError("max_tokens='auto': add TokenBudgetFinder to the Trainer's callbacks.")
        trainer = self.trainer
        replicas = dict(num_replicas=trainer.world_size, rank=trainer.global_rank) if trainer else {}
        sampler = self._plan(int(self.max_tokens), **replicas)
        return torch.utils.data.DataLoader(as_dataset(self.samples), batch_sampler=sampler, collate_fn=self.collate)


class RankMemory(SavedTensorsMemory):
    """Rank 1's device holds ``oom_bytes`` only (another process uses the rest): it runs out of memory below the
    limit both ranks agreed on. Records the live bytes of each such out-of-memory error."""

    def __init__(self, capacity: int, oom_bytes: int) -> None:
        super().__init__(capacity)
        self.oom_bytes = oom_bytes
        self.ooms: list[int] = []

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        out = super()._pack(tensor)
        if torch.distributed.get_rank() == 1 and self._live > self.oom_bytes:
            self.ooms.append(self._live)
            raise torch.OutOfMemoryError("simulated: rank 1 is full")
        return out


class OutOfMemoryAt(SavedTensorsMemory):
    """Runs out of memory (simulated, in the middle of the forward pass) in the n-th probe, whatever its size."""

    def __init__(self, capacity: int, probe: int) -> None:
        super().__init__(capacity)
        self.probe, self.blocks = probe, 0

    def tracking(self, device: torch.device) -> Any:
        self.blocks += 1
        return super().tracking(device)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        out = super()._pack(tensor)
        if self.blocks == self.probe and self._live > 10_000:
            raise torch.OutOfMemoryError("simulated: this probe runs out of memory")
        return out


def module(**kwargs: Any) -> TransformerModule:
    torch.manual_seed(0)
    defaults: dict[str, Any] = dict(config=CONFIG, num_labels=3, learning_rate=1e-3, warmup=0)
    defaults.update(kwargs)
    return TransformerModule(**defaults)


def plain() -> ModelModule:
    """Any LightningModule (here AdamW at a constant LR, no dropout: Lightning does not checkpoint generators)."""
    return ModelModule(tiny_bert(num_hidden_layers=2), optimizer="adamw", lr=1e-3)


def finder(**kwargs: Any) -> TokenBudgetFinder:
    kwargs.setdefault("memory", SavedTensorsMemory(CAPACITY))
    return TokenBudgetFinder(**kwargs)


def params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_memory_fraction=0.0), "max_memory_fraction"),
        (dict(max_memory_fraction=1.5), "max_memory_fraction"),
        (dict(min_tokens=0), "min_tokens"),
        (dict(max_tokens=-64), "max_tokens"),
        (dict(multiple=True), "multiple"),
        (dict(min_tokens=1024, max_tokens=512), "min_tokens"),
        (dict(probe_steps=0), "probe_steps"),
        (dict(max_probes=0), "max_probes"),
        (dict(tolerance=1.0), "tolerance"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenBudgetFinder(**kwargs)


def test_numpy_integer_arguments_are_kept_as_plain_ints():
    f = TokenBudgetFinder(
        min_tokens=np.int64(64), max_tokens=np.int32(512), multiple=np.int64(8), max_probes=np.int8(4)
    )
    assert all(type(v) is int for v in (f.min_tokens, f.max_tokens, f.multiple, f.max_probes, f.probe_steps))


def test_unsupported_strategy_is_refused():
    class Fake:
        strategy = object()

    with pytest.raises(ValueError, match="probes single-device and DDP"):
        _check_strategy(Fake(), "TokenBudgetFinder")  # type: ignore[arg-type]


def test_needs_the_datamodule_protocol():
    dm = pl.LightningDataModule.from_datasets(train_dataset=as_dataset(SAMPLES), batch_size=4)
    with pytest.raises(ValueError, match="lacks"):
        cpu_trainer(max_steps=1, callbacks=[finder()]).fit(module(), datamodule=dm)


def test_refuses_a_fixed_budget():
    with pytest.raises(ValueError, match="max_tokens='auto'"):
        cpu_trainer(max_steps=1, callbacks=[finder()]).fit(module(), datamodule=BudgetDataModule(SAMPLES, 256))


def test_refuses_manual_optimisation():
    class Manual(TransformerModule):
        def __init__(self) -> None:
            super().__init__(config=CONFIG, num_labels=3)
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimisation"):
        cpu_trainer(max_steps=1, callbacks=[finder()]).fit(Manual(), datamodule=BudgetDataModule(SAMPLES))


def test_multiple_must_be_a_multiple_of_the_datamodules():
    with pytest.raises(ValueError, match="not a multiple of the DataModule's token_budget_multiple=8"):
        cpu_trainer(max_steps=1, callbacks=[finder(multiple=12)]).fit(module(), datamodule=BudgetDataModule(SAMPLES))


def test_needs_cuda_by_default():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cpu_trainer(max_steps=1, callbacks=[TokenBudgetFinder()]).fit(module(), datamodule=BudgetDataModule(SAMPLES))


class _Preparing(SavedTensorsMemory):
    """Records :meth:`prepare` calls and says it changed something."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.prepared: list[torch.device] = []

    def prepare(self, device: torch.device) -> str | None:
        self.prepared.append(device)
        return "prepared the device"


def test_setup_prepares_the_device_before_probing_and_logs_it(caplog):
    """CudaMemory.prepare turns on expandable segments there (tests/test_memory.py); the finder calls it in setup,
    before the model moves to the device, and logs what changed; so does a resumed run (a saved budget)."""
    memory = _Preparing(CAPACITY)
    f = finder(memory=memory)
    with caplog.at_level("INFO", logger="lightning_txopt"):
        _fit([f], BudgetDataModule(SAMPLES), steps=1)
    assert memory.prepared == [torch.device("cpu")]
    assert "TokenBudgetFinder: prepared the device" in caplog.text
    _fit([f], BudgetDataModule(SAMPLES), steps=1)  # the budget is kept: no probe, but prepared again
    assert len(memory.prepared) == 2


def test_nothing_fits():
    with pytest.raises(RuntimeError, match="even min_tokens=40"):
        cpu_trainer(max_steps=1, callbacks=[finder(memory=SavedTensorsMemory(10_000))]).fit(
            module(), datamodule=BudgetDataModule(SAMPLES)
        )


# ---------------------------------------------------------------------------------------------- the search, exact
def _fit(callbacks: list[Callback], dm: pl.LightningDataModule, steps: int = 6, **kwargs: Any) -> TransformerModule:
    m = kwargs.pop("model", None) or module()
    cpu_trainer(max_steps=steps, callbacks=callbacks, **kwargs).fit(m, datamodule=dm)
    return m


def test_finds_a_budget_and_leaves_no_trace():
    """The run with the finder equals a run without it at the budget it found: weights, optimizer, generators."""
    f = finder(memory=OutOfMemoryAt(CAPACITY, probe=2))  # the second probe fails mid-forward
    dm = BudgetDataModule(SAMPLES)
    with_finder = _fit([f], dm)
    assert f.budget is not None and dm.max_tokens == f.budget and f.budget % 8 == 0
    assert f.search is not None and f.search.stopped == "bracketed"
    assert any(peak is None for _, peak in f.search.probes)  # a simulated OOM happened and was recovered from
    assert dm.probed == [b for b, _ in f.search.probes]
    reference = _fit([], BudgetDataModule(SAMPLES, f.budget))
    assert_same(params(with_finder), params(reference))


class _Calls(OutOfMemoryAt):
    """Records the order of the finder's calls to its DeviceMemory."""

    def __init__(self, capacity: int, probe: int) -> None:
        super().__init__(capacity, probe)
        self.calls: list[str] = []
        self.limits: list[float] = []

    def tracking(self, device: torch.device) -> Any:
        self.calls.append("track")
        return super().tracking(device)

    @contextlib.contextmanager
    def limited(self, device: torch.device, limit: float) -> Iterator[None]:
        self.calls.append("limit")
        self.limits.append(limit)
        with super().limited(device, limit):
            yield

    def release(self, device: torch.device) -> None:
        self.calls.append("release")
        super().release(device)


def test_every_probe_after_the_first_starts_from_a_released_device():
    """Each probe runs capped at the limit (CudaMemory: the allocator's per-process fraction) and the device is
    released after every probe (one that ran out of memory too) before the next one's tracking
    restarts the peak: under CudaMemory, garbage collected, the allocator's cache emptied, the peak counters reset,
    so no probe's peak holds what an earlier probe left cached. (Within one probe the batches run back to back: a
    later, larger batch that cannot reuse an earlier one's freed blocks reserves more; that is measured, as training
    meets it.)"""
    memory = _Calls(CAPACITY, probe=2)
    f = finder(memory=memory)
    _fit([f], BudgetDataModule(SAMPLES), steps=1)
    assert f.search is not None and f.search.probes[1][1] is None  # the second probe ran out of memory
    assert memory.calls == ["limit", "track", "release"] * len(f.search.probes) + ["release"]  # last: restored
    assert memory.limits == [f.search.limit] * len(f.search.probes)  # each probe runs as on a device of the limit


def test_chosen_budget_against_an_exhaustive_scan():
    """The largest multiple of 8 whose probe batches fit, scanned one by one: the finder is within its tolerance."""
    f = finder(tolerance=0.02)
    _fit([f], BudgetDataModule(SAMPLES), steps=1)
    assert f.search is not None and f.budget is not None
    limit = 0.9 * CAPACITY
    memory = SavedTensorsMemory(10**12)
    m = module()
    dm = BudgetDataModule(SAMPLES)

    def peak(budget: int) -> int:
        worst = 0
        for batch in dm.probe_batches(budget):
            with memory.tracking(torch.device("cpu")):
                m.loss_and_items(batch, "mean")[0].backward()
            worst = max(worst, memory.peak(torch.device("cpu")))
        return worst

    best = max(b for b in range(40, 2 * f.budget, 8) if peak(b) <= limit)
    assert f.budget <= best and f.budget >= best * (1 - 0.02) - 8
    probed = f.search.peak_of(f.budget)
    assert probed is not None and abs(probed - peak(f.budget)) / peak(f.budget) < 0.05  # the probe measured the same


class _Peaks(Callback):
    """Measures every training step with a SavedTensorsMemory (simulated OOM at its capacity)."""

    def __init__(self, memory: SavedTensorsMemory) -> None:
        self.memory = memory
        self.peaks: list[int] = []
        self._ctx: AbstractContextManager[None] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._ctx = self.memory.tracking(torch.device("cpu"))
        self._ctx.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert self._ctx is not None
        self._ctx.__exit__(None, None, None)
        self.peaks.append(self.memory.peak(torch.device("cpu")))


def test_the_found_budget_never_runs_out_of_memory_over_three_epochs():
    f = finder()
    peaks = _Peaks(SavedTensorsMemory(CAPACITY))  # raises torch.OutOfMemoryError past the capacity
    _fit([f, peaks], BudgetDataModule(SAMPLES), steps=-1, max_epochs=3)
    assert peaks.peaks and max(peaks.peaks) <= 0.9 * CAPACITY


@pytest.mark.parametrize("precision", ["fp16", "bf16-mixed", "accumulate"])
def test_exact_under_mixed_precision_and_accumulation(precision):
    """fp16 (GradScaler state restored), bf16 autocast, and two-batch accumulation windows."""
    kwargs: dict[str, Any] = {}
    if precision == "fp16":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    elif precision == "bf16-mixed":
        kwargs["precision"] = "bf16-mixed"
    else:
        kwargs["accumulate_grad_batches"] = 2
    f = finder()
    trainer_kwargs = copy.copy(kwargs)
    with_finder = _fit([f], BudgetDataModule(SAMPLES), steps=4, **trainer_kwargs)
    assert f.budget is not None
    if precision == "fp16":
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    reference = _fit([], BudgetDataModule(SAMPLES, f.budget), steps=4, **kwargs)
    assert_same(params(with_finder), params(reference))


def test_restores_state_exactly_before_training():
    """Around the probes alone (max_steps=0): weights, optimizer state (empty), GradScaler and generators as in the
    same fit without the finder."""

    def fit(callbacks: list[Callback], dm: pl.LightningDataModule) -> tuple[Any, ...]:
        m = module()
        plugin = MixedPrecision("16-mixed", "cpu")
        torch.manual_seed(123)
        trainer = cpu_trainer(max_steps=0, callbacks=callbacks, plugins=[plugin])
        trainer.fit(m, datamodule=dm)
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        state = trainer.optimizers[0].state_dict()["state"]
        assert plugin.scaler is not None
        return params(m), state, plugin.scaler.get_scale(), grads, torch.get_rng_state()

    f = finder()
    weights, state, scale, grads, rng = fit([f], BudgetDataModule(SAMPLES))
    assert f.search is not None and len(f.search.probes) > 2 and f.budget is not None
    ref_weights, ref_state, ref_scale, _, ref_rng = fit([], BudgetDataModule(SAMPLES, f.budget))
    assert_same(weights, ref_weights)
    assert torch.equal(rng, ref_rng)
    assert state == ref_state == {} and scale == ref_scale and grads == []


def test_logs_and_checkpoints_the_budget_and_resumes_without_probing(tmp_path):
    f = finder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    trainer = cpu_trainer(max_epochs=1, callbacks=[f, ckpt], enable_checkpointing=True)
    first = plain()
    trainer.fit(first, datamodule=BudgetDataModule(SAMPLES))
    assert trainer.callback_metrics["token_budget"] == f.budget
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["TokenBudgetFinder"]
    assert f.search is not None
    assert state["max_tokens"] == f.budget and len(state["probes"]) == len(f.search.probes)

    resumed_finder = finder(memory=SavedTensorsMemory(10))  # would find nothing: it must not probe
    dm = BudgetDataModule(SAMPLES)
    resumed = plain()
    cpu_trainer(max_epochs=2, callbacks=[resumed_finder]).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "last.ckpt")
    assert dm.probed == [] and dm.max_tokens == f.budget and resumed_finder.budget == f.budget

    reference = plain()
    cpu_trainer(max_epochs=2).fit(reference, datamodule=BudgetDataModule(SAMPLES, f.budget))
    assert_same(params(resumed), params(reference))


def test_resume_conflicting_with_a_fixed_budget():
    f = finder()
    f.load_state_dict({"max_tokens": 256})
    with pytest.raises(ValueError, match="conflicts with the budget TokenBudgetFinder saved"):
        _fit([f], BudgetDataModule(SAMPLES, 512), steps=1)


def test_bounds_and_granularity():
    f = finder(min_tokens=64, max_tokens=200, multiple=32)
    dm = BudgetDataModule(SAMPLES)
    _fit([f], dm, steps=1)
    assert f.search is not None and f.search.stopped == "max_tokens"
    assert f.budget == 192 and all(b % 32 == 0 and 64 <= b <= 192 for b, _ in f.search.probes)


def test_logging_is_discarded_inside_probes_only():
    m = module()
    with _logging_discarded(m), warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's own log warns without a Trainer: these calls reach nothing
        m.log("x", 1.0)
        m.log_dict({"x": 1.0})
    assert "log" not in vars(m) and "log_dict" not in vars(m)
    assert m.log.__func__ is pl.LightningModule.log  # type: ignore[attr-defined]


def test_a_module_that_does_not_step_is_refused():
    class NoStep(TransformerModule):
        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            pass

    m = NoStep(config=CONFIG, num_labels=3)
    with pytest.raises(RuntimeError, match=r"did not call optimizer\.step"):
        _fit([finder()], BudgetDataModule(SAMPLES), steps=1, model=m)


# ---------------------------------------------------------------------------------------------- two ranks
class _Record(Callback):
    def __init__(self, out: str, f: TokenBudgetFinder) -> None:
        self.out, self.f = out, f

    def on_train_start(self, trainer, pl_module):
        search, memory = self.f.search, self.f.memory
        assert isinstance(memory, RankMemory)
        record = {
            "budget": self.f.budget,
            "dm": trainer.datamodule.max_tokens,
            "probes": search.probes if search else None,
            "ooms": memory.ooms,
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.ddp
def test_two_ranks_agree_when_one_runs_out_of_memory(tmp_path):
    f = finder(memory=RankMemory(CAPACITY, oom_bytes=CAPACITY // 3))
    trainer = cpu_trainer(
        max_steps=1, devices=2, strategy="ddp_spawn", use_distributed_sampler=False, callbacks=[f, _Record(tmp_path, f)]
    )
    trainer.fit(module(), datamodule=BudgetDataModule(SAMPLES))
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["budget"] == ranks[1]["budget"] == ranks[0]["dm"] == ranks[1]["dm"]
    assert ranks[0]["probes"] == ranks[1]["probes"]  # the same agreed measurements on both ranks
    assert ranks[1]["ooms"] and not ranks[0]["ooms"]  # rank 1 ran out of memory, rank 0 did not
    # the agreed answer is what rank 1 can hold: a single-process search limited to CAPACITY // 3 agrees
    alone = finder(memory=SavedTensorsMemory(CAPACITY // 3), max_memory_fraction=1.0)
    _fit([alone], BudgetDataModule(SAMPLES), steps=1)
    assert alone.budget is not None and ranks[0]["budget"] <= alone.budget * 1.03 + 8
    assert ranks[0]["budget"] >= alone.budget * 0.97 - 8


class _RankShapes(BudgetDataModule):
    """Over 10,000 tokens rank 1 probes one more copy of its first batch. Past the dataset's size rank 0's batches
    stop changing while rank 1's change once more: a measurement that only rank 0 could reuse must be made on both
    (a rank that skipped it would leave the other waiting in its collectives)."""

    def probe_batches(self, max_tokens: int) -> list[dict[str, torch.Tensor]]:
        batches = super().probe_batches(max_tokens)
        if self.trainer is not None and self.trainer.global_rank == 1 and max_tokens > 10_000:
            batches = [batches[0], *batches]
        return batches


class _RecordCalls(Callback):
    def __init__(self, out: str, f: TokenBudgetFinder) -> None:
        self.out, self.f = out, f

    def on_train_start(self, trainer, pl_module):
        memory = self.f.memory
        assert isinstance(memory, _Calls) and self.f.search is not None
        record = {"probes": self.f.search.probes, "measured": memory.calls.count("track")}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.ddp
def test_ranks_whose_batches_differ_measure_in_lockstep(tmp_path):
    f = finder(memory=_Calls(10**12, probe=0))
    trainer = cpu_trainer(
        max_steps=1,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
        callbacks=[f, _RecordCalls(tmp_path, f)],
    )
    trainer.fit(module(), datamodule=_RankShapes(make_samples(40, seed=3, max_len=20)))
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["probes"] == ranks[1]["probes"]
    assert ranks[0]["measured"] == ranks[1]["measured"] == len(ranks[0]["probes"])  # nothing reused: lockstep


# ---------------------------------------------------------------------------------------------- checkpointing
def _AutoCheckpointing(memory: SavedTensorsMemory) -> GradientCheckpointing:
    """GradientCheckpointing(every_n_layers="auto") with a CPU estimate of the memory."""
    return GradientCheckpointing(every_n_layers="auto", memory=memory, max_memory_fraction=0.9)


def _deep(**kwargs: Any) -> TransformerModule:
    return module(config={**CONFIG, "num_hidden_layers": 6}, **kwargs)


def test_checkpointing_to_a_memory_target():
    """The fewest checkpointed blocks that fit, against an exhaustive measurement of every candidate."""
    budget = 320
    m = _deep()
    memory = SavedTensorsMemory(10**12)
    dm = BudgetDataModule(SAMPLES, budget)

    def peak(n: int | None) -> int:
        disable_gradient_checkpointing(m.model)
        if n is not None:
            enable_gradient_checkpointing(m.model, every_n_layers=n)
        worst = 0
        for batch in dm.probe_batches(budget):
            with memory.tracking(torch.device("cpu")):
                m.loss_and_items(batch, "mean")[0].backward()
            worst = max(worst, memory.peak(torch.device("cpu")))
        return worst

    measured = {n: peak(n) for n in [None, *[n for _, n in checkpointing_candidates(6)]]}
    # every 3rd block (2 of 6) fits 0.9 x capacity, every 6th does not. 1% of slack: a probe's steps run in one
    # measurement, the batch that set the last peak first, and the estimate counts what one step leaves to the next
    capacity = int(measured[3] * 1.01 / 0.9) + 1
    assert measured[6] > 0.9 * capacity
    auto = _AutoCheckpointing(SavedTensorsMemory(capacity))
    trained = _fit([auto], BudgetDataModule(SAMPLES, budget), steps=3, model=_deep())
    assert auto.choice is not None and auto.choice.every_n_layers == 3 and auto.choice.checkpointed == 2
    assert auto.choice.fits
    # and the run is exact against checkpointing every 3rd block from the start (the probes left no trace)
    reference = _deep()
    enable_gradient_checkpointing(reference.model, every_n_layers=3)
    _fit([], BudgetDataModule(SAMPLES, budget), steps=3, model=reference)
    assert_same(params(trained), params(reference))


def test_checkpointing_to_a_budget_resumes_with_its_choice_without_probing(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    budget = 320
    auto = _AutoCheckpointing(SavedTensorsMemory(10**12))  # everything fits: the choice is no checkpointing
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _fit([auto, saver], BudgetDataModule(SAMPLES, budget), steps=2, model=_deep(), enable_checkpointing=True)
    assert auto.chosen == 0 and auto.plan is None
    again = _AutoCheckpointing(SavedTensorsMemory(1000))  # would not fit anything: it must not probe again
    resumed = cpu_trainer(max_steps=3, callbacks=[again])
    resumed.fit(_deep(), datamodule=BudgetDataModule(SAMPLES, budget), ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert again.chosen == 0 and again.choice is None  # the saved choice, no probe


def test_checkpointing_to_a_budget_prepares_the_device_in_setup(caplog):
    """As the finder: the memory reader prepares the device (CudaMemory: expandable segments) before the probes."""

    class Ordered(_Preparing):
        def tracking(self, device: torch.device) -> Any:
            assert self.prepared, "probed before prepare()"
            return super().tracking(device)

    memory = Ordered(10**12)
    with caplog.at_level("INFO", logger="lightning_txopt"):
        _fit([_AutoCheckpointing(memory)], BudgetDataModule(SAMPLES, 320), steps=1, model=_deep())
    assert memory.prepared and set(memory.prepared) == {torch.device("cpu")}
    assert "GradientCheckpointing(every_n_layers='auto'): prepared the device" in caplog.text


def test_checkpointing_needs_a_fixed_budget():
    with pytest.raises(ValueError, match="needs a fixed token budget"):
        _fit([_AutoCheckpointing(SavedTensorsMemory(CAPACITY))], BudgetDataModule(SAMPLES), steps=1, model=_deep())


def test_checkpointing_cannot_fit():
    with pytest.raises(RuntimeError, match="even with every block checkpointed"):
        _fit([_AutoCheckpointing(SavedTensorsMemory(1000))], BudgetDataModule(SAMPLES, 320), steps=1, model=_deep())


def test_the_finder_with_checkpointing_finds_a_larger_budget():
    from lightning_txopt.callbacks import GradientCheckpointing

    plain, checkpointed = finder(), finder()
    _fit([plain], BudgetDataModule(SAMPLES), steps=1, model=_deep())
    _fit([GradientCheckpointing(), checkpointed], BudgetDataModule(SAMPLES), steps=1, model=_deep())
    assert plain.budget is not None and checkpointed.budget is not None
    assert checkpointed.budget > 1.5 * plain.budget


# ---------------------------------------------------------------------------------------------- the real DataModule
@pytest.mark.skipif(
    not hasattr(BucketDataModule, "set_token_budget"), reason="BucketDataModule(max_tokens='auto') not on main yet"
)
@pytest.mark.parametrize("strategy", ["bucket", "packed"])
def test_with_the_bucket_datamodule(strategy):
    kwargs: dict[str, Any] = dict(pad_token_id=0, strategy=strategy, max_tokens="auto", seed=0)
    if strategy == "packed":
        kwargs["max_length"] = 48
    dm = BucketDataModule(SAMPLES, **kwargs)
    f = finder()
    m = _fit([f], dm, steps=2)
    assert f.budget is not None and dm.max_tokens == f.budget and f.budget % dm.token_budget_multiple == 0
    reference = _fit([], BucketDataModule(SAMPLES, **{**kwargs, "max_tokens": f.budget}), steps=2)
    assert_same(params(m), params(reference))


def test_step_prober_needs_one_optimizer():
    class Trainer:
        def __init__(self) -> None:
            self.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1) for _ in range(2)]

    with pytest.raises(ValueError, match="exactly one optimizer"):
        StepProber(Trainer(), module(), SavedTensorsMemory(10))  # type: ignore[arg-type]


class _StateSeen(TransformerModule):
    """Records, at each training step, whether the optimizer already had its state (AdamW's moments)."""

    seen: list[bool]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(bool(self.trainer.optimizers[0].state))
        return super().training_step(batch, batch_idx)


class _TwoProbes(Callback):
    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.seen: list[list[bool]] = []

    def on_fit_start(self, trainer, pl_module):
        prober = StepProber(trainer, pl_module, SavedTensorsMemory(10**12), fresh_optimizer=self.fresh)
        pl_module.seen = []
        with prober.preserving_state():
            for _ in range(2):
                prober.measure(lambda: trainer.datamodule.probe_batches(256), limit=1e12)
                self.seen.append(pl_module.seen)
                pl_module.seen = []


@pytest.mark.parametrize("fresh", [True, False])
def test_each_probe_makes_the_optimizer_state_as_the_first_training_step_does(fresh):
    """``fresh_optimizer`` (the finder's setting): each probe starts without the optimizer's state, and its first
    step makes it after its backward, as training's first step does (where it lands decides fragmentation); the
    other steps run with it. Without it, the state is primed before the first probe's steps."""
    torch.manual_seed(0)
    m = _StateSeen(config=CONFIG, num_labels=3, learning_rate=1e-3, warmup=0)
    probe = _TwoProbes(fresh)
    dm = BudgetDataModule(SAMPLES)
    dm.max_tokens = 256
    _fit([probe], dm, steps=1, model=m)
    batches = len(BudgetDataModule(SAMPLES).probe_batches(256))
    assert batches >= 2
    if fresh:
        assert probe.seen == [[False] + [True] * batches] * 2  # a first step on the first batch, then one round
    else:
        assert probe.seen == [[True] * batches] * 2


class _BatchesSeen(TransformerModule):
    """Records the padded tokens of each training step's batch."""

    seen: list[int]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(int(batch["input_ids"].numel()))
        return super().training_step(batch, batch_idx)


class _SmallestFirst(BudgetDataModule):
    """The probe batches in increasing order of padded tokens: the worst is not the first."""

    def probe_batches(self, budget: int) -> list[Any]:
        return sorted(super().probe_batches(budget), key=lambda b: int(b["input_ids"].numel()))


class _WorstFirst(Callback):
    """Two measurements: the first with room to spare, the second with a limit half its peak."""

    def on_fit_start(self, trainer, pl_module):
        memory = SavedTensorsMemory(10**12)
        prober = StepProber(trainer, pl_module, memory, fresh_optimizer=True)
        cpu = torch.device("cpu")
        with prober.preserving_state():
            batches = trainer.datamodule.probe_batches(256)
            self.tokens = [int(b["input_ids"].numel()) for b in batches]
            self.alone = []  # each batch's own peak, measured here one step at a time
            pl_module.seen = []
            for batch in batches:
                with memory.tracking(cpu), torch.enable_grad(), _logging_discarded(pl_module):
                    pl_module.training_step(batch, 0).backward()
                self.alone.append(memory.peak(cpu))
                pl_module.zero_grad(set_to_none=True)
            pl_module.seen = []
            self.first = prober.measure(lambda: trainer.datamodule.probe_batches(256), limit=1e12)
            self.seen_first, pl_module.seen = pl_module.seen, []
            assert self.first is not None
            self.second = prober.measure(lambda: trainer.datamodule.probe_batches(256), limit=self.first / 2)
            self.seen_second = list(pl_module.seen)  # training goes on appending to the list


def test_the_batch_that_set_the_peak_runs_first_and_a_probe_over_the_limit_stops():
    """The next measurement starts with the batch whose step set the last peak (the largest of the batches measured
    one by one), and a measurement stops at the first step over its limit: it fails either way."""
    torch.manual_seed(0)
    m = _BatchesSeen(config=CONFIG, num_labels=3, learning_rate=1e-3, warmup=0)
    probe = _WorstFirst()
    dm = _SmallestFirst(SAMPLES)
    dm.max_tokens = 256
    _fit([probe], dm, steps=1, model=m)
    tokens, alone = probe.tokens, probe.alone
    assert len(tokens) >= 2
    worst = int(np.argmax(alone))
    assert worst != 0  # otherwise the order would not change: the test would show nothing
    assert probe.seen_first == [tokens[0], *tokens]  # the DataModule's order: a fresh step, then one round
    assert probe.seen_second == [tokens[worst]]  # the worst first; its step is over the limit: stopped
    assert probe.first is not None and probe.second is not None and probe.second > probe.first / 2


class _ParameterBytes(SavedTensorsMemory):
    """``current``: the bytes of the module's parameters, their gradients and the optimizer's state tensors."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def current(self, device: torch.device) -> int:
        params = list(self.module.parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in params if p.grad is not None]
        return sum(t.numel() * t.element_size() for t in [*params, *grads, *state])


class _Baseline(Callback):
    def __init__(self, no_room: bool = False) -> None:
        self.no_room = no_room  # the gradients' zeros run out of memory

    def on_fit_start(self, trainer, pl_module):
        memory = _ParameterBytes(10**12)
        memory.module, memory.optimizer = pl_module, trainer.optimizers[0]
        prober = StepProber(trainer, pl_module, memory)
        with prober.preserving_state():
            prober.prime_optimizer()
            if self.no_room:
                zeros_like = torch.zeros_like
                made: list[torch.Tensor] = []

                def short_of_memory(t: torch.Tensor) -> torch.Tensor:
                    if made:
                        raise torch.OutOfMemoryError("no room for a second gradient")
                    made.append(zeros_like(t))
                    return made[0]

                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(torch, "zeros_like", short_of_memory)
                    self.baseline = prober.baseline()
            else:
                self.baseline = prober.baseline()
            self.grads_after = [p.grad for p in pl_module.parameters()]
            self.params = sum(p.numel() * p.element_size() for p in pl_module.parameters())
            self.trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
            self.state = memory.current(pl_module.device) - self.params


def test_the_baseline_holds_weights_optimizer_state_and_gradients():
    """The memory at budget 0 a line extrapolates from: weights, optimizer state and the trainable parameters'
    gradients (made for the reading, gone after it); frozen parameters have none."""
    from lightning_txopt.callbacks import FreezeEmbeddings

    probe = _Baseline()
    dm = BudgetDataModule(SAMPLES)
    dm.max_tokens = 256
    _fit([FreezeEmbeddings(), probe], dm, steps=1)
    assert probe.state > 0 and probe.trainable < probe.params  # AdamW's moments; the frozen embeddings
    assert probe.baseline == probe.params + probe.state + probe.trainable
    assert all(g is None for g in probe.grads_after)


def test_the_baseline_without_room_for_the_gradients_is_read_without_them():
    """Out of memory while making the gradients: the baseline is what is allocated (the first probe then says that
    min_tokens does not fit, with the finder's message), and no zero gradient is left behind."""
    probe = _Baseline(no_room=True)
    dm = BudgetDataModule(SAMPLES)
    dm.max_tokens = 256
    _fit([probe], dm, steps=1)
    assert probe.baseline == probe.params + probe.state
    assert all(g is None for g in probe.grads_after)


# ---------------------------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HOLD = 2**24  # bytes per padded token that _Greedy holds through its forward: an H200 fills at ~8,000 tokens


class _Greedy(TransformerModule):
    """A tiny model that takes 16 MiB per padded token: real out-of-memory errors at a few thousand tokens."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        hold = torch.empty(batch["input_ids"].numel() * HOLD, dtype=torch.uint8, device=self.device)
        loss = super().training_step(batch, batch_idx)
        del hold
        return loss


def _greedy() -> _Greedy:
    torch.manual_seed(0)
    return _Greedy(config=CONFIG, num_labels=3, learning_rate=1e-3, warmup=0, attn_implementation="eager")


GPU_SAMPLES = make_samples(4000, seed=2, max_len=40)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("peak, enforce_limit", [("allocated", True), ("allocated", False), ("reserved", False)])
def test_cuda_budget_near_the_limit(peak, enforce_limit):
    """Real limits and out-of-memory errors; the budget is the finder's bracket on the peaks it measures.

    The default (allocated peak, allocator capped at the limit) and ``peak="allocated"`` uncapped: a probe's peak
    is its largest hold (16 MiB per padded token), so the budget fills the limit; under the cap, a larger hold that
    cannot reuse the block an earlier one freed makes the allocator empty its cache and retry, as on a device of
    the limit's size. ``peak="reserved"`` uncapped: the probe's batches (widest, most rows, most padded tokens) run
    back to back, and the allocator reserves a second segment for a later, larger hold: peaks of one to about two
    holds, by the batches' order (H200: 2,560 tokens peaked at 81 GB, 1.9 holds; 4,600 at 79 GB, 1.03 holds; 4,608
    at 148 GB), a lower budget, not near the limit in holds.
    """
    f = TokenBudgetFinder(memory=CudaMemory(peak=peak, enforce_limit=enforce_limit))
    dm = BudgetDataModule(GPU_SAMPLES)
    trainer = cpu_trainer(accelerator="cuda", max_steps=5, callbacks=[f], plugins=[MixedPrecision("16-mixed", "cuda")])
    fraction = _memory_fraction(torch.device("cuda"))
    trainer.fit(_greedy(), datamodule=dm)
    assert _memory_fraction(torch.device("cuda")) == fraction  # the cap is lifted after the probes
    search = f.search
    assert search is not None and f.budget is not None and f.seconds is not None
    assert search.stopped == "bracketed" and f.seconds < 30
    found = search.peak_of(f.budget)
    assert found is not None and found <= search.limit and f.budget * HOLD <= search.limit  # a hold is in any peak
    failing = min(b for b, p in search.probes if p is None or p > search.limit)  # a real limit or OOM error
    assert f.budget < failing <= f.budget + max(8, -(-math.ceil(0.02 * f.budget) // 8) * 8)  # one step above
    if peak == "allocated":
        capacity = search.limit / 0.9
        assert (f.budget + 8) * HOLD > 0.85 * capacity  # near the limit
    else:  # the failing probe held at most its (at most 3) batches' holds at once, over the first probe's peak
        first = search.probes[0][1]
        assert first is not None and first + 3 * failing * HOLD > search.limit
    assert trainer.global_step == 5  # trained at the found budget without running out of memory


class _ProbeTwice(Callback):
    """At fit start: a probe that runs out of memory for real (20,000 tokens x 16 MiB), then one that fits."""

    def on_fit_start(self, trainer, pl_module):
        from lightning_txopt.memory import CudaMemory

        dm = trainer.datamodule
        prober = StepProber(trainer, pl_module, CudaMemory())
        before = params(pl_module)
        with prober.preserving_state():
            self.huge = prober.measure(lambda: dm.probe_batches(20_000))
            self.small = prober.measure(lambda: dm.probe_batches(512))
        after = params(pl_module)
        self.same = all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.gpu
@cuda
def test_cuda_probe_recovers_from_a_real_out_of_memory_error():
    probe = _ProbeTwice()
    trainer = cpu_trainer(accelerator="cuda", max_steps=2, callbacks=[probe])
    trainer.fit(_greedy(), datamodule=BudgetDataModule(GPU_SAMPLES, 512))
    assert probe.huge is None and probe.small is not None and probe.small > 512 * HOLD
    assert probe.same and trainer.global_step == 2


@pytest.mark.gpu
@cuda
def test_cuda_restores_state_exactly():
    def fit(callbacks: list[Callback], dm: pl.LightningDataModule) -> tuple[Any, ...]:
        m = _greedy()
        plugin = MixedPrecision("16-mixed", "cuda")
        torch.manual_seed(7)
        torch.cuda.manual_seed(7)
        trainer = cpu_trainer(accelerator="cuda", max_steps=0, callbacks=callbacks, plugins=[plugin])
        trainer.fit(m, datamodule=dm)
        state = trainer.optimizers[0].state_dict()["state"]
        assert plugin.scaler is not None
        return params(m), state, plugin.scaler.get_scale(), torch.cuda.get_rng_state(), torch.get_rng_state()

    f = TokenBudgetFinder()
    weights, state, scale, cuda_rng, cpu_rng = fit([f], BudgetDataModule(GPU_SAMPLES))
    assert f.budget is not None
    ref = fit([], BudgetDataModule(GPU_SAMPLES, f.budget))
    assert_same(weights, ref[0])
    assert state == ref[1] == {} and scale == ref[2]
    assert torch.equal(cuda_rng, ref[3]) and torch.equal(cpu_rng, ref[4])


class _Advising(SavedTensorsMemory):
    def advice(self) -> str | None:
        return "the allocator may fragment"


def test_the_memory_readers_advice_is_a_warning():
    with pytest.warns(UserWarning, match="TokenBudgetFinder: the allocator may fragment"):
        _fit([finder(memory=_Advising(CAPACITY))], BudgetDataModule(SAMPLES), steps=1)


def test_budgets_that_make_the_same_batches_are_measured_once():
    """A dataset smaller than the budgets probed: every budget past its size makes the same single batch. The
    finder measures that batch once (the search reuses its peak, keyed by the batches' shapes) and stops as
    saturated; every budget it visited is listed in its probes."""
    memory = _Calls(10**12, probe=0)  # nothing runs out of memory
    f = finder(memory=memory)
    small = make_samples(40, seed=3, max_len=20)
    _fit([f], BudgetDataModule(small), steps=1)
    assert f.search is not None and f.search.stopped == "saturated"
    measured = memory.calls.count("track")
    assert measured < len(f.search.probes)  # a budget was visited without running its steps
    dm = BudgetDataModule(small)
    shapes = {_shapes(dm.probe_batches(b)) for b, _ in f.search.probes}
    assert measured == len(shapes)  # one measurement per distinct set of batch shapes

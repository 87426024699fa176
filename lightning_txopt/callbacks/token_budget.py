"""``TokenBudgetFinder``: the largest token budget that fits the device, found by probing real training steps.

At fit start the callback runs real training steps (the LightningModule's ``training_step``, backward and optimizer
step, under the Trainer's precision) on batches of the worst-case shapes the DataModule's plan produces at a
candidate budget, searches (:func:`~lightning_txopt.memory.search_token_budget`) for the largest budget whose peak
memory stays within a fraction of the device, puts the model, optimizer, loss scaler and random generators back
exactly as they were, and sets the DataModule's budget. :class:`StepProber` runs and measures the steps; the
checkpointing choice (:func:`fit_checkpointing`) reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_txopt.memory import (
    BudgetSearch,
    CheckpointingChoice,
    CudaMemory,
    DeviceMemory,
    choose_checkpointing,
    format_bytes,
    search_token_budget,
)
from lightning_txopt.utils.checks import check_positive_int

__all__ = ["DATAMODULE_PROTOCOL", "StepProber", "TokenBudgetFinder", "fit_checkpointing"]

DATAMODULE_PROTOCOL = ("max_tokens", "set_token_budget", "probe_batches", "token_budget_multiple")
_OK, _OOM, _FAILED = 0.0, 1.0, 2.0


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (a snapshot that takes no device memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _ProbeOptimizer:
    """What ``pl_module.optimizer_step`` gets during a probe, in place of Lightning's ``LightningOptimizer``.

    ``step(closure)`` runs the closure (forward, backward), then steps through the precision plugin's GradScaler when
    there is one (fp16), as Lightning's precision plugins do, but without calling the callbacks'
    ``on_before_optimizer_step`` hooks: a hook with a collective (or with state) must not run inside a probe. Other
    attributes are the optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.stepped = False

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        self.stepped = True
        result = closure() if closure is not None else None
        if closure is not None and result is None:
            return None  # training_step returned None: Lightning skips the step as well
        if self.scaler is not None:
            self.scaler.step(self.optimizer, **kwargs)
            self.scaler.update()
        else:
            self.optimizer.step(**kwargs)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


@contextlib.contextmanager
def _logging_discarded(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: probe steps run outside Lightning's loops.

    Lightning's ``log`` raises outside its loops (no result collection at ``on_fit_start``), and probe metrics are
    not the run's. This is the one place that shadows the two methods, on the instance, and removes the shadows after.
    """

    def discard(*args: Any, **kwargs: Any) -> None:
        return None

    names = [name for name in ("log", "log_dict") if name not in vars(pl_module)]
    for name in names:
        object.__setattr__(pl_module, name, discard)
    try:
        yield
    finally:
        for name in names:
            object.__delattr__(pl_module, name)


def _metrics(pl_module: nn.Module) -> list[Any]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return []
    return [m for m in pl_module.modules() if isinstance(m, Metric)]


class StepProber:
    """Runs real training steps of a LightningModule on given batches and measures their peak memory.

    Built at ``on_fit_start`` (model on its device, optimizer configured). A step is Lightning's automatic
    optimisation without the loops: ``training_step`` under the precision plugin's ``train_step_context``, the
    module's ``optimizer_zero_grad``, the precision plugin's ``backward`` (loss scaled by its GradScaler under fp16),
    and the module's ``optimizer_step`` with a stand-in optimizer that steps through the GradScaler. No callback hook
    runs (they may hold collectives or state) and under DDP the unwrapped module is called, so no gradient
    all-reduce runs inside a probe. With ``accumulate_grad_batches > 1`` the batches of a round accumulate into one
    step (gradients alive during the later forwards, as in training). ``self.log`` is discarded inside probes;
    torchmetrics metrics updated by a probe are reset if they were fresh.

    Every measurement is agreed across ranks with explicit collectives after the probe (the maximum peak; an
    out-of-memory error on any rank makes it a failure on all), all ranks in lockstep: an out-of-memory error on one
    rank cannot hang the others. An unexpected error on any rank is raised on all.

    :meth:`preserving_state` snapshots to the CPU and restores exactly: the LightningModule's ``state_dict``, the
    optimizer's, the precision plugin's (GradScaler), the CPU and CUDA random generators (and Python's and
    NumPy's); gradients are cleared.

    Args:
        trainer: The Trainer (its strategy, precision plugin and optimizer are used).
        pl_module: The LightningModule.
        memory: How to read the device's memory.
        steps: Rounds of steps over the batches at each measurement.
        fresh_optimizer: Start each measurement from the optimizer's saved state (inside :meth:`preserving_state`)
            and let its first step create the state (AdamW's moments), as training's first step does, before the
            ``steps`` rounds. Where that state lands in the allocator's cache (freed activations of the first step)
            decides the fragmentation later steps meet: measured on an H200, a Llama-shape model whose probes fit
            0.9 of the device with the state made beforehand ran out of memory at its second training step (with
            the state made as here, at a 1.8% lower budget, at its third: the default allocator fragments over more
            steps than a probe runs, see :meth:`~lightning_txopt.memory.CudaMemory.advice`). Without it, the state
            is made first by a zero-gradient step (:meth:`prime_optimizer`).

    Raises:
        ValueError: Without exactly one optimizer, or with ``steps < 1``.

    Example:
        >>> from lightning_txopt import BucketDataModule, TransformerModule
        >>> from lightning_txopt.memory import SavedTensorsMemory
        >>> class Probe(pl.Callback):
        ...     def on_fit_start(self, trainer, pl_module):
        ...         prober = StepProber(trainer, pl_module, SavedTensorsMemory(capacity=2**30))
        ...         self.peak = prober.measure(lambda: trainer.datamodule.probe_batches(64))
        >>> samples = [{"input_ids": list(range(1, n + 1)), "labels": n % 2} for n in (3, 9, 4, 8, 5, 7)]
        >>> module = TransformerModule(config={"model_type": "bert", "vocab_size": 20, "hidden_size": 16,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}, num_labels=2)
        >>> probe = Probe()
        >>> pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        ...            enable_progress_bar=False, enable_model_summary=False, callbacks=[probe]).fit(
        ...     module, datamodule=BucketDataModule(samples, pad_token_id=0, max_tokens=64))
        >>> probe.peak > 0  # bytes saved for backward by the probe steps (state restored after)
        True
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        memory: DeviceMemory,
        *,
        steps: int = 1,
        fresh_optimizer: bool = False,
    ) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"Probing needs exactly one optimizer (automatic optimisation), found {len(trainer.optimizers)}."
            )
        check_positive_int("steps", steps)
        self.trainer = trainer
        self.pl_module = pl_module
        self.memory = memory
        self.steps = int(steps)
        self.fresh_optimizer = bool(fresh_optimizer)
        self.device = pl_module.device
        self.optimizer: torch.optim.Optimizer = trainer.optimizers[0]
        self.plugin = trainer.precision_plugin
        self.scaler = getattr(self.plugin, "scaler", None)
        self._saved: dict[str, Any] | None = None
        self._worst: int | None = None  # which probe batch set the last peak: it runs first in the next measurement

    # ------------------------------------------------------------------ agreement
    def agree(self, values: list[float], reduce_op: Literal["max", "min"]) -> list[float]:
        """``values`` reduced over all ranks (``trainer.strategy.reduce``; unchanged on one device)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        reduced = self.trainer.strategy.reduce(tensor, reduce_op=reduce_op)
        return [float(v) for v in reduced.tolist()]

    def same_on_all_ranks(self, value: Hashable) -> bool:
        """Whether every rank holds the same ``value``.

        A digest of its ``repr`` is compared over the ranks in one collective: every rank must call it at the same
        point.
        """
        digest = float(int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=6).digest(), "big"))
        highest, negated_lowest = self.agree([digest, -digest], "max")
        return highest == -negated_lowest

    def limit(self, fraction: float) -> float:
        """``fraction`` of the device's capacity, the smallest over the ranks (bytes)."""
        return self.agree([fraction * self.memory.capacity(self.device)], "min")[0]

    def baseline(self) -> float:
        """What a training step holds whatever its batch (the largest over the ranks).

        That is the memory allocated now (weights, optimizer state) with every trainable parameter's gradient
        allocated. The gradients are zeros made for the reading and freed after it (a parameter whose gradient
        exists is read as it is). Without them the line from this baseline to the first probe would charge the
        gradients, a fixed cost, to that probe's few tokens: on a 343M-parameter model the second probe landed at a
        quarter of the budget found.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad and p.grad is None]
        try:
            for p in params:
                p.grad = torch.zeros_like(p)
            current = float(self.memory.current(self.device))
        except Exception as exc:  # no room for the gradients: the first probe will say that min_tokens does not fit
            if not self.memory.is_out_of_memory(exc):
                raise
            current = None
        finally:
            for p in params:
                p.grad = None
        if current is None:
            current = float(self.memory.current(self.device))
        return self.agree([current], "max")[0]

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        """Snapshot the state (to the CPU)."""
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        self._saved = {
            "module": _to_cpu(self.pl_module.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "precision": _to_cpu(self.plugin.state_dict()),
            "rng": rng,
            "fresh_metrics": {id(m) for m in _metrics(self.pl_module) if m.update_count == 0},
        }

    def restore(self) -> None:
        """Put the snapshot back; gradients cleared.

        Raises:
            RuntimeError: Before :meth:`save`.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError("StepProber.restore() before save().")
        self.pl_module.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.pl_module.load_state_dict(saved["module"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["precision"]:
            self.plugin.load_state_dict(saved["precision"])
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        for metric in _metrics(self.pl_module):
            if metric.update_count:
                if id(metric) in saved["fresh_metrics"]:
                    metric.reset()
                else:
                    rank_zero_warn(f"A probe step updated the metric {type(metric).__name__}, which was not fresh.")

    @contextlib.contextmanager
    def preserving_state(self) -> Iterator[None]:
        """Snapshot on entry, restore on exit (also on errors); the device's cache is released after."""
        self.save()
        try:
            yield
        finally:
            self.restore()
            self._saved = None
            self.memory.release(self.device)

    # ------------------------------------------------------------------ steps
    def prime_optimizer(self) -> bool:
        """Create the optimizer's state (AdamW's moments) with a zero-gradient step; ``False`` if it cannot.

        Every probe step then runs with the state allocated, as every training step does; it is restored afterwards
        like the rest.
        """
        if self.optimizer.state:
            return True
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            self.optimizer.step()
        except TypeError:  # an optimizer that needs a closure (LBFGS)
            return False
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return True

    def _closure(self, batch: Any, batch_idx: int, zero_grad: bool) -> Callable[[], Any]:
        module, optimizer = self.pl_module, self.optimizer

        def closure() -> Any:
            with self.plugin.train_step_context():
                output = module.training_step(batch, batch_idx)
            loss: Any = output.get("loss") if isinstance(output, dict) else output
            if loss is None:
                return None
            if zero_grad:
                module.optimizer_zero_grad(self.trainer.current_epoch, batch_idx, optimizer)
            scaled = self.scaler.scale(loss) if self.scaler is not None else loss
            self.plugin.backward(scaled, module, optimizer)
            return loss.detach()

        return closure

    def run_steps(self, batches: list[Any], limit: float | None = None) -> int | None:
        """``steps`` rounds of training steps over ``batches`` (already on the device).

        With ``fresh_optimizer``, after a first step on the first batch that creates the optimizer's state. With a
        ``limit``, the steps stop early once the running peak exceeds it (the measurement fails either way).

        Returns the index in ``batches`` of the batch whose step set the peak (``None`` when no step ran). Call it
        inside :meth:`~lightning_txopt.memory.DeviceMemory.tracking`: the peak is read after every step.
        """
        if self.fresh_optimizer:
            rounds: list[list[int]] = [[0]] + [list(range(len(batches)))] * self.steps
        else:
            rounds = [list(range(len(batches)))] * (self.steps + (0 if self.prime_optimizer() else 1))
        accumulate = self.trainer.accumulate_grad_batches > 1
        epoch = self.trainer.current_epoch
        worst, highest = None, -1.0
        with torch.enable_grad(), _logging_discarded(self.pl_module):
            for round_indices in rounds:
                for i, index in enumerate(round_indices):
                    first = not accumulate or i == 0
                    last = not accumulate or i == len(round_indices) - 1
                    closure = self._closure(batches[index], i, zero_grad=first)
                    if not last:
                        closure()
                    else:
                        proxy = _ProbeOptimizer(self.optimizer, self.scaler)
                        self.pl_module.optimizer_step(epoch, i, proxy, closure)  # type: ignore[arg-type]
                        if not proxy.stepped:
                            raise RuntimeError(
                                f"{type(self.pl_module).__name__}.optimizer_step did not call "
                                "optimizer.step(closure): probing needs Lightning's default stepping."
                            )
                    running = float(self.memory.peak(self.device))  # the peak so far: a host-side counter
                    if running > highest:
                        worst, highest = index, running
                    if limit is not None and running > limit:
                        return worst  # over the limit already: the rest cannot make it fit
        return worst

    def measure(self, make_batches: Callable[[], list[Any]], limit: float | None = None) -> float | None:
        """Peak memory of :meth:`run_steps` on ``make_batches()`` (CPU batches), agreed over all ranks.

        With a ``limit`` (bytes), the steps run as on a device of that size where the memory reader can enforce it
        (:meth:`~lightning_txopt.memory.DeviceMemory.limited`: :class:`~lightning_txopt.memory.CudaMemory` caps the
        allocator), so fragmentation that would not fit the limit is an out-of-memory error, and the steps stop
        once the peak exceeds it. The batch that set the previous measurement's peak runs first
        (:func:`_worst_first`): a budget that does not fit fails after its first steps instead of its last.

        Returns the largest peak over the ranks, or ``None`` if any rank ran out of memory.

        Raises:
            Exception: Another error on this rank is re-raised (after the ranks agreed).
            RuntimeError: If another rank failed with an error other than out of memory.
        """
        status, peak, error = _OK, 0.0, None
        if self.fresh_optimizer and self._saved is not None:
            self.optimizer.load_state_dict(self._saved["optimizer"])  # the state the training starts from
        try:
            batches = [self.trainer.strategy.batch_to_device(b) for b in make_batches()]
            order = _worst_first(len(batches), self._worst)
            capped = self.memory.limited(self.device, limit) if limit is not None else contextlib.nullcontext()
            with capped, self.memory.tracking(self.device):
                worst = self.run_steps([batches[i] for i in order], limit)
            peak = float(self.memory.peak(self.device))
            if worst is not None:
                self._worst = order[worst]
        except Exception as exc:
            status, error = (_OOM, None) if self.memory.is_out_of_memory(exc) else (_FAILED, exc)
        batches = []  # free the batches and (outside the except block) the failed step's frames
        if status != _OK:
            self.pl_module.zero_grad(set_to_none=True)
            if self._saved is not None:  # an interrupted optimizer step may have left partial state
                self.restore()
        self.memory.release(self.device)
        agreed_status, agreed_peak = self.agree([status, peak], "max")
        if agreed_status >= _FAILED:
            if error is not None:
                raise error
            raise RuntimeError("Another rank failed while probing memory (its error is in its log).")
        return None if agreed_status >= _OOM else agreed_peak


def _worst_first(count: int, worst: int | None) -> list[int]:
    """The order of ``count`` probe batches: ``worst`` (the batch that set the last measurement's peak) first.

    The DataModule gives its worst-case batches in the same roles at every budget (widest, fullest, ...), so the
    batch that set the peak at one budget most likely sets it at the next: running it first (as the step that creates
    the optimizer's state, then again with the state) ends a probe that does not fit after its first steps. Every
    batch still runs, so the peak is the same in any order.

    Example:
        >>> _worst_first(4, 2), _worst_first(4, None), _worst_first(2, 3)
        ([2, 0, 1, 3], [0, 1, 2, 3], [0, 1])
    """
    order = list(range(count))
    if worst is not None and 0 <= worst < count:
        order.insert(0, order.pop(worst))
    return order


def _shapes(batches: list[Any]) -> Hashable:
    """What decides a probe's memory: each batch's tensor shapes and dtypes, and its other plain values.

    Plain values are such as ``max_length_q``. Budgets whose probe batches agree in these need the same memory, so
    the finder measures them once (a small dataset gives the same batches over a range of budgets).

    Example:
        >>> batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "max_length_q": 8}
        >>> _shapes([batch]) == _shapes([{**batch, "input_ids": torch.ones(2, 8, dtype=torch.long)}])
        True
        >>> _shapes([batch]) == _shapes([{**batch, "input_ids": torch.zeros(2, 9, dtype=torch.long)}])
        False
    """

    def describe(value: Any) -> Hashable:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype))
        if isinstance(value, Mapping):
            return tuple((str(k), describe(v)) for k, v in value.items())
        if isinstance(value, list | tuple):
            return tuple(describe(v) for v in value)
        if isinstance(value, int | float | str | bool) or value is None:
            return value
        return type(value).__name__

    return tuple(describe(b) for b in batches)


def _probe_log(search: BudgetSearch) -> str:
    """Each probe's budget, outcome and time, for the finder's log line.

    Example:
        >>> _probe_log(BudgetSearch(128, 10.0, ((64, 5.0), (128, 9.0), (192, None)), "bracketed", (0.5, 1.25, 0.8)))
        '64 fits (0.5 s), 128 fits (1.2 s), 192 out of memory (0.8 s)'
    """
    parts = []
    for i, (budget, peak) in enumerate(search.probes):
        outcome = "out of memory" if peak is None else ("fits" if peak <= search.limit else "over the limit")
        took = f" ({search.seconds[i]:.1f} s)" if i < len(search.seconds) else ""
        parts.append(f"{budget} {outcome}{took}")
    return ", ".join(parts)


def prepare_memory(memory: DeviceMemory, device: torch.device, who: str) -> None:
    """``memory.prepare(device)`` (CudaMemory: expandable segments on), and the log line of what it changed."""
    changed = memory.prepare(device)
    if changed is not None:
        rank_zero_info(f"{who}: {changed}")


def _check_strategy(trainer: pl.Trainer, who: str) -> None:
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
        raise ValueError(
            f"{who} probes single-device and DDP training; {type(strategy).__name__} shards or wraps the model "
            "differently. Set the budget by hand (BucketDataModule(max_tokens=<int>))."
        )


def _check_datamodule(trainer: pl.Trainer, who: str) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    missing = [name for name in DATAMODULE_PROTOCOL if not hasattr(datamodule, name)] if datamodule else None
    if datamodule is None or missing:
        raise ValueError(
            f"{who} needs a DataModule with {', '.join(DATAMODULE_PROTOCOL)} (BucketDataModule(max_tokens='auto')) "
            f"passed as trainer.fit(..., datamodule=...); got {type(datamodule).__name__}"
            + (f", which lacks {missing}." if missing else ".")
        )
    return datamodule


class TokenBudgetFinder(Callback):
    """Find the largest token budget that fits the device at fit start, by probing real training steps.

    For ``BucketDataModule(max_tokens="auto")`` (every strategy, packed included). At ``on_fit_start`` it probes
    candidate budgets: the DataModule gives the worst-case batches of its plan at each budget
    (``dm.probe_batches(budget)``: the widest batch, the one with the most rows or samples, and the batches that need
    the most memory under any weighting of padded tokens and ``rows x width**2``), and
    :class:`StepProber` runs real training steps on them (the module's ``training_step``, backward and optimizer
    step, under the Trainer's precision, with everything the other callbacks set up in force) and reads the peak.
    :func:`~lightning_txopt.memory.search_token_budget` finds the largest budget whose peak stays within
    ``max_memory_fraction`` of the device (with :class:`~lightning_txopt.memory.CudaMemory`, the default, each probe
    runs on an allocator capped at that limit, so the allocator's fragmentation counts too); the model, optimizer,
    GradScaler and random generators are then restored exactly, and ``dm.set_token_budget(budget)`` sets the
    training and evaluation budget.

    Under DDP every rank probes and all agree on every measurement (the most memory any rank needed; an
    out-of-memory error on one rank counts for all), so they choose the same budget and none hangs. The budget is
    logged (``token_budget``; the info line also lists each probe's budget, outcome and time), kept in the
    callback's state and saved in checkpoints: a resumed run (``fit(ckpt_path=...)``) uses the saved budget and never
    probes again. A second ``fit`` with the same callback reuses its budget too.

    Needs a CUDA device (it measures CUDA's allocator); on another device it raises. ``memory=`` replaces the
    measurement, e.g. :class:`~lightning_txopt.memory.SavedTensorsMemory` (an estimate for tests and CPU demos).
    With :class:`~lightning_txopt.memory.CudaMemory` (the default), ``setup`` turns on CUDA's expandable segments
    for the rest of the process when they are off, and logs it (:meth:`~lightning_txopt.memory.CudaMemory.prepare`):
    without them the allocator's cache fragments past the found budget over training's many batch shapes.
    ``memory=CudaMemory(expandable_segments=False)`` leaves the allocator as it is (with a warning).

    The probe steps must be free of side effects other than logging (discarded) and torchmetrics metrics (reset):
    state a ``training_step`` keeps in Python attributes would see the probe batches.

    Args:
        max_memory_fraction: Largest share of the device's memory the probes may take (the rest covers what
            training adds over them: batches of other shapes, a cache fragmented by many steps).
        min_tokens: Smallest budget, probed first. Default: ``dm.min_token_budget`` when the DataModule has it
            (the longest sample), else ``dm.token_budget_multiple``.
        max_tokens: Largest budget (``None``: no bound).
        multiple: Budgets are multiples of this. Default: ``dm.token_budget_multiple`` (64, or the row length of
            packed rows). Must be a multiple of it.
        probe_steps: Training steps on each worst-case batch per candidate budget.
        tolerance: The search stops when a budget ``tolerance`` larger (at least one ``multiple``) did not fit.
        max_probes: Most candidate budgets probed.
        memory: How the device's memory is read (default :class:`~lightning_txopt.memory.CudaMemory`).

    Raises:
        ValueError: On invalid arguments (here); at setup, on an unsupported strategy, manual optimisation or a
            DataModule without the token-budget protocol; at fit start, on a DataModule whose ``max_tokens`` is not
            ``"auto"`` or conflicts with the saved budget, or a ``multiple`` that is not a multiple of the
            DataModule's.
        RuntimeError: At fit start, without a CUDA device (default ``memory``), or when even ``min_tokens`` does
            not fit.

    Example:
        >>> from lightning_txopt.memory import SavedTensorsMemory
        >>> TokenBudgetFinder(max_memory_fraction=0.8, min_tokens=512).max_memory_fraction
        0.8
        >>> finder = TokenBudgetFinder(memory=SavedTensorsMemory(capacity=2**30))  # estimate: CPU demos, tests
    """

    def __init__(
        self,
        *,
        max_memory_fraction: float = 0.9,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        multiple: int | None = None,
        probe_steps: int = 1,
        tolerance: float = 0.02,
        max_probes: int = 12,
        memory: DeviceMemory | None = None,
    ) -> None:
        if not (isinstance(max_memory_fraction, int | float) and 0 < max_memory_fraction <= 1):
            raise ValueError(f"`max_memory_fraction` must be in (0, 1], got {max_memory_fraction!r}.")
        for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens), ("multiple", multiple)):
            check_positive_int(name, value, optional=True)
        if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
            raise ValueError(f"`min_tokens`={min_tokens} > `max_tokens`={max_tokens}.")
        for name, value in (("probe_steps", probe_steps), ("max_probes", max_probes)):
            check_positive_int(name, value)
        if not 0 <= tolerance < 1:
            raise ValueError(f"`tolerance` must be in [0, 1), got {tolerance!r}.")
        self.max_memory_fraction = float(max_memory_fraction)
        # plain ints (numpy integers pass the checks): the found budget is saved in checkpoints
        self.min_tokens = None if min_tokens is None else int(min_tokens)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.multiple = None if multiple is None else int(multiple)
        self.probe_steps = int(probe_steps)
        self.tolerance = tolerance
        self.max_probes = int(max_probes)
        self.memory = memory if memory is not None else CudaMemory()
        self.budget: int | None = None  # the found (or restored) budget
        self.search: BudgetSearch | None = None  # the search of this process (None when restored)
        self.seconds: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer, "TokenBudgetFinder")
        if not pl_module.automatic_optimization:
            raise ValueError("TokenBudgetFinder probes automatic optimisation; set max_tokens by hand instead.")
        _check_datamodule(trainer, "TokenBudgetFinder")
        prepare_memory(self.memory, trainer.strategy.root_device, "TokenBudgetFinder")  # a saved budget needs it too

    def _bounds(self, datamodule: Any) -> tuple[int, int, int | None]:
        base = int(datamodule.token_budget_multiple)
        multiple = self.multiple if self.multiple is not None else base
        if multiple % base:
            raise ValueError(
                f"`multiple`={multiple} is not a multiple of the DataModule's token_budget_multiple={base}: use a "
                f"multiple of {base} (e.g. {base * max(1, round(multiple / base))})."
            )
        minimum = self.min_tokens
        if minimum is None:
            minimum = int(getattr(datamodule, "min_token_budget", base))
        return multiple, minimum, self.max_tokens

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = _check_datamodule(trainer, "TokenBudgetFinder")
        current = datamodule.max_tokens
        if self.budget is not None:  # restored from a checkpoint, or found by an earlier fit
            if current not in ("auto", self.budget):
                raise ValueError(
                    f"The DataModule's max_tokens={current!r} conflicts with the budget TokenBudgetFinder saved "
                    f"({self.budget}): pass max_tokens='auto' to resume with the saved budget."
                )
            datamodule.set_token_budget(self.budget)
            rank_zero_info(f"TokenBudgetFinder: max_tokens={self.budget} (saved budget; not probed again).")
            return
        if current != "auto":
            raise ValueError(
                f"TokenBudgetFinder sets the budget of a DataModule built with max_tokens='auto'; this one has "
                f"max_tokens={current!r}. Pass max_tokens='auto', or remove the callback to keep your budget."
            )
        multiple, minimum, maximum = self._bounds(datamodule)
        self.memory.check(pl_module.device)
        advice = self.memory.advice()
        if advice is not None:
            rank_zero_warn(f"TokenBudgetFinder: {advice}")
        start = time.perf_counter()
        prober = StepProber(trainer, pl_module, self.memory, steps=self.probe_steps, fresh_optimizer=True)
        with prober.preserving_state():
            limit = prober.limit(self.max_memory_fraction)
            prober.prime_optimizer()  # the optimizer's state counts in the baseline (each probe makes it anew)
            baseline = prober.baseline()
            planned: dict[int, list[Any]] = {}  # the probe batches of the budget being looked at

            def shapes(budget: int) -> Hashable:
                planned.clear()
                planned[budget] = datamodule.probe_batches(budget)
                local = _shapes(planned[budget])
                return local if prober.same_on_all_ranks(local) else ("budget", budget)  # no reuse where ranks differ

            search = search_token_budget(
                lambda budget: prober.measure(lambda: planned.pop(budget), limit),
                key=shapes,
                limit=limit,
                min_tokens=minimum,
                max_tokens=maximum,
                multiple=multiple,
                baseline=baseline,
                tolerance=self.tolerance,
                max_probes=self.max_probes,
            )
        self.seconds = time.perf_counter() - start
        self.search = search
        if search.max_tokens is None:
            peak = search.probes[0][1]
            needed = "ran out of memory" if peak is None else f"needs {format_bytes(peak)}"
            raise RuntimeError(
                f"TokenBudgetFinder: even min_tokens={search.probes[0][0]} {needed} (limit {format_bytes(limit)} = "
                f"{self.max_memory_fraction} of the device). Lower min_tokens, raise max_memory_fraction, or free "
                "memory: GradientCheckpointing, FreezeEmbeddings, a smaller model."
            )
        self.budget = search.max_tokens
        datamodule.set_token_budget(self.budget)
        peak = search.peak_of(self.budget)
        assert peak is not None
        rank_zero_info(
            f"TokenBudgetFinder: max_tokens={self.budget} (peak {format_bytes(peak)}, limit {format_bytes(limit)} "
            f"= {self.max_memory_fraction} of the device; {len(search.probes)} probes in {self.seconds:.1f} s: "
            f"{_probe_log(search)}; stopped: {search.stopped})."
        )
        if search.stopped == "max_probes":
            rank_zero_warn(
                f"TokenBudgetFinder stopped after max_probes={self.max_probes}: a larger budget may fit. Raise "
                "max_probes or tolerance."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is not None:
            pl_module.log("token_budget", float(self.budget), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"max_tokens": self.budget}
        if self.search is not None:
            state["limit"] = self.search.limit
            state["probes"] = [[b, p] for b, p in self.search.probes]
            state["probe_seconds"] = list(self.search.seconds)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        budget = state_dict.get("max_tokens")
        self.budget = None if budget is None else int(budget)


# ---------------------------------------------------------------------------------------------- checkpointing
def fit_checkpointing(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    apply: Callable[[int | None], None],
    num_blocks: int,
    *,
    max_memory_fraction: float = 0.9,
    memory: DeviceMemory | None = None,
    probe_steps: int = 1,
) -> CheckpointingChoice:
    """Checkpoint the fewest of ``num_blocks`` blocks for the planned batches to fit ``max_memory_fraction``.

    The batches are the DataModule's worst case at its budget in force (``dm.probe_batches(dm.max_tokens)``, which
    must be set); every candidate interval (:func:`~lightning_txopt.memory.choose_checkpointing`) is applied with
    ``apply(every_n_layers)`` (``None``: no checkpointing) and measured with :class:`StepProber`, state restored
    after. The chosen interval is applied last (none if the batches fit without checkpointing). Call it at
    ``on_fit_start`` (model on its device, optimizer configured), on every rank: the ranks agree.

    Args:
        trainer: The Trainer.
        pl_module: The LightningModule (whose ``training_step`` is probed).
        apply: Sets the checkpointing of the model: ``every_n_layers`` blocks apart, or none for ``None`` (e.g.
            :func:`~lightning_txopt.callbacks.disable_gradient_checkpointing` then
            :func:`~lightning_txopt.callbacks.enable_gradient_checkpointing`).
        num_blocks: Number of transformer blocks.
        max_memory_fraction: Largest share of the device's memory the peak may take.
        memory: How the device's memory is read (default :class:`~lightning_txopt.memory.CudaMemory`).
        probe_steps: Training steps on each batch per candidate.

    Returns:
        The :class:`~lightning_txopt.memory.CheckpointingChoice`.

    Raises:
        ValueError: On an unsupported strategy, a DataModule without the token-budget protocol or without a budget.
        RuntimeError: Without a CUDA device (default ``memory``), or when even every block checkpointed does not fit.

    Example:
        >>> from lightning_txopt.callbacks import disable_gradient_checkpointing, enable_gradient_checkpointing
        >>> class AutoCheckpointing(pl.Callback):  # what GradientCheckpointing(every_n_layers="auto") does
        ...     def on_fit_start(self, trainer, pl_module):
        ...         model = pl_module.model
        ...         def apply(n):
        ...             disable_gradient_checkpointing(model)
        ...             if n is not None:
        ...                 enable_gradient_checkpointing(model, every_n_layers=n)
        ...         blocks = model.config.num_hidden_layers
        ...         self.choice = fit_checkpointing(trainer, pl_module, apply, blocks)
    """
    _check_strategy(trainer, "fit_checkpointing")
    datamodule = _check_datamodule(trainer, "fit_checkpointing")
    budget = datamodule.max_tokens
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(
            f"Checkpointing to a memory target needs a fixed token budget; the DataModule has max_tokens={budget!r}. "
            "Set max_tokens=<int>, or keep max_tokens='auto' with a fixed GradientCheckpointing(every_n_layers=...)."
        )
    memory = memory if memory is not None else CudaMemory()
    memory.check(pl_module.device)
    prepare_memory(memory, pl_module.device, "Checkpointing to a memory target")
    advice = memory.advice()
    if advice is not None:
        rank_zero_warn(f"Checkpointing to a memory target: {advice}")
    prober = StepProber(trainer, pl_module, memory, steps=probe_steps, fresh_optimizer=True)

    limit = prober.limit(max_memory_fraction)

    def peak_at(every_n_layers: int | None) -> float | None:
        apply(every_n_layers)
        return prober.measure(lambda: datamodule.probe_batches(budget), limit)

    with prober.preserving_state():
        choice = choose_checkpointing(peak_at, num_blocks, limit=limit)
    apply(choice.every_n_layers)
    if not choice.fits:
        raise RuntimeError(
            f"max_tokens={budget} does not fit {max_memory_fraction} of the device ({format_bytes(limit)}) even with "
            "every block checkpointed: lower max_tokens (or use TokenBudgetFinder with max_tokens='auto')."
        )
    return choice

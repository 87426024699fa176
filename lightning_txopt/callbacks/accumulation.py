"""Exact, scheduled gradient accumulation: ``AccumulationScheduler`` and the pure planning helpers.

Lightning's ``GradientAccumulationScheduler`` divides every micro-batch loss by the full factor (so the last,
incomplete window of an epoch is under-weighted, Lightning #19987), schedules only by epoch, forgets its factor on a
mid-epoch resume, and, like every mean-reduced loss, weights micro-batches equally however many tokens they hold
(Lightning #20350). This callback keeps Lightning's own accumulation machinery and only decides what it is told.

Lightning's loop steps after the micro-batch counted ``c`` (from 1 at each epoch start) when
``c % trainer.accumulate_grad_batches == 0`` or at the epoch end, runs ``no_sync`` (DDP's, FSDP1's) on every
other micro-batch (the same decision), zeroes the gradients before micro-batch ``c`` when
``(c - 1) % trainer.accumulate_grad_batches == 0``, and divides every micro-batch loss by
``trainer.accumulate_grad_batches``. The callback plans each window (:func:`window_end`), sets
``trainer.accumulate_grad_batches`` for all of it to the value under which Lightning makes exactly that window
(:func:`lightning_divisor`), and fixes the gradient just before the optimizer step, after AMP unscaling and before
clipping:

* ``normalize="mean"``: the gradient is the mean of the micro-batch gradients that are really in the window;
* ``normalize="tokens"``: the LightningModule returns the loss *summed* over its items (and declares it,
  ``loss_reduction = "sum"``), and the gradient is
  ``sum of item losses over the window and all ranks / number of items over the window and all ranks``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_txopt.utils.amp import set_loss_scale
from lightning_txopt.utils.sharding import GradientSync, sharding_kind

__all__ = [
    "AccumulationScheduler",
    "LOSS_REDUCTIONS",
    "causal_lm_items",
    "count_label_items",
    "count_optimizer_steps",
    "estimated_optimizer_steps",
    "factor_at",
    "lightning_divisor",
    "window_end",
]

Interval = Literal["epoch", "step"]
Normalize = Literal["mean", "tokens"]
LOSS_REDUCTIONS: tuple[str, ...] = ("auto", "mean", "sum")  # the values of a module's declared `loss_reduction`


@contextlib.contextmanager
def _reduce_anyway() -> Iterator[None]:
    """``strategy.block_backward_sync`` under ``reduce_every_micro_batch=True``: blocks nothing."""
    yield None


def _validate_scheduling(scheduling: Mapping[int, int]) -> dict[int, int]:
    if not isinstance(scheduling, Mapping) or not scheduling:
        raise ValueError(f"`scheduling` must be a non-empty dict {{first epoch or step: factor}}, got {scheduling!r}.")
    out: dict[int, int] = {}
    for key, factor in scheduling.items():
        k = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key  # YAML keys
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"`scheduling` keys must be non-negative integers (epochs or steps), got {key!r}.")
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"`scheduling` factors must be positive integers, got {factor!r} for key {key!r}.")
        out[k] = factor
    return dict(sorted(out.items()))


def factor_at(scheduling: Mapping[int, int], position: int) -> int:
    """The factor in force at ``position`` (an epoch or an optimizer step): the entry with the largest key <= it.

    Positions before the first key use factor 1.

    Example:
        >>> [factor_at({0: 1, 2: 4}, e) for e in range(4)]
        [1, 1, 4, 4]
    """
    factor = 1
    for key, value in scheduling.items():
        if key <= position:
            factor = value
        else:
            break
    return factor


def window_end(start: int, factor: int, interval: Interval, epoch_batches: int | float) -> int:
    """The last micro-batch of the window that starts at micro-batch ``start`` (counts from 1 at each epoch start).

    ``interval="epoch"``: windows are aligned to multiples of ``factor`` from the epoch start, as Lightning's own; a
    window that starts elsewhere (the rest of a window cut by a resume) ends at the next multiple. ``interval="step"``:
    a window holds ``factor`` micro-batches from where it starts, so a factor that changes mid-epoch starts full
    windows at once. Either way the epoch end (``epoch_batches``, ``inf`` for a loader without length) cuts the last
    window short.

    Example:
        >>> window_end(5, 4, "epoch", 10), window_end(9, 4, "epoch", 10)
        (8, 10)
        >>> window_end(3, 4, "epoch", 10), window_end(3, 4, "step", 10)  # a factor of 4 from micro-batch 3 on
        (4, 6)
    """
    end = -(-start // factor) * factor if interval == "epoch" else start + factor - 1
    return int(min(end, epoch_batches))


def lightning_divisor(start: int, end: int, epoch_end: bool = False) -> int:
    """The ``trainer.accumulate_grad_batches`` under which Lightning makes micro-batches ``start..end`` one window.

    Counts start from 1 at each epoch start. Lightning steps after micro-batch ``c`` when ``c % v == 0`` (or at the
    epoch end) and zeroes the gradients before it when ``(c - 1) % v == 0``; a window needs neither inside it and a
    step at ``end``. Every divisor ``v`` of ``end`` with ``v >= L = end - start + 1`` does that (its multiple before
    ``end`` is ``end - v < start``), and no other value does; the smallest is returned. When ``end`` is the epoch's
    last micro-batch (``epoch_end=True``) it need not divide ``end``: the smallest ``v >= L`` with no multiple in
    ``start..end - 1`` is returned. Lightning divides each micro-batch loss by ``v``; the callback multiplies the
    window's gradient back (``v / L``, or ``v * world / items``). Lightning zeroes the gradients at ``start`` only
    when ``(start - 1) % v == 0``; otherwise the callback does.

    Raises:
        ValueError: Unless ``1 <= start <= end``.

    Example:
        >>> lightning_divisor(5, 8), lightning_divisor(3, 6), lightning_divisor(7, 10)
        (4, 6, 5)
        >>> lightning_divisor(9, 10, epoch_end=True)
        2
    """
    if not 1 <= start <= end:
        raise ValueError(f"A window needs 1 <= start <= end, got start={start!r}, end={end!r}.")
    length = end - start + 1
    best = end
    for d in range(1, math.isqrt(end) + 1):
        if end % d == 0:
            for v in (d, end // d):
                if length <= v < best:
                    best = v
    if epoch_end:
        for v in range(length, best):
            if (start - 1) // v == (end - 1) // v:  # no multiple of v in start..end - 1
                return v
    return best


def count_optimizer_steps(
    batches_per_epoch: int,
    max_epochs: int,
    scheduling: Mapping[int, int],
    interval: Interval = "epoch",
    max_steps: int = -1,
) -> int:
    """Number of optimizer steps a run makes under an accumulation schedule (what LR schedulers need).

    The windows are :func:`window_end`'s: with ``interval="epoch"``, ``ceil(batches / factor)`` per epoch; with
    ``interval="step"`` the factor is re-read after every optimizer step and each window holds that many
    micro-batches, up to the epoch end.

    Raises:
        ValueError: If ``batches_per_epoch`` or ``max_epochs`` is negative, or ``scheduling`` or ``interval`` is
            invalid.

    Example:
        >>> count_optimizer_steps(10, 3, {0: 1, 1: 4})  # 10 + ceil(10 / 4) * 2
        16
        >>> count_optimizer_steps(10, 1, {0: 1, 2: 4}, interval="step")  # 2 single steps, then windows 3-6, 7-10
        4
    """
    if batches_per_epoch < 0 or max_epochs < 0:
        raise ValueError(f"`batches_per_epoch` and `max_epochs` must be >= 0, got {batches_per_epoch}, {max_epochs}.")
    if interval not in ("epoch", "step"):
        raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}.")
    schedule = _validate_scheduling(scheduling)
    steps = 0
    for epoch in range(max_epochs):
        if interval == "epoch":
            steps += math.ceil(batches_per_epoch / factor_at(schedule, epoch))
        else:
            pos = 0
            while pos < batches_per_epoch:  # one pass per schedule entry: full windows until the next key
                k = factor_at(schedule, steps)
                next_key = next((key for key in schedule if key > steps), math.inf)
                windows = min(math.ceil((batches_per_epoch - pos) / k), next_key - steps)
                pos = min(pos + int(windows) * k, batches_per_epoch)
                steps += int(windows)
                if 0 <= max_steps <= steps:
                    return max_steps
        if 0 <= max_steps <= steps:
            return max_steps
    return steps


def count_label_items(batch: Any) -> int | torch.Tensor:
    """Item count from the labels: ``(batch["labels"] != -100).sum()`` (one item per labelled token or per sample).

    Raises:
        KeyError: If the batch has no ``labels``; pass ``count_items=`` to the scheduler.

    Example:
        >>> int(count_label_items({"labels": torch.tensor([2, -100, 0])}))
        2
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise KeyError(
            "AccumulationScheduler(normalize='tokens') counts items as batch['labels'] != -100, but the batch has no "
            "'labels'. Pass count_items=<function of the batch>, or give the module a count_loss_items(batch) method."
        )
    return (batch["labels"] != -100).sum()


def causal_lm_items(batch: Any) -> int | torch.Tensor:
    """Item count of a Hugging Face causal LM, which shifts labels: the first position of each row predicts nothing.

    Example:
        >>> causal_lm_items({"labels": torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])})
        tensor(3)
    """
    return (batch["labels"][..., 1:] != -100).sum()


class AccumulationScheduler(Callback):
    """Scheduled gradient accumulation whose gradients are exact, through resume, AMP, clipping and DDP.

    Module contract, read and checked at ``setup``:

    * ``loss_reduction``: an attribute of the LightningModule, ``"auto"``, ``"mean"`` or ``"sum"``, saying what
      ``training_step`` returns: the loss averaged over the batch's items (``"mean"``), summed over them (``"sum"``),
      or the mean unless a callback that normalises by items asks for sums (``"auto"``). ``normalize="tokens"``
      needs sums: ``"sum"`` is used as declared; ``"auto"`` is set to ``"sum"`` for the fit and back to ``"auto"``
      at teardown (or on an exception), so the module trains with means in a Trainer without this callback;
      ``"mean"`` or no attribute is refused. ``normalize="mean"`` takes ``"auto"``, ``"mean"`` or no attribute (a
      plain LightningModule) and refuses ``"sum"``. Declare it as a class or instance attribute, e.g.
      ``loss_reduction = "sum"`` on a module whose ``training_step`` returns
      ``F.cross_entropy(..., reduction="sum")``; :class:`~lightning_txopt.TransformerModule` has it (default
      ``"auto"``).
    * ``count_loss_items(batch)`` (optional): the number of items the module's summed loss sums over, an int or a
      0-dim tensor. With ``normalize="tokens"`` and no ``count_items``, the callback counts items with it when the
      module has it (``TransformerModule`` counts shifted labels for causal LMs), else with
      :func:`count_label_items`.

    Windows: with ``interval="epoch"`` they are Lightning's (aligned to multiples of the factor from the epoch start);
    with ``interval="step"`` a factor that starts at some optimizer step starts full windows there (see
    :func:`window_end`); the epoch end cuts the last one short. :func:`count_optimizer_steps` counts the same windows.

    Sharded training (``docs/fsdp.md``): Lightning's loop runs ``strategy.block_backward_sync()`` around the
    micro-batches that do not step, which enters ``strategy.model.no_sync()`` when the model passes Lightning's
    ``DistributedDataParallel`` check, a runtime-checkable Protocol whose only member is ``no_sync``. DDP passes it,
    and so does FSDP1's ``FullyShardedDataParallel`` (``FSDPStrategy``); FSDP2 (``ModelParallelStrategy``, whose
    ``strategy.model`` is the LightningModule) does not, and reduce-scatters every micro-batch. This callback
    switches the reduction off itself for every micro-batch of a window but its last
    (:class:`~lightning_txopt.utils.sharding.GradientSync`: FSDP1's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync``), so a window costs one reduction under both, as under DDP. Each rank then holds
    its unsharded gradients until the window's last backward; ``reduce_every_micro_batch=True`` keeps only sharded
    gradients instead, at the cost of a reduce-scatter per micro-batch (same result): the callback then also makes
    the strategy's ``block_backward_sync`` a no-op for the fit, so that Lightning does not skip FSDP1's reduction.

    Args:
        scheduling: ``{first epoch (or optimizer step): factor}``, e.g. ``{0: 1, 4: 8}``; before the first key the
            factor is 1.
        interval: ``"epoch"`` or ``"step"``: what the keys of ``scheduling`` count.
        normalize: ``"mean"`` (the module returns a mean loss; each micro-batch of a window weighs the same) or
            ``"tokens"`` (the module returns the loss *summed* over its items; the gradient is divided by the items
            of the whole window over all ranks).
        count_items: Function of a batch giving its item count (``normalize="tokens"``). ``None``: the module's
            ``count_loss_items`` if it has one, else :func:`count_label_items`. :func:`causal_lm_items` counts the
            shifted labels of a Hugging Face causal LM.
        reduce_every_micro_batch: Under FSDP (``FSDPStrategy``, ``ModelParallelStrategy``) only: reduce-scatter the
            gradient of every micro-batch (sharded gradient memory, one collective per micro-batch) instead of once
            per window (the default: unsharded gradients held through the window). Lightning's own skipping of the
            reduction (FSDP1's ``no_sync()`` through ``strategy.block_backward_sync``) is switched off for the fit.

    Raises:
        ValueError: On invalid arguments here; in ``setup`` with ``Trainer(accumulate_grad_batches > 1)``, with
            manual optimisation, with a strategy that accumulates itself (DeepSpeed), when the module's
            ``loss_reduction`` does not fit ``normalize`` (see the module contract), or with
            ``reduce_every_micro_batch=True`` under a strategy that is not FSDP (it would do nothing).
        RuntimeError: During training, if something else changed ``trainer.accumulate_grad_batches`` inside a window
            (e.g. Lightning's ``GradientAccumulationScheduler`` as well): the gradient would not be exact.

    Example:
        >>> cb = AccumulationScheduler({0: 2, 3: 8})
        >>> cb.factor_for(epoch=4, step=0)
        8
    """

    def __init__(
        self,
        scheduling: dict[int, int],
        *,
        interval: Interval = "epoch",
        normalize: Normalize = "mean",
        count_items: Callable[[Any], int | torch.Tensor] | None = None,
        reduce_every_micro_batch: bool = False,
    ) -> None:
        if not isinstance(reduce_every_micro_batch, bool):
            raise ValueError(f"`reduce_every_micro_batch` must be True or False, got {reduce_every_micro_batch!r}.")
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}.")
        if normalize not in ("mean", "tokens"):
            raise ValueError(f"`normalize` must be 'mean' or 'tokens', got {normalize!r}.")
        if count_items is not None and normalize != "tokens":
            raise ValueError(f"`count_items` is only used with normalize='tokens', got normalize={normalize!r}.")
        self.scheduling = _validate_scheduling(scheduling)
        self.interval: Interval = interval
        self.normalize: Normalize = normalize
        self.count_items = count_items
        self.reduce_every_micro_batch = reduce_every_micro_batch
        self.factor = factor_at(self.scheduling, 0)  # factor of the current (or last) window
        self.divisor = self.factor  # trainer.accumulate_grad_batches of the current (or last) window
        self.optimizer_steps = 0
        self.last_items: int | torch.Tensor = 0  # items of the last window over all ranks (a device tensor)
        self._counter: Callable[[Any], int | torch.Tensor] = count_items or count_label_items
        self._window_batches = 0
        self._window_end = 0  # last micro-batch (count in the epoch) of the open window
        self._window_items: torch.Tensor | int = 0
        self._resume_end = 0  # from a checkpoint taken inside a window: where that window ends
        self._resumed = False
        self._set_sum = False  # setup turned the module's loss_reduction from "auto" into "sum"
        self._managing = False  # setup passed: this callback sets trainer.accumulate_grad_batches
        self._scaler_checked = False
        self._sync: GradientSync | None = None  # FSDP: switches the gradient reduction off inside a window
        self._unblocked: Any = None  # reduce_every_micro_batch: the strategy whose block_backward_sync is a no-op

    def factor_for(self, *, epoch: int, step: int) -> int:
        """Factor in force at an epoch (``interval="epoch"``) or optimizer step (``interval="step"``)."""
        return factor_at(self.scheduling, epoch if self.interval == "epoch" else step)

    def total_optimizer_steps(self, trainer: pl.Trainer) -> int:
        """The true number of optimizer steps of ``trainer.fit``: use it for LR schedulers.

        Usually through :func:`estimated_optimizer_steps`, from ``on_train_start`` (or ``configure_optimizers``,
        where it sets up the training loader first, as ``trainer.estimated_stepping_batches`` does).

        Raises:
            ValueError: If the training loader has no length, or training is infinite.
        """
        if trainer.train_dataloader is None:  # as Trainer.estimated_stepping_batches does
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if batches == float("inf"):
            raise ValueError(
                "The training loader has no length: cannot count optimizer steps. Give its dataset a __len__, or "
                "size the LR schedule yourself."
            )
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            if trainer.max_steps < 0:
                raise ValueError(
                    f"Infinite training (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) has no step "
                    "count: set max_epochs or max_steps."
                )
            max_epochs = trainer.max_steps  # at least one step per epoch: max_steps caps the count
        else:
            max_epochs = max(trainer.max_epochs, 1)
        return count_optimizer_steps(int(batches), max_epochs, self.scheduling, self.interval, trainer.max_steps)

    def _check_loss_reduction(self, pl_module: pl.LightningModule) -> None:
        name = type(pl_module).__name__
        reduction = getattr(pl_module, "loss_reduction", None)
        if reduction is not None and reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"{name}.loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}.")
        if self.normalize == "mean":
            if reduction == "sum":
                raise ValueError(
                    f"AccumulationScheduler(normalize='mean') averages mean losses, but {name} declares "
                    "loss_reduction='sum' (losses summed over items). Use normalize='tokens', or return mean losses "
                    "and declare loss_reduction='mean'."
                )
            return
        if reduction == "sum":
            return
        if reduction == "auto":
            pl_module.loss_reduction = "sum"  # type: ignore[assignment]  # the contract: "auto" means sums when asked
            self._set_sum = True
            return
        declared = (
            "has no `loss_reduction` attribute" if reduction is None else f"declares loss_reduction={reduction!r}"
        )
        raise ValueError(
            f"AccumulationScheduler(normalize='tokens') divides the gradient by the items of the whole window, so "
            f"{name} must return its loss summed over items (e.g. F.cross_entropy(..., reduction='sum')) and declare "
            f'it with the attribute `loss_reduction = "sum"`; {name} {declared}. Return summed losses and declare '
            "them, or use normalize='mean'."
        )

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the module and the Trainer as setup found them (the module may be reused without this callback)."""
        if self._sync is not None:
            self._sync.enable()
            self._sync = None
        if self._unblocked is not None:
            vars(self._unblocked).pop("block_backward_sync", None)  # the class's method again
            self._unblocked = None
        if self._set_sum:
            pl_module.loss_reduction = "auto"  # type: ignore[assignment]
            self._set_sum = False
        if self._managing:
            trainer.accumulate_grad_batches = 1  # setup checked it was 1: the Trainer can fit again
            self._managing = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"AccumulationScheduler manages accumulation: remove Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}) (put the factor in `scheduling`, e.g. {{0: "
                f"{trainer.accumulate_grad_batches}}})."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AccumulationScheduler needs automatic optimisation; pl_module.automatic_optimization is False "
                "(accumulate in your own training_step instead)."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(f"{type(trainer.strategy).__name__} accumulates gradients itself; remove the callback.")
        if self.reduce_every_micro_batch and sharding_kind(trainer.strategy) is None:
            raise ValueError(
                f"AccumulationScheduler(reduce_every_micro_batch=True) applies to FSDPStrategy and "
                f"ModelParallelStrategy only; under {type(trainer.strategy).__name__} it would do nothing (Lightning "
                "skips DDP's all-reduce on micro-batches that do not step). Drop reduce_every_micro_batch."
            )
        self._check_loss_reduction(pl_module)
        if self.normalize == "tokens":
            own = getattr(pl_module, "count_loss_items", None)
            self._counter = self.count_items or (own if callable(own) else count_label_items)
        self._scaler_checked = False
        # a first value for code that reads it before training (trainer.estimated_stepping_batches)
        trainer.accumulate_grad_batches = self.factor_for(epoch=trainer.current_epoch, step=trainer.global_step)
        self._managing = True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resumed:  # as at the checkpoint: Lightning's restart reads it to tell whether that batch stepped
            trainer.accumulate_grad_batches = self.divisor
            self._resumed = False
        self._sync = None
        if sharding_kind(trainer.strategy) is not None and not self.reduce_every_micro_batch:
            sync = GradientSync(getattr(trainer.strategy, "model", None))  # wrapped / fully_shard-ed by now
            self._sync = sync if sync.available else None
        if self.reduce_every_micro_batch and self._unblocked is None:
            # Lightning's loop would enter FSDP1's no_sync() on the micro-batches that do not step (its DDP check
            # is a Protocol that FullyShardedDataParallel passes): reduce them all, as asked.
            vars(trainer.strategy)["block_backward_sync"] = _reduce_anyway  # shadows ParallelStrategy's method
            self._unblocked = trainer.strategy

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(trainer, pl_module)  # Lightning calls no teardown hook after an exception

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sync is not None:  # a run stopped inside a window (max_steps does not, max_time may)
            self._sync.enable()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # gradients are not checkpointed: after a (mid-window) resume, the window restarts empty
        self._window_batches = 0
        self._window_items = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_batches == 0:
            self._open_window(trainer, pl_module, batch_idx)
        elif trainer.accumulate_grad_batches != self.divisor:
            self._changed_elsewhere(trainer)
        self._window_batches += 1
        if self._sync is not None:  # FSDP: reduce the gradients once, in the window's last backward
            if batch_idx + 1 < self._window_end:
                self._sync.disable()
            else:
                self._sync.enable()
        if self.normalize == "tokens":
            items = self._counter(batch)
            self._window_items = self._window_items + (items.detach() if isinstance(items, torch.Tensor) else items)
            if not self._scaler_checked:
                self._scaler_checked = True
                self._lower_initial_loss_scale(trainer, pl_module, items)

    def _open_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Plan the window that starts at this micro-batch and tell Lightning where it ends."""
        start = batch_idx + 1  # Lightning's batch_progress.current.ready at this point
        epoch_batches = trainer.num_training_batches
        self.factor = self.factor_for(epoch=trainer.current_epoch, step=trainer.global_step)
        if self._resume_end >= start:  # the rest of a window a checkpoint cut: it ends where it would have
            end = int(min(self._resume_end, epoch_batches))
        else:
            end = window_end(start, self.factor, self.interval, epoch_batches)
        self._resume_end = 0
        self._window_end = end
        self.divisor = lightning_divisor(start, end, epoch_end=end >= epoch_batches)
        trainer.accumulate_grad_batches = self.divisor
        if batch_idx % self.divisor:
            # Lightning zeroes gradients only before micro-batches where batch_idx % divisor == 0: this window starts
            # elsewhere, so the previous window's gradients are cleared here.
            for optimizer in trainer.optimizers:
                pl_module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)

    def _changed_elsewhere(self, trainer: pl.Trainer) -> None:
        raise RuntimeError(
            f"trainer.accumulate_grad_batches changed to {trainer.accumulate_grad_batches} inside a window for which "
            f"AccumulationScheduler set {self.divisor}: something else sets it (Lightning's "
            "GradientAccumulationScheduler?). Let AccumulationScheduler alone manage accumulation."
        )

    def _lower_initial_loss_scale(self, trainer: pl.Trainer, pl_module: pl.LightningModule, items: Any) -> None:
        """Start fp16's GradScaler lower by the size of the backpropagated loss, once, at the start of a fresh fit.

        Lightning backpropagates ``summed loss / divisor``, about ``items / divisor`` times a mean loss: with the
        default initial scale (2**16, meant for mean losses) its fp16 gradients would overflow and GradScaler would
        skip about ``log2(items / divisor)`` steps while halving its way down. The scale is lowered by ``items``, the
        first micro-batch's count, not ``items / divisor``: the divisor is that of the first window, and later windows
        can have one as small as 1 (the window the epoch end cuts short has ``divisor >= its length``; a schedule's
        factor-1 phases), where the whole summed loss is backpropagated. Micro-batches with more items than the first
        can still overflow; GradScaler then skips that step and halves its scale, as it does for mean losses. The
        count is the maximum over ranks, so every rank starts at the same scale (DDP averages the scaled gradients of
        all ranks).
        """
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or trainer.global_step > 0:
            return
        count = torch.as_tensor(items, dtype=torch.float64, device=pl_module.device)
        count = trainer.strategy.reduce(count, reduce_op="max")
        multiple = float(count)  # once per fit, under fp16 only; any window's divisor is >= 1
        current = scaler.get_scale()
        new = float(2.0 ** max(math.floor(math.log2(current / max(multiple, 1.0))), 0))
        if new >= current:
            return
        set_loss_scale(scaler, new)
        rank_zero_info(
            f"AccumulationScheduler(normalize='tokens'): GradScaler starts at {new:g} instead of {current:g} "
            f"(a micro-batch's summed loss is ~{multiple:,.0f} times a mean loss)."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning divided every micro-batch loss by trainer.accumulate_grad_batches (== self.divisor for the whole
        # window) and DDP averaged over ranks; undo both and apply the intended normalisation.
        if self._window_batches == 0:
            return
        if trainer.accumulate_grad_batches != self.divisor:
            self._changed_elsewhere(trainer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.normalize == "mean":
            scale = self.divisor / self._window_batches
            self.last_items = 0
            if scale != 1.0 and grads:
                torch._foreach_mul_(grads, scale)
        else:
            # Stays on the device: reading the count (float(items)) would stall the host once per step.
            items = torch.as_tensor(self._window_items, dtype=torch.float64, device=pl_module.device)
            world = trainer.world_size
            if world > 1 and dist.is_available() and dist.is_initialized():
                dist.all_reduce(items)
            self.last_items = items
            scale_t = torch.where(items > 0, (self.divisor * world) / items.clamp_min(1.0), torch.ones_like(items))
            for dtype in {g.dtype for g in grads}:
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], scale_t.to(dtype))
        # Logged as device tensors made by a fill kernel: Lightning would copy a Python number to the device with a
        # blocking copy, a host-device sync per optimizer step.
        device = pl_module.device
        factor_value = torch.full((), float(self.factor), device=device)
        batches_value = torch.full((), float(self._window_batches), device=device)
        pl_module.log("accumulation/factor", factor_value, on_step=True, on_epoch=False)
        pl_module.log("accumulation/micro_batches", batches_value, on_step=True, on_epoch=False)
        if self.normalize == "tokens":
            pl_module.log("accumulation/items", self.last_items, on_step=True, on_epoch=False)
        self.optimizer_steps += 1
        self._window_batches = 0
        self._window_items = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "divisor": self.divisor,
            "optimizer_steps": self.optimizer_steps,
            "scheduling": dict(self.scheduling),
            # a checkpoint inside a window (e.g. at a mid-epoch validation): where that window ends
            "window_end": self._window_end if self._window_batches else 0,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = int(state_dict.get("factor", self.factor))
        self.divisor = int(state_dict.get("divisor", self.factor))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self._resume_end = int(state_dict.get("window_end", 0))
        self._resumed = True


def estimated_optimizer_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps of the run: from an :class:`AccumulationScheduler` among the callbacks, else Lightning's.

    The one place in the library that looks for the scheduler among ``trainer.callbacks``, so that LR schedules need
    not: use it instead of ``trainer.estimated_stepping_batches``, which assumes one constant factor, from
    ``on_train_start`` (the training loader exists; :class:`~lightning_txopt.TransformerModule` does this) or from
    ``configure_optimizers``.

    Raises:
        ValueError: As :meth:`AccumulationScheduler.total_optimizer_steps`.

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> class Model(BoringModel):
        ...     def on_train_start(self):
        ...         self.total_steps = estimated_optimizer_steps(self.trainer)
        >>> trainer = pl.Trainer(
        ...     accelerator="cpu", max_epochs=2, limit_train_batches=10, limit_val_batches=0, logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ...     callbacks=[AccumulationScheduler({0: 1, 1: 4})],
        ... )
        >>> model = Model()
        >>> trainer.fit(model)
        >>> model.total_steps, trainer.global_step  # 10 single steps, then windows of 4, 4 and 2
        (13, 13)
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, AccumulationScheduler):
            return callback.total_optimizer_steps(trainer)
    return int(trainer.estimated_stepping_batches)

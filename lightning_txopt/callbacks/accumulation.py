"""Exact, scheduled gradient accumulation: ``AccumulationScheduler`` and the pure step-count helpers.

Lightning's ``GradientAccumulationScheduler`` divides every micro-batch loss by the full factor (so the last,
incomplete window of an epoch is under-weighted, Lightning #19987), schedules only by epoch, forgets its factor on a
mid-epoch resume, and, like every mean-reduced loss, weights micro-batches equally however many tokens they hold
(Lightning #20350). This callback keeps Lightning's own accumulation machinery (windows end where
``batch % factor == 0`` counted from the epoch start, or at the epoch end; DDP's ``no_sync`` between steps) and fixes
the gradient just before the optimizer step, after AMP unscaling and before clipping:

* ``normalize="mean"``: the gradient is the mean of the micro-batch gradients that are really in the window;
* ``normalize="tokens"``: the LightningModule returns the loss *summed* over its items, and the gradient is
  ``sum of item losses over the window and all ranks / number of items over the window and all ranks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = [
    "AccumulationScheduler",
    "causal_lm_items",
    "count_label_items",
    "count_optimizer_steps",
    "estimated_optimizer_steps",
    "factor_at",
]

Interval = Literal["epoch", "step"]
Normalize = Literal["mean", "tokens"]


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


def count_optimizer_steps(
    batches_per_epoch: int,
    max_epochs: int,
    scheduling: Mapping[int, int],
    interval: Interval = "epoch",
    max_steps: int = -1,
) -> int:
    """Number of optimizer steps a run makes under an accumulation schedule (what LR schedulers need).

    Windows end where ``batch % factor == 0`` (batches counted from 1 at each epoch start) or at the epoch end; with
    ``interval="step"`` the factor is re-read after every optimizer step.

    Example:
        >>> count_optimizer_steps(10, 3, {0: 1, 1: 4})  # 10 + ceil(10 / 4) * 2
        16
        >>> count_optimizer_steps(10, 1, {0: 1, 3: 4}, interval="step")  # 3 single steps, then windows 4, 8, 10
        6
    """
    if batches_per_epoch < 0 or max_epochs < 0:
        raise ValueError("`batches_per_epoch` and `max_epochs` must be >= 0.")
    schedule = _validate_scheduling(scheduling)
    steps = 0
    for epoch in range(max_epochs):
        if interval == "epoch":
            steps += math.ceil(batches_per_epoch / factor_at(schedule, epoch))
        else:
            pos = 0
            while pos < batches_per_epoch:
                k = factor_at(schedule, steps)
                pos = min((pos // k + 1) * k, batches_per_epoch)
                steps += 1
                if 0 <= max_steps <= steps:
                    return max_steps
        if 0 <= max_steps <= steps:
            return max_steps
    return steps


def count_label_items(batch: Any) -> int | torch.Tensor:
    """Default item count: ``(batch["labels"] != -100).sum()`` (one item per labelled token or per sample).

    Raises:
        KeyError: If the batch has no ``labels``; pass ``count_items=`` to the scheduler.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise KeyError(
            "AccumulationScheduler(normalize='tokens') counts items as batch['labels'] != -100, but the batch has no "
            "'labels'. Pass count_items=<function of the batch>."
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

    Args:
        scheduling: ``{first epoch (or optimizer step): factor}``, e.g. ``{0: 1, 4: 8}``; before the first key the
            factor is 1.
        interval: ``"epoch"`` or ``"step"``: what the keys of ``scheduling`` count.
        normalize: ``"mean"`` (the module returns a mean loss; each micro-batch of a window weighs the same) or
            ``"tokens"`` (the module returns the loss *summed* over its items; the gradient is divided by the items
            of the whole window over all ranks).
        count_items: Function of a batch giving its item count (``normalize="tokens"``); default counts
            ``labels != -100``. Use :func:`causal_lm_items` for Hugging Face causal LMs.

    Raises:
        ValueError: On invalid arguments here, and in ``setup`` with ``Trainer(accumulate_grad_batches > 1)``, with
            manual optimisation, or with a strategy that accumulates itself (DeepSpeed).

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
    ) -> None:
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}.")
        if normalize not in ("mean", "tokens"):
            raise ValueError(f"`normalize` must be 'mean' or 'tokens', got {normalize!r}.")
        if count_items is not None and normalize != "tokens":
            raise ValueError("`count_items` is only used with normalize='tokens'.")
        self.scheduling = _validate_scheduling(scheduling)
        self.interval: Interval = interval
        self.normalize: Normalize = normalize
        self.count_items = count_items or count_label_items
        self.factor = factor_at(self.scheduling, 0)
        self.optimizer_steps = 0
        self._window_batches = 0
        self._window_items: torch.Tensor | int = 0
        self.last_items: int | torch.Tensor = 0  # items of the last window over all ranks (a device tensor)
        self._scaler_checked = False

    def factor_for(self, *, epoch: int, step: int) -> int:
        """Factor in force at an epoch (``interval="epoch"``) or optimizer step (``interval="step"``)."""
        return factor_at(self.scheduling, epoch if self.interval == "epoch" else step)

    def total_optimizer_steps(self, trainer: pl.Trainer) -> int:
        """The true number of optimizer steps of ``trainer.fit``: use it for LR schedulers.

        Call it from ``configure_optimizers`` (see :func:`estimated_optimizer_steps`).
        """
        if trainer.train_dataloader is None:  # as Trainer.estimated_stepping_batches does
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if batches == float("inf"):
            raise ValueError("The training loader has no length: cannot count optimizer steps.")
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            if trainer.max_steps < 0:
                raise ValueError("Infinite training (max_epochs=-1, max_steps=-1) has no step count.")
            max_epochs = trainer.max_steps  # at least one step per epoch: max_steps caps the count
        else:
            max_epochs = max(trainer.max_epochs, 1)
        return count_optimizer_steps(int(batches), max_epochs, self.scheduling, self.interval, trainer.max_steps)

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
            raise ValueError("AccumulationScheduler needs automatic optimisation (pl_module.automatic_optimization).")
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(f"{type(trainer.strategy).__name__} accumulates gradients itself; remove the callback.")
        trainer.accumulate_grad_batches = self.factor_for(epoch=trainer.current_epoch, step=trainer.global_step)
        if self.normalize == "tokens" and getattr(pl_module, "loss_reduction", None) == "auto":
            pl_module.loss_reduction = "sum"  # type: ignore[assignment]  # the module's declared contract

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # gradients are not checkpointed: after a (mid-window) resume, the window restarts empty
        self._window_batches = 0
        self._window_items = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_batches == 0:  # a new window: the factor in force now applies to all of it
            self.factor = self.factor_for(epoch=trainer.current_epoch, step=trainer.global_step)
            trainer.accumulate_grad_batches = self.factor
            if batch_idx % self.factor:
                # Lightning zeroes gradients only where batch_idx % factor == 0; after a mid-epoch factor change the
                # window starts elsewhere, so the previous window's gradients must be cleared here.
                for optimizer in trainer.optimizers:
                    pl_module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        self._window_batches += 1
        if self.normalize == "tokens":
            items = self.count_items(batch)
            self._window_items = self._window_items + (items.detach() if isinstance(items, torch.Tensor) else items)
            if not self._scaler_checked:
                self._scaler_checked = True
                self._lower_initial_loss_scale(trainer, items)

    def _lower_initial_loss_scale(self, trainer: pl.Trainer, items: int | torch.Tensor) -> None:
        """Start fp16's GradScaler lower by the expected items per step, once, at the start of a fresh fit.

        A summed loss is ``items`` times a mean loss; with the default initial scale (2**16) its scaled gradients
        overflow fp16 and GradScaler would skip about ``log2(items)`` first steps while halving its way down.
        """
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or trainer.global_step > 0:
            return
        per_step = max(float(items) * self.factor * trainer.world_size, 1.0)  # once per fit, under fp16 only
        current = scaler.get_scale() if scaler._scale is not None else scaler._init_scale
        new = float(2.0 ** max(math.floor(math.log2(current / per_step)), 0))
        if new >= current:
            return
        if scaler._scale is None:  # not used yet: scale() creates it from _init_scale
            scaler._init_scale = new
        else:
            scaler.update(new_scale=new)
        rank_zero_info(
            f"AccumulationScheduler(normalize='tokens'): GradScaler starts at {new:g} instead of {current:g} "
            f"(summed losses of ~{per_step:,.0f} items per step)."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning divided every micro-batch loss by trainer.accumulate_grad_batches (== self.factor for the whole
        # window) and DDP averaged over ranks; undo both and apply the intended normalisation.
        if self._window_batches == 0:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.normalize == "mean":
            scale = self.factor / self._window_batches
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
            scale_t = torch.where(items > 0, (self.factor * world) / items.clamp_min(1.0), torch.ones_like(items))
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
        return {"factor": self.factor, "optimizer_steps": self.optimizer_steps, "scheduling": dict(self.scheduling)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = int(state_dict.get("factor", self.factor))
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))


def estimated_optimizer_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps of the run: from an :class:`AccumulationScheduler` among the callbacks, else Lightning's.

    Use it in ``configure_optimizers`` instead of ``trainer.estimated_stepping_batches``, which assumes one constant
    factor.
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, AccumulationScheduler):
            return callback.total_optimizer_steps(trainer)
    return int(trainer.estimated_stepping_batches)

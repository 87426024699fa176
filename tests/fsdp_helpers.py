"""Test helpers for sharded training (FSDP1 ``FSDPStrategy``, FSDP2 ``ModelParallelStrategy``), shared by the CPU
twin (``tests/callbacks/test_fsdp_cpu.py``, two gloo processes) and the GPU tests (``tests/gpu/test_fsdp.py``).

Importable by spawned processes: heavy imports stay inside functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_txopt.module import TransformerModule
from lightning_txopt.utils.blocks import find_block_lists
from lightning_txopt.utils.sharding import clean_name
from tests.helpers import tensor_sum, tiny_bert

REDUCE_COLLECTIVES = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single")


FROZEN = (  # the tiny BERT's embedding tables, as FreezeEmbeddings freezes them, named inside a LightningModule
    "model.bert.embeddings.word_embeddings.weight",
    "model.bert.embeddings.position_embeddings.weight",
    "model.bert.embeddings.token_type_embeddings.weight",
)


def fsdp2_available() -> bool:
    """torch's ``fully_shard`` and Lightning's ``ModelParallelStrategy`` are both there."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return torch.distributed.is_available()


def shard_model(model: nn.Module, mesh: Any, *, shard_blocks: bool = True, checkpoint_blocks: bool = False) -> None:
    """FSDP2 the usual way: ``fully_shard`` each block (``shard_blocks``), then the whole model.

    Each block once, also when it is shared by several positions (that is what ParameterSharing must refuse).
    ``checkpoint_blocks`` wraps each block in torch's ``checkpoint_wrapper`` first (torchtitan's order).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):  # configure_model runs again in a later fit of the same module
        return
    for found in find_block_lists(model):
        done: set[int] = set()
        for i, block in enumerate(found.blocks):
            if id(block) in done:
                continue
            done.add(id(block))
            if checkpoint_blocks:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                block = checkpoint_wrapper(block)
                found.replace(i, block)
            if shard_blocks:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class FSDP2Transformer(TransformerModule):
    """``TransformerModule`` with the ``configure_model`` that ``ModelParallelStrategy`` needs (FSDP2 path)."""

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])


def parameter_at(module: nn.Module, name: str) -> Any:
    """The tensor at a parameter's unwrapped name (as :func:`clean_name` writes it), read attribute by attribute.

    FSDP1's and ``checkpoint_wrapper``'s wrappers forward attribute reads to the module they wrap, so the unwrapped
    path reaches the tensor whether or not ``named_parameters()`` lists it. FSDP1 (``use_orig_params=True``) stops
    listing the parameters of a unit that is all frozen once its output requires grad (FreezeEmbeddings' forward hook
    on embedding units of their own): the pre-backward unshard sets them as plain tensors, and no post-backward hook
    (the unit gets no gradient) sets them back as parameters.
    """
    return functools.reduce(getattr, name.split("."), module)


def _full(t: Any) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu().clone()


def full_parameters(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter in full on the CPU, under its unwrapped name (``DTensor``s gathered: a collective).

    ``names``: only those (unwrapped names), read with :func:`parameter_at`, so also where FSDP1 no longer lists
    them. FSDP1 parameters are taken as they are: full on one process (FSDP1 runs ``NO_SHARD`` there).
    """
    if names is not None:
        return {name: _full(parameter_at(module, name)) for name in names}
    return {clean_name(name): _full(p) for name, p in module.named_parameters()}


def full_gradients(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient in full on the CPU (``None`` where there is none), under its unwrapped name."""
    out: dict[str, torch.Tensor | None] = {}
    for name, p in module.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[clean_name(name)] = None if g is None else g.detach().cpu().clone()
    return out


class ShardedSumModule(pl.LightningModule):
    """A tiny BERT classifier whose SGD (lr=1) update is minus its gradient; records what it trains on.

    ``loss_reduction`` is declared (``"sum"`` or ``"mean"``), as AccumulationScheduler requires. Under
    ``ModelParallelStrategy`` its ``configure_model`` applies :func:`shard_model`; under ``FSDPStrategy`` Lightning
    wraps it. It records every micro-batch, the full parameters before training and after every micro-batch, and the
    number of reduction collectives run during each backward (``comms``: ``(micro-batch index, count, stepped)``).
    """

    def __init__(
        self,
        reduction: str = "sum",
        *,
        num_layers: int = 2,
        shard_blocks: bool = True,
        checkpoint_blocks: bool = False,
        record: bool = True,
    ) -> None:
        super().__init__()
        self.model = tiny_bert(num_layers)
        self.reduction = reduction
        self.loss_reduction = reduction
        self.shard_blocks = shard_blocks
        self.checkpoint_blocks = checkpoint_blocks
        self.record = record
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.grad_present_after_backward: list[bool] = []
        self.comms: list[tuple[int, int, bool]] = []
        self._counting: list[int] | None = None
        self._counted = 0
        self._step_before = 0

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None:
            shard_model(
                self.model,
                mesh["data_parallel"],
                shard_blocks=self.shard_blocks,
                checkpoint_blocks=self.checkpoint_blocks,
            )

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = self.model(**inputs).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction=self.reduction, ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.record:
            self.micro_batches.append({k: v.detach().cpu() for k, v in batch.items()})
        return self.loss(batch)

    def on_train_start(self) -> None:
        if self.record:
            self.snapshots.append((self.trainer.global_step, full_parameters(self)))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_before = self.trainer.global_step

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._counting = [0]

    def on_after_backward(self) -> None:
        last: Any = self.model.bert.encoder.layer[-1]  # a BertLayer, or its FSDP1 wrapper (which forwards attributes)
        probe = last.output.dense.weight
        self.grad_present_after_backward.append(probe.grad is not None)
        self._counted = self._counting[0] if self._counting is not None else 0
        self._counting = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.comms.append((batch_idx, self._counted, self.trainer.global_step != self._step_before))
        if self.record:
            self.snapshots.append((self.trainer.global_step, full_parameters(self)))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


@contextmanager
def counting_reductions(module: ShardedSumModule) -> Iterator[None]:
    """Count the reduction collectives of ``torch.distributed`` that run while ``module`` is in a backward pass.

    FSDP calls them through the ``torch.distributed`` module at call time, so wrapping the module's functions sees
    every gradient reduction (FSDP1: ``all_reduce`` on one process, ``reduce_scatter_tensor`` on several; FSDP2:
    ``reduce_scatter_single`` or ``reduce_scatter_tensor``).
    """
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in REDUCE_COLLECTIVES if hasattr(dist, name)}

    def wrap(fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if module._counting is not None:
                module._counting[0] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def windows(snapshots: list[tuple[int, dict[str, torch.Tensor]]]) -> list[tuple[int, int, dict, dict]]:
    """(first micro-batch, end micro-batch, parameters before, after) of each optimizer step."""
    out = []
    start, before = 0, snapshots[0][1]
    for i in range(1, len(snapshots)):
        if snapshots[i][0] != snapshots[i - 1][0]:
            out.append((start, i, before, snapshots[i][1]))
            start, before = i, snapshots[i][1]
    return out


def reference_window_gradient(
    before: dict[str, torch.Tensor],
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    reduction: str = "sum",
    frozen: tuple[str, ...] = (),
    share: int | None = None,
    num_layers: int = 2,
) -> dict[str, torch.Tensor]:
    """The exact gradient of one window, computed unsharded in one process from the recorded micro-batches.

    ``"sum"``: summed losses over all micro-batches (of all ranks) divided by their items (labels != -100);
    ``"mean"``: the mean over micro-batches (of all ranks) of each one's mean loss (what DDP/FSDP averaging gives
    when every rank holds the same number of micro-batches).
    Names are ``model.<...>`` as in :func:`full_parameters`; ``share`` applies ``share_layers`` first.
    """
    from lightning_txopt.callbacks import share_layers

    ref = ShardedSumModule(reduction, num_layers=num_layers, record=False)
    if share is not None:
        share_layers(ref.model, num_unique_layers=share)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, value in before.items():
            params[name].copy_(value)
    for name in frozen:
        params[name].requires_grad_(False)
    if reduction == "sum":
        items = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        total = tensor_sum(ref.loss(b) for b in micro_batches) / items
    else:
        total = tensor_sum(ref.loss(b) for b in micro_batches) / len(micro_batches)
    total.backward()
    return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def assert_update_is_gradient(
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    gradient: dict[str, torch.Tensor],
    rel: float = 1e-5,
) -> None:
    """SGD with lr=1 moved every parameter by minus ``gradient``: each parameter within ``rel`` of its own scale (plus
    ``rel`` of the largest gradient entry, for the cancellations of fp32 sums), and all together within ``rel`` (L2).
    """
    from tests.helpers import assert_close_relative

    assert gradient, "no reference gradients"
    scale = max(float(g.abs().max()) for g in gradient.values())
    num = den = 0.0
    for name, grad in gradient.items():
        delta = before[name] - after[name]
        assert_close_relative(delta, grad, rel, msg=name, atol=rel * scale)
        num += float((delta - grad).pow(2).sum())
        den += float(grad.pow(2).sum())
    assert (num / den) ** 0.5 <= rel, f"relative L2 error {(num / den) ** 0.5:.3g} > {rel:g}"

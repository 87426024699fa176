"""What the callbacks need to know about sharded training: which strategy shards, and how a sharded model looks.

Two sharded strategies of Lightning are recognised:

* ``"fsdp"``: ``FSDPStrategy`` (``strategy="fsdp"``), torch's ``FullyShardedDataParallel`` wrapper ("FSDP1"). It
  wraps the LightningModule in ``strategy.setup``, after the callbacks' ``setup``, with its ``auto_wrap_policy``; each
  unit's parameters live in one flat tensor, and the original parameters become views of it
  (``use_orig_params=True``, Lightning's default).
* ``"model_parallel"``: ``ModelParallelStrategy``, where the LightningModule's ``configure_model`` applies torch's
  ``fully_shard`` ("FSDP2") itself, after the callbacks' ``setup``; parameters become ``DTensor`` shards.

Everything here reads public attributes of Lightning's strategies and public torch classes; the one private torch
import (the class of ``checkpoint_wrapper``'s modules) is isolated in :func:`checkpoint_wrapper_type`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "GradientSync",
    "ShardingKind",
    "checkpoint_wrapper_type",
    "clean_name",
    "gradient_free_in_units",
    "is_sharded_unit",
    "local_numel",
    "local_tensor",
    "policy_text",
    "policy_wraps",
    "sharded_units",
    "sharding_kind",
    "strategy_description",
]

ShardingKind = Literal["fsdp", "model_parallel"]
# Name segments that wrappers insert into parameter and module names (FSDP1, checkpoint_wrapper, torch.compile).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def sharding_kind(strategy: Any) -> ShardingKind | None:
    """``"fsdp"`` for Lightning's ``FSDPStrategy``, ``"model_parallel"`` for ``ModelParallelStrategy``, else ``None``.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
        >>> sharding_kind(FSDPStrategy()), sharding_kind(DDPStrategy())
        ('fsdp', None)
    """
    from lightning.pytorch import strategies

    if isinstance(strategy, strategies.FSDPStrategy):
        return "fsdp"
    model_parallel = getattr(strategies, "ModelParallelStrategy", None)  # Lightning >= 2.4
    if model_parallel is not None and isinstance(strategy, model_parallel):
        return "model_parallel"
    return None


def strategy_description(strategy: Any) -> str:
    """The strategy as a user would write it, for error messages: ``FSDPStrategy(use_orig_params=False)``.

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> strategy_description(FSDPStrategy(auto_wrap_policy={nn.TransformerEncoderLayer}))
        'FSDPStrategy(auto_wrap_policy={TransformerEncoderLayer})'
    """
    name = type(strategy).__name__
    if sharding_kind(strategy) != "fsdp":
        return name
    kwargs = getattr(strategy, "kwargs", {}) or {}
    shown = []
    policy = kwargs.get("auto_wrap_policy")
    if policy is not None:
        shown.append(f"auto_wrap_policy={policy_text(policy)}")
    if kwargs.get("use_orig_params") is False:
        shown.append("use_orig_params=False")
    return f"{name}({', '.join(shown)})"


def policy_text(policy: Any) -> str:
    """An ``auto_wrap_policy`` as a user writes it: ``{BertLayer}`` for a set or a ``ModuleWrapPolicy``, else its repr.

    A ``ModuleWrapPolicy`` (what Lightning builds from a set of classes) is read from its public ``repr``.

    Example:
        >>> from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        >>> policy_text(ModuleWrapPolicy({nn.Linear}))
        '{Linear}'
    """
    if isinstance(policy, set | frozenset):
        return "{" + ", ".join(sorted(c.__name__ for c in policy)) + "}"
    text = repr(policy)
    found = re.search(r"\(\{(.*)\}\)$", text)
    if type(policy).__name__ == "ModuleWrapPolicy" and found:
        names = sorted(n.rpartition(".")[2] for n in re.findall(r"<class '([^']+)'>", found.group(1)))
        return "{" + ", ".join(names) + "}"
    return text


def clean_name(name: str) -> str:
    """A parameter or module name without the segments that wrappers insert (FSDP1, ``checkpoint_wrapper``, compile).

    Example:
        >>> clean_name("model.bert.encoder.layer.0._fsdp_wrapped_module._checkpoint_wrapped_module.output.dense.bias")
        'model.bert.encoder.layer.0.output.dense.bias'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _fsdp1_class() -> type[nn.Module] | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        return None
    return FSDPModule


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether ``module`` was sharded with FSDP2's ``fully_shard`` (it is then an ``FSDPModule``).

    Example:
        >>> is_fsdp2_module(nn.Linear(2, 2))
        False
    """
    fsdp2 = _fsdp2_class()
    return fsdp2 is not None and isinstance(module, fsdp2)


def is_sharded_unit(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP unit: an FSDP1 ``FullyShardedDataParallel`` or an FSDP2 ``fully_shard``-ed module.

    Example:
        >>> is_sharded_unit(nn.Linear(2, 2))
        False
    """
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    return (fsdp1 is not None and isinstance(module, fsdp1)) or (fsdp2 is not None and isinstance(module, fsdp2))


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units in ``model`` (itself included), in module order; see :func:`is_sharded_unit`.

    Example:
        >>> sharded_units(nn.Sequential(nn.Linear(2, 2)))  # nothing sharded
        []
    """
    return [m for m in model.modules() if is_sharded_unit(m)]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor`` (FSDP2), else ``tensor`` itself.

    In-place changes to the result change the ``DTensor``.

    Example:
        >>> t = torch.ones(2)
        >>> local_tensor(t) is t
        True
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds: a ``DTensor``'s local shard; an FSDP1 parameter's view of the local flat shard.

    Example:
        >>> local_numel(torch.zeros(3, 4))
        12
    """
    return int(local_tensor(tensor).numel())


def checkpoint_wrapper_type() -> type[nn.Module] | None:
    """The class of torch's ``checkpoint_wrapper`` modules (``activation_checkpointing_policy``), or ``None``.

    The one private torch import of the library: ``CheckpointWrapper`` lives in
    ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` (where Lightning imports it from too). A test
    (``tests/utils/test_sharding.py``) fails if it moves.

    Example:
        >>> checkpoint_wrapper_type().__name__
        'CheckpointWrapper'
    """
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    except ImportError:
        return None
    return CheckpointWrapper


def policy_wraps(policy: Any, module: nn.Module) -> bool | None:
    """Whether an FSDP1 ``auto_wrap_policy`` would give ``module`` an FSDP unit of its own; ``None`` if it cannot tell.

    A set of classes (as ``FSDPStrategy`` takes it), a ``ModuleWrapPolicy`` and the callable policies
    (``size_based_auto_wrap_policy``, ``functools.partial`` of ``lambda_auto_wrap_policy``, or any
    ``fn(module, recurse, nonwrapped_numel)``) are asked through their public calling convention, with all of
    ``module``'s parameters counted as not yet wrapped (an upper bound for size-based policies). Other policy objects
    (``CustomPolicy``) cannot be asked: ``None``.

    Example:
        >>> policy_wraps({nn.Linear}, nn.Linear(2, 2)), policy_wraps({nn.Linear}, nn.ReLU())
        (True, False)
    """
    if policy is None:
        return False
    if isinstance(policy, set | frozenset | list | tuple):
        return isinstance(module, tuple(policy))
    if not callable(policy):
        return None
    numel = sum(p.numel() for p in module.parameters())
    try:
        return bool(policy(module=module, recurse=False, nonwrapped_numel=numel))
    except TypeError:
        return None


def gradient_free_in_units(model: nn.Module) -> set[int]:
    """Ids of the frozen parameters that hold no gradient memory under FSDP1: those of units with no trainable one.

    FSDP1 keeps one flat gradient per unit that has any trainable parameter, frozen parameters' elements included
    (PyTorch #104967); only a unit whose own parameters (those not inside a nested unit) are all frozen has no
    gradient. Without FSDP1 units in ``model``: every frozen parameter (DDP and FSDP2 allocate gradients per
    trainable parameter).

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> _ = model[0].weight.requires_grad_(False)
        >>> gradient_free_in_units(model) == {id(model[0].weight)}  # no FSDP1 unit
        True
    """
    fsdp1 = _fsdp1_class()
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    if fsdp1 is None or not any(isinstance(m, fsdp1) for m in model.modules()):
        return frozen
    owner: dict[int, int] = {}
    trainable_units: set[int] = set()
    counter = iter(range(1, 1 << 62))

    def walk(module: nn.Module, unit: int) -> None:
        if isinstance(module, fsdp1):
            unit = next(counter)
        for p in module.parameters(recurse=False):
            if id(p) not in owner:
                owner[id(p)] = unit
                if p.requires_grad:
                    trainable_units.add(unit)
        for child in module.children():
            walk(child, unit)

    walk(model, 0)  # unit 0: parameters outside every unit (not sharded: their gradients are per parameter)
    return {i for i in frozen if owner.get(i, 0) == 0 or owner[i] not in trainable_units}


class GradientSync:
    """Switch off, and back on, the gradient reduction of a sharded model for intermediate micro-batches.

    Lightning's training loop skips the gradient reduction on micro-batches that do not step by entering
    ``strategy.model.no_sync()`` where the model passes its ``DistributedDataParallel`` check (a Protocol whose only
    member is ``no_sync``): DDP and FSDP1's wrapper (``FSDPStrategy``) pass it, FSDP2 (``ModelParallelStrategy``,
    whose model is the LightningModule) does not and reduce-scatters every micro-batch's gradient. This switch does
    it for both, whatever Lightning does, with the public APIs: FSDP1's ``FullyShardedDataParallel.no_sync()`` on
    the root unit (``strategy.model``), FSDP2's ``FSDPModule.set_requires_gradient_sync`` on the outermost
    ``fully_shard``-ed modules. While off, each rank accumulates its unsharded gradients (the memory of the full
    gradient); the next reduction, on the stepping micro-batch, reduces their sum, which equals the sum of the
    per-micro-batch reductions.

    Args:
        strategy_model: ``trainer.strategy.model`` (the FSDP1 root wrapper, or the LightningModule under FSDP2).

    Example:
        >>> GradientSync(nn.Linear(2, 2)).available  # nothing sharded: nothing to switch
        False
    """

    def __init__(self, strategy_model: nn.Module | None) -> None:
        self._fsdp1_root: Any = None
        self._fsdp2_roots: list[Any] = []
        self._stack: contextlib.ExitStack | None = None
        if strategy_model is None:
            return
        fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
        if fsdp1 is not None and isinstance(strategy_model, fsdp1):
            self._fsdp1_root = strategy_model
        elif fsdp2 is not None:
            self._fsdp2_roots = list(_outermost(strategy_model, fsdp2))

    @property
    def available(self) -> bool:
        """Whether the model has sharded units whose reduction this switch controls."""
        return self._fsdp1_root is not None or bool(self._fsdp2_roots)

    @property
    def off(self) -> bool:
        """Whether reduction is switched off now."""
        return self._stack is not None

    def disable(self) -> None:
        """Skip the gradient reduction of the following backward passes (until :meth:`enable`)."""
        if self._stack is not None or not self.available:
            return
        stack = contextlib.ExitStack()
        if self._fsdp1_root is not None:
            stack.enter_context(self._fsdp1_root.no_sync())
        for module in self._fsdp2_roots:
            module.set_requires_gradient_sync(False)
            stack.callback(module.set_requires_gradient_sync, True)
        self._stack = stack

    def enable(self) -> None:
        """Reduce gradients again from the next backward pass on (the accumulated ones with them)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def _outermost(model: nn.Module, cls: type) -> Iterator[nn.Module]:
    """The modules of class ``cls`` in ``model`` that have no ancestor of that class."""

    def walk(module: nn.Module) -> Iterator[nn.Module]:
        if isinstance(module, cls):
            yield module
            return
        for child in module.children():
            yield from walk(child)

    yield from walk(model)

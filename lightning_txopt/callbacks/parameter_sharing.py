"""Cross-layer parameter sharing: ``share_layers(model, ...)`` and the ``ParameterSharing`` callback.

``strategy="all"`` is ALBERT's (one block everywhere); ``"sequence"``, ``"cycle"`` and ``"cycle_rev"`` are the
strategies of Takase & Kiyono, *Lessons on Parameter Sharing across Layers in Transformers* (2021). With ``M`` unique
blocks over ``N`` positions (1-based in the paper, 0-based here):

* ``sequence``: position ``i`` uses block ``floor(i * M / N)`` — (1,1,2,2,3,3) for N=6, M=3;
* ``cycle``: block ``i mod M`` — (1,2,3,1,2,3);
* ``cycle_rev``: ``cycle`` for the first ``M * (ceil(N / M) - 1)`` positions, then reversed — (1,2,3,3,2,1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_txopt.utils.blocks import find_block_list

__all__ = ["ParameterSharing", "SharingResult", "layer_mapping", "share_layers"]

Strategy = Literal["all", "sequence", "cycle", "cycle_rev"]
_STRATEGIES = ("all", "sequence", "cycle", "cycle_rev")
_INITS = ("first", "average")


def layer_mapping(num_layers: int, num_unique_layers: int, strategy: Strategy = "cycle") -> list[int]:
    """Which unique block each of ``num_layers`` positions uses.

    Raises:
        ValueError: On an unknown strategy, ``num_unique_layers`` outside ``[1, num_layers]``, or
            ``strategy="all"`` with ``num_unique_layers != 1``.

    Example:
        >>> layer_mapping(6, 3, "sequence"), layer_mapping(6, 3, "cycle"), layer_mapping(6, 3, "cycle_rev")
        ([0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2], [0, 1, 2, 2, 1, 0])
        >>> layer_mapping(4, 1, "all")
        [0, 0, 0, 0]
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}, got {strategy!r}.")
    if isinstance(num_unique_layers, bool) or not isinstance(num_unique_layers, int):
        raise ValueError(f"`num_unique_layers` must be an integer, got {num_unique_layers!r}.")
    if not 1 <= num_unique_layers <= num_layers:
        raise ValueError(
            f"`num_unique_layers` must be in [1, {num_layers}] (the model's layers), got {num_unique_layers}."
        )
    if strategy == "all":
        if num_unique_layers != 1:
            raise ValueError(
                f"strategy='all' shares one block everywhere: num_unique_layers must be 1, got {num_unique_layers}."
            )
        return [0] * num_layers
    n, m = num_layers, num_unique_layers
    if strategy == "sequence":
        return [i * m // n for i in range(n)]
    if strategy == "cycle":
        return [i % m for i in range(n)]
    head = m * (math.ceil(n / m) - 1)
    return [i % m if i < head else m - 1 - (i % m) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class SharingResult:
    """What :func:`share_layers` did.

    Attributes:
        block_list: Qualified name of the block list.
        mapping: Unique block used at each position.
        params_before: Unique parameters of the model before sharing.
        params_after: Unique parameters after sharing.
    """

    block_list: str
    mapping: tuple[int, ...]
    params_before: int
    params_after: int


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def share_layers(
    model: nn.Module,
    *,
    num_unique_layers: int,
    strategy: Strategy = "cycle",
    init: Literal["first", "average"] = "first",
    block_classes: Sequence[str] | None = None,
) -> SharingResult:
    """Share parameters across the repeated blocks of ``model`` (in place).

    Position ``i`` of the block list is replaced by the block that represents its group (the same module object), so
    shared parameters appear once in ``model.parameters()`` and in the optimizer, and a checkpoint stores their
    storage once. ``init="first"`` keeps the first pretrained block of each group; ``init="average"`` sets it to the
    mean of the group's blocks (buffers are taken from the first). Pretrained weights are never replaced by random
    ones. Calling it again with the same mapping is a no-op.

    Caution: a Hugging Face decoder's KV cache is indexed by layer; shared blocks make one cache slot serve several
    positions, so ``use_cache`` is turned off (training does not use it).

    Args:
        model: The model.
        num_unique_layers: Number of distinct blocks after sharing.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"`` or ``"cycle_rev"``.
        init: ``"first"`` or ``"average"``.
        block_classes: Class names of the blocks, overriding detection.

    Returns:
        A :class:`SharingResult` with the parameter counts.

    Raises:
        ValueError: On invalid arguments, a model without a block list, or blocks already shared differently.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
        >>> result = share_layers(model, num_unique_layers=3, strategy="cycle_rev")
        >>> result.mapping, result.params_before // result.params_after
        ((0, 1, 2, 2, 1, 0), 2)
        >>> model.layers[0] is model.layers[5]
        True
    """
    if init not in _INITS:
        raise ValueError(f"`init` must be one of {_INITS}, got {init!r}.")
    found = find_block_list(model, block_classes)
    blocks = found.blocks
    mapping = layer_mapping(len(blocks), num_unique_layers, strategy)
    before = _count(model)
    # current sharing, if any: position -> index of the first position holding the same module
    first_pos: dict[int, int] = {}
    current = [first_pos.setdefault(id(b), i) for i, b in enumerate(blocks)]
    representatives = [mapping.index(u) for u in range(num_unique_layers)]
    wanted = [representatives[u] for u in mapping]
    if current == wanted:
        return SharingResult(found.name, tuple(mapping), before, before)
    if len(set(current)) != len(blocks):
        raise ValueError(f"The blocks of {found.name} are already shared with another mapping; build a fresh model.")
    if init == "average":
        with torch.no_grad():
            for u in range(num_unique_layers):
                members = [blocks[i] for i, g in enumerate(mapping) if g == u]
                if len(members) == 1:
                    continue
                named = [dict(m.named_parameters()) for m in members]
                for name, p in named[0].items():
                    p.copy_(torch.stack([nm[name].detach().float() for nm in named]).mean(0).to(p.dtype))
    for i, u in enumerate(mapping):
        found.container[i] = blocks[representatives[u]]
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    return SharingResult(found.name, tuple(mapping), before, _count(model))


class ParameterSharing(Callback):
    """Apply :func:`share_layers` to the LightningModule in ``setup``, before the optimizer is built and DDP wraps it.

    Resuming with ``Trainer.fit(ckpt_path=...)`` into a freshly built model works: sharing is applied in ``setup``,
    then the checkpoint's weights are loaded into the shared blocks. To load a checkpoint without a Trainer, call
    :func:`share_layers` with the same arguments on the fresh model first (or load it unshared: the weights are
    equal, only the storage is not shared).

    Args:
        num_unique_layers: Number of distinct blocks after sharing.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"`` or ``"cycle_rev"``.
        init: ``"first"`` or ``"average"``.
        block_classes: Class names of the blocks, overriding detection.

    Raises:
        ValueError: On invalid arguments (checked here; the layer count is checked in ``setup``).
    """

    def __init__(
        self,
        num_unique_layers: int,
        *,
        strategy: Strategy = "cycle",
        init: Literal["first", "average"] = "first",
        block_classes: list[str] | None = None,
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"`strategy` must be one of {_STRATEGIES}, got {strategy!r}.")
        if init not in _INITS:
            raise ValueError(f"`init` must be one of {_INITS}, got {init!r}.")
        if isinstance(num_unique_layers, bool) or not isinstance(num_unique_layers, int) or num_unique_layers < 1:
            raise ValueError(f"`num_unique_layers` must be a positive integer, got {num_unique_layers!r}.")
        if strategy == "all" and num_unique_layers != 1:
            raise ValueError(
                f"strategy='all' shares one block everywhere: num_unique_layers must be 1, got {num_unique_layers}."
            )
        self.num_unique_layers = num_unique_layers
        self.strategy: Strategy = strategy
        self.init: Literal["first", "average"] = init
        self.block_classes = block_classes
        self.result: SharingResult | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        result = share_layers(
            pl_module,
            num_unique_layers=self.num_unique_layers,
            strategy=self.strategy,
            init=self.init,
            block_classes=self.block_classes,
        )
        if self.result is None:
            self.result = result
            rank_zero_info(
                f"ParameterSharing: {len(result.mapping)} blocks of {result.block_list} share "
                f"{self.num_unique_layers} unique block(s) ({self.strategy}: {list(result.mapping)}); parameters "
                f"{result.params_before:,} -> {result.params_after:,}."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_unique_layers": self.num_unique_layers, "strategy": self.strategy, "init": self.init}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("num_unique_layers"), state_dict.get("strategy"))
        if saved != (self.num_unique_layers, self.strategy):
            raise ValueError(
                f"The checkpoint was trained with ParameterSharing(num_unique_layers={saved[0]}, "
                f"strategy={saved[1]!r}), this callback has ({self.num_unique_layers}, {self.strategy!r}): "
                "the weights would not fit."
            )

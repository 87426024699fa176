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

from lightning_txopt.utils.blocks import BlockList, disable_kv_cache, find_block_lists
from lightning_txopt.utils.checks import check_positive_int
from lightning_txopt.utils.sharding import (
    clean_name,
    is_sharded_unit,
    policy_wraps,
    sharding_kind,
    strategy_description,
)

__all__ = [
    "ParameterSharing",
    "SharingResult",
    "check_shared_blocks_unsplit",
    "check_sharing_wrap_policy",
    "layer_mapping",
    "share_layers",
]

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
        block_list: Qualified name of the (first) block list.
        mapping: Unique block used at each position of ``block_list``.
        params_before: Unique parameters of the model before sharing.
        params_after: Unique parameters after sharing.
        block_lists: Every block list shared, in model order (each stack of an encoder-decoder).
        mappings: The mapping of each of ``block_lists``.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        >>> result = share_layers(model, num_unique_layers=2, strategy="cycle_rev")
        >>> result.block_list, result.mapping, result.params_before, result.params_after
        ('layers', (0, 1, 1, 0), 2400, 1200)
    """

    block_list: str
    mapping: tuple[int, ...]
    params_before: int
    params_after: int
    block_lists: tuple[str, ...] = ()
    mappings: tuple[tuple[int, ...], ...] = ()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# A layer index only selects the layer's KV-cache slot, and the cache is turned off; it matters when a module also has
# a switch like GPT-2's `scale_attn_by_inverse_layer_idx`, which is checked in `_settings`.
_LAYER_INDEX = ("layer_idx", "layer_id", "layer_index")
# T5's first block of each stack computes the relative position bias and hands it to the later blocks, which then
# ignore their own setting: the first block may serve later positions although it alone holds the bias table.
_FIRST_BLOCK_ONLY = ("relative_attention_bias", "has_relative_attention_bias")
_PLAIN = (int, float, str, bool, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _settings(module: nn.Module) -> dict[str, Any]:
    """The plain-valued public attributes of ``module`` that change what it computes (layer indices left out)."""
    attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _plain(v)}
    index_matters = any(v is True and "layer_idx" in k for k, v in attrs.items() if k not in _LAYER_INDEX)
    return {k: v for k, v in attrs.items() if index_matters or k not in _LAYER_INDEX}


def _signature(block: nn.Module) -> dict[str, Any]:
    sig: dict[str, Any] = {}
    for path, module in block.named_modules():
        sig[f"{path or '.'} (module)"] = type(module).__qualname__
        for k, v in _settings(module).items():
            sig[f"{path}.{k}" if path else k] = v
    for path, p in block.named_parameters():
        sig[f"{path} (parameter)"] = tuple(p.shape)
    for path, buf in block.named_buffers():
        sig[f"{path} (buffer)"] = tuple(buf.shape)
    return sig


def _differences(rep: nn.Module, block: nn.Module, rep_is_first: bool) -> list[str]:
    """How ``block`` differs from ``rep`` beyond its weights (empty if ``rep`` can take its place)."""
    a, b = _signature(rep), _signature(block)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(absent)") == b.get(key, "(absent)"):
            continue
        if rep_is_first and any(part in _FIRST_BLOCK_ONLY for part in key.split(" ")[0].split(".")):
            continue
        out.append(f"{key}: {b.get(key, '(absent)')!r} here, {a.get(key, '(absent)')!r} in the shared block")
    return out


def share_layers(
    model: nn.Module,
    *,
    num_unique_layers: int,
    strategy: Strategy = "cycle",
    init: Literal["first", "average"] = "first",
    block_classes: Sequence[str] | None = None,
) -> SharingResult:
    """Share parameters across the repeated blocks of ``model`` (in place).

    Each block list of the model (both stacks of an encoder-decoder, each with its own ``num_unique_layers`` blocks)
    is shared: position ``i`` is replaced by the block that represents its group (the same module object, the
    group's first position), so shared parameters appear once in ``model.parameters()`` and in the optimizer, and a
    checkpoint stores their storage once. ``init="first"`` keeps the first pretrained block of each group;
    ``init="average"`` sets it to the mean of the group's blocks (each parameter over the blocks that have it;
    buffers are taken from the first). Pretrained weights are never replaced by random ones. Calling it again with the
    same mapping is a no-op.

    A position may only use a block that differs from its own by the weights alone: blocks whose settings differ
    (ModernBERT's global and local attention layers, Qwen2's full and sliding-window layers) are refused where the
    mapping would mix them. A layer's index (its KV-cache slot) does not count; ``use_cache`` is turned off on every
    configuration of the model, since shared blocks would share a cache slot.

    Args:
        model: The model.
        num_unique_layers: Number of distinct blocks of each block list after sharing.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"`` or ``"cycle_rev"``.
        init: ``"first"`` or ``"average"``.
        block_classes: Class names of the blocks, overriding detection.

    Returns:
        A :class:`SharingResult` with the parameter counts.

    Raises:
        ValueError: On invalid arguments, a model without a block list, ``num_unique_layers`` equal to the number of
            blocks (nothing would be shared), blocks already shared differently, or a position whose block differs
            from the one it would share beyond the weights.

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
    lists = find_block_lists(model, block_classes)
    before = _count(model)
    plans: list[tuple[BlockList, list[int], list[int]]] = []  # (block list, mapping, wanted representatives)
    already = 0
    for found in lists:
        blocks = found.blocks
        mapping = layer_mapping(len(blocks), num_unique_layers, strategy)
        # current sharing, if any: position -> index of the first position holding the same module
        first_pos: dict[int, int] = {}
        current = [first_pos.setdefault(id(b), i) for i, b in enumerate(blocks)]
        representatives = [mapping.index(u) for u in range(num_unique_layers)]
        wanted = [representatives[u] for u in mapping]
        if current == wanted:
            already += 1
        elif len(set(current)) != len(blocks):
            raise ValueError(
                f"The blocks of {found.name} are already shared with another mapping; build a fresh model."
            )
        plans.append((found, mapping, wanted))
    result_lists = tuple(found.name for found in lists)
    result_maps = tuple(tuple(mapping) for _, mapping, _ in plans)
    if all(len(set(wanted)) == len(wanted) for _, _, wanted in plans):
        sizes = ", ".join(f"{found.name}: {len(found)}" for found in lists)
        raise ValueError(
            f"num_unique_layers={num_unique_layers} is the number of blocks ({sizes}): nothing would be shared. "
            "Pass a smaller num_unique_layers, or do not share."
        )
    if already == len(plans):
        return SharingResult(lists[0].name, result_maps[0], before, before, result_lists, result_maps)
    for found, _, wanted in plans:
        blocks = found.blocks
        for i, r in enumerate(wanted):
            if r == i:
                continue
            diffs = _differences(blocks[r], blocks[i], rep_is_first=r == 0)
            if diffs:
                raise ValueError(
                    f"share_layers(num_unique_layers={num_unique_layers}, strategy={strategy!r}) on "
                    f"{_describe(model, found.name)}: position {i} of {found.name} would use block {r}, which "
                    "differs from "
                    f"its own block beyond the weights ({'; '.join(diffs[:3])}). Sharing would change what position "
                    f"{i} computes. Choose a mapping in which every position uses a block of its own kind (e.g. "
                    "strategy='cycle' with num_unique_layers a multiple of the layer pattern), or make the layers "
                    "uniform in the model's config."
                )
    for found, mapping, wanted in plans:
        blocks = found.blocks
        if init == "average":
            _average(blocks, mapping, num_unique_layers)
        for i, r in enumerate(wanted):
            found.replace(i, blocks[r])
    disable_kv_cache(model)
    return SharingResult(lists[0].name, result_maps[0], before, _count(model), result_lists, result_maps)


def _describe(model: nn.Module, block_list: str) -> str:
    """``model``'s class, and that of the configured model holding ``block_list`` if it is another (an HF model)."""
    parts = block_list.split(".")
    for k in range(len(parts)):
        inner = model.get_submodule(".".join(parts[:k]))
        if hasattr(inner, "config"):
            return type(model).__name__ if inner is model else f"{type(model).__name__} ({type(inner).__name__})"
    return type(model).__name__


def _average(blocks: list[nn.Module], mapping: list[int], num_unique_layers: int) -> None:
    """Set each group's first block to the mean of the group (each parameter over the blocks that have it)."""
    with torch.no_grad():
        for u in range(num_unique_layers):
            members = [blocks[i] for i, g in enumerate(mapping) if g == u]
            if len(members) == 1:
                continue
            named = [dict(m.named_parameters()) for m in members]
            for name, p in named[0].items():
                values = [nm[name].detach().float() for nm in named if name in nm]
                p.copy_(torch.stack(values).mean(0).to(p.dtype))


def _groups(mapping: Sequence[int]) -> list[list[int]]:
    """The positions of each unique block that is used at several positions."""
    positions: dict[int, list[int]] = {}
    for i, u in enumerate(mapping):
        positions.setdefault(u, []).append(i)
    return [p for p in positions.values() if len(p) > 1]


def _positions(container: Any) -> list[nn.Module]:
    """The module at each position of a block list (a shared module once per position it is used at)."""
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


def _unit_advice(holder: str, block_list: str, fsdp2: bool) -> str:
    """What to shard instead: the module holding the shared block list (class ``holder``), or the whole model."""
    if fsdp2:
        return (
            f"Shared blocks must sit in one FSDP unit: in configure_model, fully_shard the module that holds "
            f"{block_list} ({holder}) or the whole model, not the shared blocks or modules inside them (see "
            "docs/fsdp.md)."
        )
    return (
        f"Shared blocks must sit in one FSDP unit: use auto_wrap_policy={{{holder}}} (the module that holds "
        f"{block_list}) or no auto_wrap_policy (the whole model is one unit), not the block class (see docs/fsdp.md)."
    )


def check_sharing_wrap_policy(model: nn.Module, result: SharingResult, policy: Any, strategy: str = "FSDP") -> None:
    """Refuse an FSDP1 ``auto_wrap_policy`` that would put shared blocks, or parts of them, in units of their own.

    FSDP shards each unit's parameters separately and runs each unit's hooks once per use: a block shared by
    several positions that is a unit of its own (or holds one) would have its parameters owned by one unit but used
    outside it, which breaks sharding. A block used at one position only may be wrapped.

    Args:
        model: The model :func:`share_layers` shared (names in ``result`` are relative to it).
        result: What :func:`share_layers` did.
        policy: ``FSDPStrategy``'s ``auto_wrap_policy`` (``strategy.kwargs["auto_wrap_policy"]``): a set of classes,
            a ``ModuleWrapPolicy`` or a callable policy; ``None`` wraps nothing.
        strategy: The strategy as written, for the message.

    Raises:
        ValueError: If the policy wraps a shared block or a module inside one, or is a policy object that cannot be
            asked (``CustomPolicy``); the message names the policy to use.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        >>> result = share_layers(model, num_unique_layers=2)
        >>> check_sharing_wrap_policy(model, result, {nn.TransformerEncoder})  # the holder: fine
        >>> check_sharing_wrap_policy(model, result, {nn.TransformerEncoderLayer})
        Traceback (most recent call last):
        ...
        ValueError: ParameterSharing under FSDP: the auto_wrap_policy gives the shared block TransformerEncoderLayer ...
    """
    if policy is None:
        return
    for name, mapping in zip(result.block_lists, result.mappings, strict=True):
        container = model.get_submodule(name)
        parent = name.rpartition(".")[0]
        advice = _unit_advice(type(model.get_submodule(parent) if parent else model).__name__, name, fsdp2=False)
        blocks = _positions(container)
        for positions in _groups(mapping):
            block = blocks[positions[0]]
            for sub_name, sub in block.named_modules():
                wraps = policy_wraps(policy, sub)
                if wraps is False:
                    continue
                what = f"the shared block {type(block).__name__}" + (
                    f"'s {sub_name} ({type(sub).__name__})" if sub_name else ""
                )
                if wraps is None:
                    raise ValueError(
                        f"ParameterSharing under {strategy}: cannot tell whether the auto_wrap_policy {policy!r} "
                        f"gives {what} (used at positions {positions} of {name}) an FSDP unit of its own. Pass "
                        f"the policy as a set of module classes. {advice}"
                    )
                raise ValueError(
                    f"ParameterSharing under {strategy}: the auto_wrap_policy gives {what} (used at positions "
                    f"{positions} of {name}) an FSDP unit of its own, so the shared parameters would be owned by "
                    f"one unit and used outside it, which breaks sharding. {advice}"
                )


def check_shared_blocks_unsplit(
    model: nn.Module, result: SharingResult, strategy: str = "the strategy", *, fsdp2: bool = True
) -> None:
    """Refuse a sharded model whose shared blocks are, or hold, FSDP units, or no longer share one module.

    Run after the strategy has wrapped the model (FSDP1) or ``configure_model`` has applied ``fully_shard`` (FSDP2).
    Block lists are found by their names in ``result``, without the segments FSDP1 inserts into names.

    Args:
        model: The model as sharded (the LightningModule).
        result: What :func:`share_layers` did to it.
        strategy: The strategy's name, for the message.
        fsdp2: Advise on ``fully_shard`` (``True``) or on FSDP1's ``auto_wrap_policy``.

    Raises:
        ValueError: Naming the shared block and the module to shard instead.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        >>> check_shared_blocks_unsplit(model, share_layers(model, num_unique_layers=2))  # no units: fine
    """
    modules = {clean_name(n): m for n, m in model.named_modules()}
    for name, mapping in zip(result.block_lists, result.mappings, strict=True):
        container = modules.get(name)
        if container is None:
            continue
        holder = type(modules.get(name.rpartition(".")[0], model)).__name__
        blocks = _positions(container)
        for positions in _groups(mapping):
            held = [blocks[i] for i in positions]
            split = any(b is not held[0] for b in held)
            units = [
                sub_name or "the block itself" for sub_name, sub in held[0].named_modules() if is_sharded_unit(sub)
            ]
            if split or units:
                how = "is no longer one module at those positions" if split else f"holds an FSDP unit ({units[0]})"
                raise ValueError(
                    f"ParameterSharing under {strategy}: the shared block {type(held[0]).__name__} (positions "
                    f"{positions} of {name}) {how}: FSDP shards each unit's parameters separately, so parameters "
                    f"shared across units break sharding. {_unit_advice(holder, name, fsdp2)}"
                )


class ParameterSharing(Callback):
    """Apply :func:`share_layers` to the LightningModule in ``setup``, before the optimizer is built and DDP wraps it.

    Resuming with ``Trainer.fit(ckpt_path=...)`` into a freshly built model works: sharing is applied in ``setup``,
    then the checkpoint's weights are loaded into the shared blocks. To load a checkpoint without a Trainer, call
    :func:`share_layers` with the same arguments on the fresh model first (or load it unshared: the weights are
    equal, only the storage is not shared).

    Args:
        num_unique_layers: Number of distinct blocks of each block list after sharing.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"`` or ``"cycle_rev"``.
        init: ``"first"`` or ``"average"``.
        block_classes: Class names of the blocks, overriding detection.

    Sharded training (``docs/fsdp.md``): shared blocks must sit in one FSDP unit, with the other blocks of their
    list. Under ``FSDPStrategy`` the ``auto_wrap_policy`` must not wrap the shared block class (or a module inside
    it): wrap the module that holds the block list (``auto_wrap_policy={BertEncoder}``) or nothing; this is checked
    in ``setup``, before FSDP wraps the model. Under ``ModelParallelStrategy``, ``configure_model`` must
    ``fully_shard`` that holder or the whole model, not the shared blocks; this is checked at ``on_fit_start``, after
    ``configure_model``.

    Raises:
        ValueError: On invalid arguments (checked here); in ``setup``, whatever :func:`share_layers` refuses (a layer
            count that leaves nothing to share, blocks that differ beyond their weights), and under ``FSDPStrategy``
            what :func:`check_sharing_wrap_policy` refuses; at ``on_fit_start`` under ``FSDPStrategy`` or
            ``ModelParallelStrategy``, what :func:`check_shared_blocks_unsplit` refuses.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_txopt import BucketDataModule, TransformerModule
        >>> module = TransformerModule(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 4,
        ...     "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}, num_labels=2)
        >>> samples = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in (2, 3, 4, 5) * 2]
        >>> data = BucketDataModule(samples, pad_token_id=0, batch_size=4, shuffle=False)
        >>> sharing = ParameterSharing(2, strategy="cycle")  # 4 layers, 2 unique blocks: 1, 2, 1, 2
        >>> trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[sharing], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> sharing.result.mapping, sharing.result.params_before, sharing.result.params_after
        ((0, 1, 0, 1), 18258, 13810)
        >>> module.model.bert.encoder.layer[0] is module.model.bert.encoder.layer[2]
        True
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
        check_positive_int("num_unique_layers", num_unique_layers)
        if strategy == "all" and num_unique_layers != 1:
            raise ValueError(
                f"strategy='all' shares one block everywhere: num_unique_layers must be 1, got {num_unique_layers}."
            )
        self.num_unique_layers = int(num_unique_layers)  # a plain int in the checkpointed state
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
        if sharding_kind(trainer.strategy) == "fsdp":  # before FSDP1 wraps the model with its policy
            policy = (getattr(trainer.strategy, "kwargs", None) or {}).get("auto_wrap_policy")
            check_sharing_wrap_policy(pl_module, result, policy, strategy_description(trainer.strategy))
        if self.result is None:
            self.result = result
            stacks = "; ".join(
                f"{len(mapping)} blocks of {name} share {len(set(mapping))} ({self.strategy}: {list(mapping)})"
                for name, mapping in zip(result.block_lists, result.mappings, strict=True)
            )
            rank_zero_info(
                f"ParameterSharing: {stacks}; parameters {result.params_before:,} -> {result.params_after:,}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kind = sharding_kind(trainer.strategy)
        if kind is not None and self.result is not None:  # the model is wrapped / fully_shard-ed now
            check_shared_blocks_unsplit(
                pl_module, self.result, type(trainer.strategy).__name__, fsdp2=kind == "model_parallel"
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

"""Freeze the input embeddings during fine-tuning: ``freeze_embeddings(model)`` and the ``FreezeEmbeddings`` callback.

Frozen embeddings get no gradients and no optimizer state: for BERT-base's 23.8M embedding parameters, AdamW's
8 bytes per parameter (~190 MB) plus ~95 MB of fp32 gradients are never allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_txopt.utils.blocks import find_block_list

__all__ = ["FreezeEmbeddings", "FrozenEmbeddings", "find_input_embeddings", "freeze_embeddings", "unfreeze_embeddings"]

_HOOKS_ATTR = "_txopt_frozen_embedding_hooks"


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules(remove_duplicate=False)}


def find_input_embeddings(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Find the modules that embed the input: token, position and token-type tables.

    Detection, in order: ``names`` when given (qualified module names); else the module returned by Hugging Face's
    ``get_input_embeddings()`` and the other ``nn.Embedding`` tables beside it (its parent's direct children, e.g.
    BERT's ``position_embeddings``/``token_type_embeddings`` or GPT-2's ``wpe``); else every ``nn.Embedding`` outside
    the model's repeated block list.

    Args:
        model: Any model.
        names: Qualified module names to use instead of detection.

    Returns:
        ``{qualified name: module}`` in model order.

    Raises:
        ValueError: If a name in ``names`` does not exist or nothing is found.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20))
        >>> list(find_input_embeddings(model))
        ['embeddings.word_embeddings', 'embeddings.position_embeddings', 'embeddings.token_type_embeddings']
    """
    modules = dict(model.named_modules())
    if names is not None:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"No module named {missing[0]!r} in {type(model).__name__}; pass qualified module names.")
        return {n: modules[n] for n in names}
    found: dict[str, nn.Module] = {}
    getter = getattr(model, "get_input_embeddings", None)
    token: nn.Module | None = None
    if callable(getter):
        try:
            token = getter()
        except (NotImplementedError, AttributeError):
            token = None
    if isinstance(token, nn.Module):
        by_module = _module_names(model)
        token_name = by_module[token]
        parent_name = token_name.rpartition(".")[0]
        parent = modules[parent_name] if parent_name else model
        found[token_name] = token
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Embedding) and child is not token:
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    else:
        try:
            blocks_name = find_block_list(model).name
        except ValueError:
            blocks_name = None
        for name, module in model.named_modules():
            inside = blocks_name is not None and (name == blocks_name or name.startswith(blocks_name + "."))
            if isinstance(module, nn.Embedding) and not inside:
                found[name] = module
    if not found:
        raise ValueError(
            f"No input embeddings found in {type(model).__name__}: no get_input_embeddings() and no nn.Embedding "
            "outside the block list. Pass `names=[...]` with the qualified module names to freeze."
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], 0)))


@dataclasses.dataclass
class FrozenEmbeddings:
    """What :func:`freeze_embeddings` froze.

    Attributes:
        modules: Qualified names of the frozen modules.
        parameters: Qualified names of the frozen parameters.
        num_parameters: Number of frozen scalars.
        tied: ``{frozen parameter: other names of the same tensor}`` for weights shared with other modules (e.g. an
            LM head tied to the token embedding); empty after ``untie=True``.
    """

    modules: list[str]
    parameters: list[str]
    num_parameters: int
    tied: dict[str, list[str]]

    def optimizer_bytes_saved(self, bytes_per_param: int = 8) -> int:
        """Optimizer state not allocated (AdamW: two fp32 moments = 8 bytes per parameter)."""
        return self.num_parameters * bytes_per_param


def _tied_names(model: nn.Module, frozen: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Names under which the frozen tensors also appear outside the frozen modules."""
    prefixes = tuple(n + "." for n in frozen)
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    tied: dict[str, list[str]] = {}
    for mod_name, module in frozen.items():
        for pname, p in module.named_parameters(recurse=False):
            others = [n for n in by_tensor.get(id(p), []) if not n.startswith(prefixes)]
            if others:
                tied[f"{mod_name}.{pname}"] = others
    return tied


def _untie(model: nn.Module, tied: dict[str, list[str]]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    for others in tied.values():
        for other in others:
            mod_name, _, pname = other.rpartition(".")
            owner = modules[mod_name] if mod_name else model
            shared = getattr(owner, pname)
            setattr(owner, pname, nn.Parameter(shared.detach().clone(), requires_grad=True))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # so that a later tie_weights() does not tie them again


def _require_grad_hook(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
        return output.requires_grad_(True)
    return output


def freeze_embeddings(
    model: nn.Module,
    *,
    names: Sequence[str] | None = None,
    include_layernorm: bool = False,
    untie: bool = False,
) -> FrozenEmbeddings:
    """Freeze the input embeddings of ``model`` (``requires_grad=False``).

    The embedding outputs are marked as requiring grad (a forward hook), so that blocks under a *reentrant*
    gradient checkpoint still receive gradients when their only input comes from frozen embeddings.

    Args:
        model: Any model; see :func:`find_input_embeddings` for what counts as an input embedding.
        names: Qualified module names to freeze instead of detection.
        include_layernorm: Also freeze the ``nn.LayerNorm`` beside the embeddings (BERT's ``embeddings.LayerNorm``).
            Off by default: it is tiny and adapts the frozen features.
        untie: Give modules that share a frozen tensor (GPT-2's LM head) their own trainable copy. Without it the
            shared tensor is frozen for them too, with a warning.

    Returns:
        A :class:`FrozenEmbeddings` summary.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20, max_position_embeddings=16))
        >>> result = freeze_embeddings(model)
        >>> result.num_parameters, model.embeddings.word_embeddings.weight.requires_grad
        (304, False)
        >>> model.embeddings.LayerNorm.weight.requires_grad
        True
    """
    targets = find_input_embeddings(model, names)
    if include_layernorm:
        modules = dict(model.named_modules())
        for name in list(targets):
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else model
            if any(True for _ in parent.children() if isinstance(_, nn.ModuleList | nn.Sequential)):
                continue  # the parent holds the blocks too (GPT-2): its norms are not embedding norms
            for child_name, child in parent.named_children():
                if isinstance(child, nn.LayerNorm):
                    targets[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    tied = _tied_names(model, targets)
    if tied and untie:
        _untie(model, tied)
        tied = {}
    elif tied:
        rank_zero_warn(
            "freeze_embeddings: "
            + "; ".join(f"{k} is shared with {', '.join(v)}" for k, v in tied.items())
            + ". The shared tensor is frozen there too (e.g. the LM head). Pass untie=True to train a separate "
            "copy, or exclude it with names=[...]."
        )
    frozen_params: list[str] = []
    count = 0
    seen: set[int] = set()
    for mod_name, module in targets.items():
        for pname, p in module.named_parameters(recurse=False):
            p.requires_grad_(False)
            p.grad = None
            frozen_params.append(f"{mod_name}.{pname}")
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    hooks: list[RemovableHandle] = getattr(model, _HOOKS_ATTR, [])
    for module in targets.values():
        if isinstance(module, nn.Embedding):
            hooks.append(module.register_forward_hook(_require_grad_hook))
    object.__setattr__(model, _HOOKS_ATTR, hooks)
    return FrozenEmbeddings(modules=list(targets), parameters=frozen_params, num_parameters=count, tied=tied)


def unfreeze_embeddings(model: nn.Module, frozen: FrozenEmbeddings | Sequence[str]) -> list[nn.Parameter]:
    """Make the parameters frozen by :func:`freeze_embeddings` trainable again.

    Args:
        model: The model.
        frozen: The summary returned by :func:`freeze_embeddings`, or qualified parameter names.

    Returns:
        The parameters made trainable (each tensor once).
    """
    names = frozen.parameters if isinstance(frozen, FrozenEmbeddings) else list(frozen)
    params = dict(model.named_parameters(remove_duplicate=False))
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for name in names:
        p = params[name]
        p.requires_grad_(True)
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    for handle in getattr(model, _HOOKS_ATTR, []):
        handle.remove()
    object.__setattr__(model, _HOOKS_ATTR, [])
    return out


class FreezeEmbeddings(Callback):
    """Freeze the input embeddings before the optimizer is built; optionally unfreeze them at an epoch.

    Applied in ``setup`` (before ``configure_optimizers`` and before DDP wraps the model). At ``on_fit_start`` the
    frozen parameters are taken out of every optimizer's parameter groups, so they hold no optimizer state and no
    weight decay touches them. With ``unfreeze_at_epoch=N`` they become trainable at the start of epoch ``N`` and
    join each optimizer as a new parameter group whose learning rate is ``lr_factor`` times that of the group they
    came from (other hyper-parameters copied from it); LR schedulers that keep per-group ``base_lrs`` (``LambdaLR``,
    ``StepLR``, ``CosineAnnealingLR``, ...) are extended so the new group follows the same schedule. A resume from
    any checkpoint, before or after ``N``, mid-epoch included, restores the frozen/unfrozen state and the groups.

    Under DDP, parameters that were frozen when DDP wrapped the model are unknown to its reducer; after unfreezing,
    this callback all-reduces (averages) their gradients itself after the last backward of each optimizer step.

    Args:
        unfreeze_at_epoch: Epoch at whose start the embeddings become trainable; ``None`` keeps them frozen.
        lr_factor: Learning-rate factor of the unfrozen group relative to the group the parameters came from.
        names: Qualified module names to freeze instead of detection.
        include_layernorm: Also freeze the embeddings' LayerNorm.
        untie: Untie weights shared with the embeddings (GPT-2's LM head) instead of freezing them there too.

    Raises:
        ValueError: If ``unfreeze_at_epoch < 0`` or ``lr_factor <= 0``.
    """

    def __init__(
        self,
        *,
        unfreeze_at_epoch: int | None = None,
        lr_factor: float = 1.0,
        names: list[str] | None = None,
        include_layernorm: bool = False,
        untie: bool = False,
    ) -> None:
        if unfreeze_at_epoch is not None and (not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0):
            raise ValueError(f"`unfreeze_at_epoch` must be a non-negative integer or None, got {unfreeze_at_epoch!r}.")
        if not lr_factor > 0:
            raise ValueError(f"`lr_factor` must be > 0, got {lr_factor!r}.")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_factor = float(lr_factor)
        self.names = names
        self.include_layernorm = include_layernorm
        self.untie = untie
        self.frozen: FrozenEmbeddings | None = None
        self.unfrozen = False
        self._source_group: dict[int, int] = {}  # optimizer index -> group the embeddings were taken from
        self._sync_params: list[nn.Parameter] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.frozen is not None:
            return
        self.frozen = freeze_embeddings(
            pl_module, names=self.names, include_layernorm=self.include_layernorm, untie=self.untie
        )
        if self.unfrozen:  # restored from a checkpoint taken after unfreezing
            unfreeze_embeddings(pl_module, self.frozen)
        rank_zero_info(
            f"FreezeEmbeddings: froze {len(self.frozen.modules)} module(s) ({', '.join(self.frozen.modules)}), "
            f"{self.frozen.num_parameters:,} parameters: {self.frozen.num_parameters * 4 / 2**20:,.1f} MiB of fp32 "
            f"gradients and {self.frozen.optimizer_bytes_saved() / 2**20:,.1f} MiB of AdamW state not allocated"
            + (f"; trainable again from epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch is not None else "")
            + ("; restored as unfrozen" if self.unfrozen else "")
            + "."
        )

    def _frozen_params(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        assert self.frozen is not None
        params = dict(pl_module.named_parameters(remove_duplicate=False))
        out: dict[int, nn.Parameter] = {}
        for name in self.frozen.parameters:
            out.setdefault(id(params[name]), params[name])
        return list(out.values())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen is None:
            return
        targets = {id(p) for p in self._frozen_params(pl_module)}
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            for group_idx, group in enumerate(optimizer.param_groups):
                kept = [p for p in group["params"] if id(p) not in targets]
                if len(kept) != len(group["params"]):
                    self._source_group.setdefault(opt_idx, group_idx)
                    group["params"] = kept
        if self.unfrozen:  # resumed after the unfreeze epoch: rebuild the group before optimizer states load
            self._add_groups(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen is None or self.unfrozen or self.unfreeze_at_epoch is None:
            return
        if trainer.current_epoch >= self.unfreeze_at_epoch:
            unfreeze_embeddings(pl_module, self.frozen)
            self.unfrozen = True
            self._add_groups(trainer, pl_module)
            rank_zero_info(
                f"FreezeEmbeddings: epoch {trainer.current_epoch}: {self.frozen.num_parameters:,} embedding "
                f"parameters are trainable again (lr factor {self.lr_factor})."
            )

    def _add_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._frozen_params(pl_module)
        for p in params:
            p.requires_grad_(True)
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            source = optimizer.param_groups[self._source_group.get(opt_idx, 0)]
            group = {k: v for k, v in source.items() if k != "params"}
            group["lr"] = source["lr"] * self.lr_factor
            if "initial_lr" in source:
                group["initial_lr"] = source["initial_lr"] * self.lr_factor
            group["params"] = params
            optimizer.add_param_group(group)
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if getattr(scheduler, "optimizer", None) is not optimizer or not hasattr(scheduler, "base_lrs"):
                    continue
                scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
                lambdas = getattr(scheduler, "lr_lambdas", None)
                if isinstance(lambdas, list) and lambdas:
                    lambdas.append(lambdas[self._source_group.get(opt_idx, 0)])
                last = getattr(scheduler, "_last_lr", None)
                if isinstance(last, list):
                    last.append(group["lr"])
        self._sync_params = params if trainer.world_size > 1 else []

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # DDP does not reduce parameters that were frozen when it wrapped the model: average their gradients here,
        # once per optimizer step, before AMP's GradScaler unscales and checks them (so all ranks agree on a skip).
        if not self._sync_params or not (dist.is_available() and dist.is_initialized()):
            return
        should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
        if callable(should_accumulate) and should_accumulate():
            return
        grads = [p.grad for p in self._sync_params if p.grad is not None]
        if len(grads) != len(self._sync_params):
            raise RuntimeError(
                "FreezeEmbeddings: some unfrozen embeddings got no gradient on this rank; all ranks must use them."
            )
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen, "source_group": dict(self._source_group)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = bool(state_dict.get("unfrozen", False))
        self._source_group = {int(k): int(v) for k, v in state_dict.get("source_group", {}).items()}

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
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_txopt.utils.blocks import find_block_lists, model_configs
from lightning_txopt.utils.checks import check_positive_int
from lightning_txopt.utils.sharding import (
    clean_name,
    gradient_free_in_units,
    local_numel,
    sharding_kind,
    strategy_description,
)

__all__ = [
    "FreezeEmbeddings",
    "FrozenEmbeddings",
    "FrozenMemory",
    "find_input_embeddings",
    "freeze_embeddings",
    "frozen_memory",
    "unfreeze_embeddings",
]

_HOOKS_ATTR = "_txopt_frozen_embedding_hooks"


def _embedding_getter(module: nn.Module, name: str) -> nn.Module | None:
    """``module.get_input_embeddings()`` / ``get_output_embeddings()`` if it exists and returns a module."""
    getter = getattr(module, name, None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def _find_hf_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model that has ``get_input_embeddings()``, as ``(qualified name, module)``.

    ``model`` itself, or the one Hugging Face model inside it (a LightningModule wrapping a ``PreTrainedModel``);
    ``None`` if there is none.

    Raises:
        ValueError: If ``model`` holds several separate models with input embeddings (a teacher and a student).
    """
    if _embedding_getter(model, "get_input_embeddings") is not None:
        return "", model
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        outer = any(name.startswith(f"{prefix}.") for prefix, _ in found)
        if name and not outer and _embedding_getter(module, "get_input_embeddings") is not None:
            found.append((name, module))
    if len(found) > 1:
        raise ValueError(
            f"{type(model).__name__} holds several models with input embeddings ({', '.join(n for n, _ in found)}): "
            "which to freeze is ambiguous. Pass `names=[...]` with the qualified module names to freeze."
        )
    return found[0] if found else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def find_input_embeddings(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Find the modules that embed the input: token, position and token-type tables.

    Detection, in order: ``names`` when given (qualified module names); else the Hugging Face model's
    ``get_input_embeddings()`` (``model``'s own, or that of the one Hugging Face model inside ``model``, e.g. a
    LightningModule's ``self.model``) and the other ``nn.Embedding`` tables beside it (its parent's direct children,
    e.g. BERT's ``position_embeddings``/``token_type_embeddings`` or GPT-2's ``wpe``); else every ``nn.Embedding``
    outside the model's repeated block lists. Every other ``nn.Embedding`` that holds the same weight tensor as one
    of those is an input embedding too (T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are ``shared``);
    the model's output embeddings (a tied LM head) are not. Tables inside the blocks (T5's relative attention bias)
    are not input embeddings.

    Args:
        model: Any model.
        names: Qualified module names to use instead of detection.

    Returns:
        ``{qualified name: module}`` in model order.

    Raises:
        ValueError: If ``names`` is empty, names a module that does not exist or holds no parameters of its own,
            if ``model`` holds several Hugging Face models, or if nothing is found.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20))
        >>> list(find_input_embeddings(model))
        ['embeddings.word_embeddings', 'embeddings.position_embeddings', 'embeddings.token_type_embeddings']
    """
    modules = dict(model.named_modules())
    if names is not None:
        if not names:
            raise ValueError("`names` is empty: nothing would be frozen. Pass module names, or None for detection.")
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"No module named {missing[0]!r} in {type(model).__name__}; pass qualified module names.")
        empty = [n for n in names if not any(True for _ in modules[n].parameters(recurse=False))]
        if empty:
            raise ValueError(
                f"Module {empty[0]!r} of {type(model).__name__} holds no parameters of its own: nothing would be "
                "frozen. Name the embedding tables themselves (e.g. 'bert.embeddings.word_embeddings')."
            )
        return {n: modules[n] for n in names}
    found: dict[str, nn.Module] = {}
    hf = _find_hf_model(model)
    output: nn.Module | None = None
    if hf is not None:
        prefix, hf_model = hf
        token = _embedding_getter(hf_model, "get_input_embeddings")
        output = _embedding_getter(hf_model, "get_output_embeddings")
        assert token is not None
        token_name = next(_join(prefix, n) for n, m in hf_model.named_modules(remove_duplicate=False) if m is token)
        parent_name = token_name.rpartition(".")[0]
        parent = modules[parent_name] if parent_name else model
        found[token_name] = token
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Embedding) and child is not token:
                found[_join(parent_name, child_name)] = child
    else:
        try:
            blocks = [b.name for b in find_block_lists(model)]
        except ValueError:
            blocks = []
        for name, module in model.named_modules():
            inside = any(name == b or name.startswith(f"{b}.") for b in blocks)
            if isinstance(module, nn.Embedding) and not inside:
                found[name] = module
    if not found:
        raise ValueError(
            f"No input embeddings found in {type(model).__name__}: no get_input_embeddings() and no nn.Embedding "
            "outside the block list. Pass `names=[...]` with the qualified module names to freeze."
        )
    weights = {id(p) for m in found.values() for p in m.parameters(recurse=False)}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in found or module is output or not isinstance(module, nn.Embedding):
            continue
        if any(id(p) in weights for p in module.parameters(recurse=False)):
            found[name] = module  # an alias of an input table (T5's embed_tokens): an input embedding itself
    order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], 0)))


@dataclasses.dataclass
class FrozenEmbeddings:
    """What :func:`freeze_embeddings` froze.

    Attributes:
        modules: Qualified names of the frozen modules.
        parameters: Qualified names of the frozen parameters.
        num_parameters: Number of frozen scalars.
        tied: ``{frozen parameter: other names of the same tensor}`` for weights shared with modules that are not
            input embeddings (an LM head tied to the token embedding); empty after ``untie=True``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20, max_position_embeddings=16))
        >>> result = freeze_embeddings(model)
        >>> result.modules
        ['embeddings.word_embeddings', 'embeddings.position_embeddings', 'embeddings.token_type_embeddings']
        >>> result.num_parameters, result.optimizer_bytes_saved(), result.tied  # 20*8 + 16*8 + 2*8 scalars
        (304, 2432, {})
    """

    modules: list[str]
    parameters: list[str]
    num_parameters: int
    tied: dict[str, list[str]]

    def optimizer_bytes_saved(self, bytes_per_param: int = 8) -> int:
        """Optimizer state not allocated (AdamW: two fp32 moments = 8 bytes per parameter)."""
        return self.num_parameters * bytes_per_param


@dataclasses.dataclass(frozen=True)
class FrozenMemory:
    """Memory that freezing saves on this rank, from the model as the strategy wrapped (and sharded) it.

    Attributes:
        strategy: The strategy's class name.
        local_parameters: Frozen elements this rank holds (its shards under FSDP; each shared tensor once).
        gradient_bytes: Gradient memory not allocated: the frozen elements' size in their dtype, except under
            FSDP1 (``FSDPStrategy``) for frozen parameters of a unit that also holds trainable ones: FSDP1 keeps one
            flat gradient per such unit, frozen elements included (PyTorch #104967), so those save nothing.
        optimizer_bytes: AdamW state not allocated: two moments per frozen element, in its dtype.

    Example:
        >>> table = nn.Embedding(10, 4)  # 40 fp32 elements
        >>> _ = table.weight.requires_grad_(False)
        >>> saved = frozen_memory(nn.Sequential(table), [table.weight], strategy="SingleDeviceStrategy")
        >>> saved.local_parameters, saved.gradient_bytes, saved.optimizer_bytes, saved.total_bytes
        (40, 160, 320, 480)
    """

    strategy: str
    local_parameters: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        """Gradients and optimizer state together."""
        return self.gradient_bytes + self.optimizer_bytes


def frozen_memory(model: nn.Module, params: Sequence[nn.Parameter], strategy: str = "") -> FrozenMemory:
    """What freezing ``params`` saves on this rank, as :class:`FrozenMemory`.

    Args:
        model: The model as the strategy runs it (``trainer.strategy.model``: the FSDP1 root wrapper, the DDP wrapper
            or the LightningModule), so that FSDP1's units are seen.
        params: The frozen parameters, each once.
        strategy: A name for the report.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
        >>> model[0].weight.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing: ...
        >>> frozen_memory(model, [model[0].weight])
        FrozenMemory(strategy='', local_parameters=40, gradient_bytes=160, optimizer_bytes=320)
    """
    free = gradient_free_in_units(model)
    numel = sum(local_numel(p) for p in params)
    grads = sum(local_numel(p) * p.element_size() for p in params if id(p) in free)
    states = sum(2 * local_numel(p) * p.element_size() for p in params)
    return FrozenMemory(strategy, numel, grads, states)


def _tied_names(model: nn.Module, frozen: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Names under which the frozen tensors also appear outside the frozen modules."""
    prefixes = tuple(n + "." for n in frozen)
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    tied: dict[str, list[str]] = {}
    reported: set[int] = set()
    for mod_name, module in frozen.items():
        for pname, p in module.named_parameters(recurse=False):
            others = [n for n in by_tensor.get(id(p), []) if not n.startswith(prefixes)]
            if others and id(p) not in reported:  # once per tensor, under its first frozen name
                reported.add(id(p))
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
    for config in model_configs(model):  # so that a later tie_weights() does not tie them again
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False  # type: ignore[attr-defined]


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
        untie: Give the modules other than input embeddings that share a frozen tensor (GPT-2's and T5's LM head)
            their own trainable copy. Without it the shared tensor is frozen for them too, with a warning. Input
            embeddings that share the tensor (T5's ``encoder.embed_tokens``) are frozen with it either way. Nothing
            to untie is not an error: the head is trainable, as asked.

    Returns:
        A :class:`FrozenEmbeddings` summary.

    Raises:
        ValueError: As :func:`find_input_embeddings`, and with ``include_layernorm=True`` on a model that has no
            ``nn.LayerNorm`` beside its input embeddings (GPT-2, Llama, T5).

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
        norms: dict[str, nn.Module] = {}
        for name in list(targets):
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else model
            if any(isinstance(c, nn.ModuleList | nn.Sequential | nn.ModuleDict) for c in parent.children()):
                continue  # the parent holds the blocks too (GPT-2): its norms are not embedding norms
            for child_name, child in parent.named_children():
                if isinstance(child, nn.LayerNorm):
                    norms[_join(parent_name, child_name)] = child
        if not norms:
            raise ValueError(
                f"include_layernorm=True, but {type(model).__name__} has no nn.LayerNorm beside its input embeddings "
                f"({', '.join(targets)}): nothing more would be frozen. Drop include_layernorm, or name the norm "
                "with the embeddings in names=[...]."
            )
        targets.update(norms)
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
    for module in {id(m): m for m in targets.values()}.values():
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

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20, max_position_embeddings=16))
        >>> result = freeze_embeddings(model)
        >>> params = unfreeze_embeddings(model, result)
        >>> len(params), model.embeddings.word_embeddings.weight.requires_grad
        (3, True)
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


def _extend_scheduler(scheduler: Any, group: dict[str, Any], *, like: int) -> None:
    """Make ``scheduler`` schedule a param group just added to its optimizer, as it schedules group ``like``.

    torch has no public way to add a group to a running scheduler: this is the one place that extends its state
    (``base_lrs``; ``lr_lambdas`` of ``LambdaLR``/``MultiplicativeLR``; the private ``_last_lr`` behind the public
    ``get_last_lr()``). ``tests/callbacks/test_freeze_embeddings.py`` checks those attributes exist on torch's
    schedulers and that ``get_last_lr()`` then has one entry per group, so a change in torch fails there.
    Schedulers without ``base_lrs`` are left alone.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
        >>> opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1, "initial_lr": 0.2})
        >>> _extend_scheduler(sched, opt.param_groups[1], like=0)
        >>> sched.step(); [round(lr, 3) for lr in sched.get_last_lr()]
        [0.5, 0.1]
    """
    if not hasattr(scheduler, "base_lrs"):
        return
    scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list) and lambdas:
        lambdas.append(lambdas[like])
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, list):
        last.append(group["lr"])


class FreezeEmbeddings(Callback):
    """Freeze the input embeddings before the optimizer is built; optionally unfreeze them at an epoch.

    Applied in ``setup`` (before ``configure_optimizers`` and before DDP wraps the model) to the LightningModule, in
    which :func:`find_input_embeddings` finds the Hugging Face model. At ``on_fit_start`` the frozen parameters are
    taken out of every optimizer's parameter groups, so they hold no optimizer state and no weight decay touches them.
    With ``unfreeze_at_epoch=N`` they become trainable at the start of epoch ``N`` and join each optimizer they came
    from as a new parameter group whose learning rate is ``lr_factor`` times that of the group they came from (other
    hyper-parameters copied from it); LR schedulers that keep per-group ``base_lrs`` (``LambdaLR``, ``StepLR``,
    ``CosineAnnealingLR``, ...) are extended so the new group follows the same schedule. A resume from any checkpoint,
    before or after ``N``, mid-epoch included, restores the frozen/unfrozen state and the groups.

    Under DDP, parameters that were frozen when DDP wrapped the model are unknown to its reducer; after unfreezing,
    this callback averages their gradients over the ranks itself in ``on_before_optimizer_step`` (after the last
    backward of each step, through ``trainer.strategy.reduce``), as DDP averages the others. With fp16 AMP that hook
    runs after the GradScaler has checked the gradients, so ranks could disagree on skipping a step:
    ``unfreeze_at_epoch`` with ``precision="16-mixed"`` on several processes is refused (bf16 has no scaler).

    Sharded training (``docs/fsdp.md``): under ``FSDPStrategy`` (FSDP1) and ``ModelParallelStrategy`` (FSDP2,
    ``fully_shard`` in ``configure_model``) the embeddings are frozen before the model is sharded, get no gradient
    and no optimizer state and do not change. At ``on_fit_start``, once the strategy has wrapped the model,
    :attr:`memory` holds what this rank saves (:class:`FrozenMemory`) and is logged: FSDP1 keeps a flat gradient for
    every unit holding a trainable parameter, frozen elements included, so there only the optimizer state is saved
    unless the embeddings form units of their own (``auto_wrap_policy`` with ``nn.Embedding``). FSDP1 needs
    ``use_orig_params=True`` (Lightning's default) to mix frozen and trainable parameters in a unit.
    ``unfreeze_at_epoch`` is refused under both (parameters made trainable after sharding are not handled exactly).

    Args:
        unfreeze_at_epoch: Epoch (>= 1) at whose start the embeddings become trainable; ``None`` keeps them frozen.
        lr_factor: Learning-rate factor of the unfrozen group relative to the group the parameters came from; only
            with ``unfreeze_at_epoch``.
        names: Qualified module names to freeze instead of detection.
        include_layernorm: Also freeze the embeddings' LayerNorm.
        untie: Untie weights shared with the embeddings (GPT-2's LM head) instead of freezing them there too.

    Raises:
        ValueError: If ``unfreeze_at_epoch < 1``, ``lr_factor <= 0``, or ``lr_factor`` is set without
            ``unfreeze_at_epoch`` (it would do nothing). In ``setup``, with ``unfreeze_at_epoch`` on several
            processes: a strategy other than DDP, or a GradScaler (fp16 AMP); with ``unfreeze_at_epoch`` under
            ``FSDPStrategy`` or ``ModelParallelStrategy`` (any number of processes); under
            ``FSDPStrategy(use_orig_params=False)``. (``unfreeze_at_epoch >= max_epochs``
            warns: only a resumed run with more epochs would unfreeze.) At the unfreeze epoch: if the frozen
            parameters were in no optimizer and there are several (which one should train them is ambiguous).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_txopt import BucketDataModule, TransformerModule
        >>> module = TransformerModule(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
        ...     "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}, num_labels=2)
        >>> samples = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in (2, 3, 4, 5) * 2]
        >>> data = BucketDataModule(samples, pad_token_id=0, batch_size=4)
        >>> freeze = FreezeEmbeddings()  # or FreezeEmbeddings(unfreeze_at_epoch=2, lr_factor=0.1)
        >>> trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[freeze], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> table = module.model.bert.embeddings.word_embeddings.weight
        >>> table.requires_grad, any(p is table for g in trainer.optimizers[0].param_groups for p in g["params"])
        (False, False)
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
        if unfreeze_at_epoch is not None and not isinstance(unfreeze_at_epoch, bool) and unfreeze_at_epoch == 0:
            raise ValueError(
                "unfreeze_at_epoch=0 unfreezes before the first step: the embeddings would never be frozen. Use "
                "unfreeze_at_epoch >= 1, or drop FreezeEmbeddings (for a smaller embedding learning rate from the "
                "start, give the embeddings their own parameter group in configure_optimizers)."
            )
        check_positive_int("unfreeze_at_epoch", unfreeze_at_epoch, optional=True)
        if not lr_factor > 0:
            raise ValueError(f"`lr_factor` must be > 0, got {lr_factor!r}.")
        if lr_factor != 1.0 and unfreeze_at_epoch is None:
            raise ValueError(
                f"lr_factor={lr_factor!r} applies to the embeddings once they are unfrozen, and without "
                "unfreeze_at_epoch they never are: it would do nothing. Set unfreeze_at_epoch, or drop lr_factor."
            )
        self.unfreeze_at_epoch = None if unfreeze_at_epoch is None else int(unfreeze_at_epoch)
        self.lr_factor = float(lr_factor)
        self.names = names
        self.include_layernorm = include_layernorm
        self.untie = untie
        self.frozen: FrozenEmbeddings | None = None
        self.unfrozen = False
        self._source_group: dict[int, int] = {}  # optimizer index -> group the embeddings were taken from
        self._sync_params: list[nn.Parameter] = []
        self.memory: FrozenMemory | None = None  # set at on_fit_start, from the model as the strategy wrapped it

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.frozen is not None:
            return
        _check_sharded_strategy(trainer, self.unfreeze_at_epoch)
        if self.unfreeze_at_epoch is not None:
            _check_unfreeze_supported(trainer, self.unfreeze_at_epoch)
        self.frozen = freeze_embeddings(
            pl_module, names=self.names, include_layernorm=self.include_layernorm, untie=self.untie
        )
        if self.unfrozen:  # restored from a checkpoint taken after unfreezing
            unfreeze_embeddings(pl_module, self.frozen)
        sharded = sharding_kind(trainer.strategy) is not None
        saved = (
            "; the memory this saves per rank is reported once the strategy has sharded the model"
            if sharded
            else f": {self.frozen.num_parameters * 4 / 2**20:,.1f} MiB of fp32 gradients and "
            f"{self.frozen.optimizer_bytes_saved() / 2**20:,.1f} MiB of AdamW state not allocated"
        )
        rank_zero_info(
            f"FreezeEmbeddings: froze {len(self.frozen.modules)} module(s) ({', '.join(self.frozen.modules)}), "
            f"{self.frozen.num_parameters:,} parameters"
            + saved
            + (f"; trainable again from epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch is not None else "")
            + ("; restored as unfrozen" if self.unfrozen else "")
            + "."
        )

    def _frozen_params(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        assert self.frozen is not None
        # by name: FSDP2 replaces the parameters by DTensor ones; FSDP1 inserts its wrapper into the names
        params = {clean_name(n): p for n, p in pl_module.named_parameters(remove_duplicate=False)}
        out: dict[int, nn.Parameter] = {}
        for name in self.frozen.parameters:
            out.setdefault(id(params[name]), params[name])
        return list(out.values())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.frozen is None:
            return
        frozen = self._frozen_params(pl_module)
        if not self.unfrozen:
            self._report_memory(trainer, pl_module, frozen)
        targets = {id(p) for p in frozen}
        for opt_idx, optimizer in enumerate(trainer.optimizers):
            for group_idx, group in enumerate(optimizer.param_groups):
                kept = [p for p in group["params"] if id(p) not in targets]
                if len(kept) != len(group["params"]):
                    self._source_group.setdefault(opt_idx, group_idx)
                    group["params"] = kept
        if self.unfrozen:  # resumed after the unfreeze epoch: rebuild the group before optimizer states load
            self._add_groups(trainer, pl_module)

    def _report_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule, frozen: list[nn.Parameter]) -> None:
        strategy = trainer.strategy
        model = getattr(strategy, "model", None)  # the FSDP1 root wrapper holds the units
        if not isinstance(model, nn.Module):
            model = pl_module
        self.memory = frozen_memory(model, frozen, type(strategy).__name__)
        if sharding_kind(strategy) is None:
            return  # setup's message was exact already
        m = self.memory
        flat = m.gradient_bytes < sum(local_numel(p) * p.element_size() for p in frozen)
        rank_zero_info(
            f"FreezeEmbeddings under {m.strategy} ({trainer.world_size} process(es)): rank 0 holds "
            f"{m.local_parameters:,} frozen elements: {m.optimizer_bytes / 2**20:,.2f} MiB of AdamW state and "
            f"{m.gradient_bytes / 2**20:,.2f} MiB of gradients not allocated"
            + (
                " (FSDP1 keeps a flat gradient for each unit holding a trainable parameter, frozen elements included, "
                "PyTorch #104967: put the embeddings in FSDP units of their own, e.g. nn.Embedding in the "
                "auto_wrap_policy, to save their gradients too)"
                if flat
                else ""
            )
            + "."
        )

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
        sources = dict(self._source_group)
        if not sources and trainer.optimizers:  # the optimizer was built from the trainable parameters only
            if len(trainer.optimizers) > 1:
                raise ValueError(
                    f"FreezeEmbeddings: the frozen embeddings were in none of the {len(trainer.optimizers)} "
                    "optimizers, so which one should train them after unfreeze_at_epoch is ambiguous. Put them in "
                    "one optimizer's parameters (they are taken out while frozen), or drop unfreeze_at_epoch."
                )
            sources = {0: 0}
        for opt_idx, group_idx in sources.items():
            optimizer = trainer.optimizers[opt_idx]
            source = optimizer.param_groups[group_idx]
            group = {k: v for k, v in source.items() if k != "params"}
            group["lr"] = source["lr"] * self.lr_factor
            if "initial_lr" in source:
                group["initial_lr"] = source["initial_lr"] * self.lr_factor
            group["params"] = params
            optimizer.add_param_group(group)
            for config in trainer.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is optimizer:
                    _extend_scheduler(config.scheduler, group, like=group_idx)
        self._sync_params = params if trainer.world_size > 1 else []

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # DDP's reducer does not know the parameters that were frozen when it wrapped the model: average their
        # gradients here, after the last backward before this step (every rank calls this hook at the same step).
        if not self._sync_params:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self._sync_params if id(p) in in_optimizer]
        if params:
            _average_gradients(params, trainer.strategy)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen, "source_group": dict(self._source_group)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = bool(state_dict.get("unfrozen", False))
        self._source_group = {int(k): int(v) for k, v in state_dict.get("source_group", {}).items()}


def _check_sharded_strategy(trainer: pl.Trainer, unfreeze_at_epoch: int | None) -> None:
    """Refuse, at setup, what freezing cannot do exactly under FSDP1 or FSDP2 (see ``docs/fsdp.md``)."""
    strategy = trainer.strategy
    kind = sharding_kind(strategy)
    if kind is None:
        return
    name = strategy_description(strategy)
    if unfreeze_at_epoch is not None:
        built = "FSDP1 has built its flat parameters" if kind == "fsdp" else "FSDP2 has made its unsharded parameters"
        raise ValueError(
            f"FreezeEmbeddings(unfreeze_at_epoch={unfreeze_at_epoch}) supports DDP strategies only, got {name}: the "
            "embeddings are frozen before the strategy shards the model, and parameters made trainable after "
            f"sharding are not handled exactly ({built} with requires_grad=False). Keep the embeddings frozen "
            "(unfreeze_at_epoch=None), or train in two runs: "
            "a first fit with FreezeEmbeddings(), then a new fit without it that starts from the first run's "
            "weights (a new optimizer)."
        )
    if kind == "fsdp" and (getattr(strategy, "kwargs", None) or {}).get("use_orig_params") is False:
        raise ValueError(
            f"FreezeEmbeddings under {name}: with use_orig_params=False FSDP flattens each unit's parameters into "
            "one tensor that is either trainable or frozen, and refuses a unit that mixes frozen embeddings with "
            "trainable parameters (the embeddings' LayerNorm, the head). Use FSDPStrategy(use_orig_params=True) "
            "(Lightning's default)."
        )


def _check_unfreeze_supported(trainer: pl.Trainer, epoch: int) -> None:
    """Refuse, at setup, an ``unfreeze_at_epoch`` that could not be exact; warn if it cannot happen in this run."""
    max_epochs = trainer.max_epochs
    if isinstance(max_epochs, int) and 0 <= max_epochs <= epoch:
        # a warning, not an error: a later fit resumed from this run's checkpoint with more epochs does unfreeze
        rank_zero_warn(
            f"FreezeEmbeddings(unfreeze_at_epoch={epoch}) with Trainer(max_epochs={max_epochs}): training ends "
            f"before epoch {epoch}, so the embeddings stay frozen in this run (a run resumed from its checkpoint "
            "with more epochs unfreezes them). Lower unfreeze_at_epoch below max_epochs if you meant this run."
        )
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or strategy.handles_gradient_accumulation:
        raise ValueError(
            f"FreezeEmbeddings(unfreeze_at_epoch={epoch}) on {trainer.world_size} processes supports DDP strategies "
            f"only, got {type(strategy).__name__}: parameters unfrozen after the model was wrapped are averaged by "
            "this callback, which only knows DDP. Use strategy='ddp', or keep the embeddings frozen "
            "(unfreeze_at_epoch=None)."
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"FreezeEmbeddings(unfreeze_at_epoch={epoch}) with fp16 AMP (precision={trainer.precision!r}) on "
            f"{trainer.world_size} processes: the unfrozen embeddings' gradients are averaged after the GradScaler "
            "has checked each rank's own gradients for inf/NaN, so ranks could disagree on skipping a step. Use "
            "precision='bf16-mixed' or '32-true', or keep the embeddings frozen (unfreeze_at_epoch=None)."
        )


def _average_gradients(params: Sequence[nn.Parameter], strategy: Strategy) -> None:
    """Average the gradients of ``params`` over the processes of ``strategy``, as DDP does for its parameters.

    Every process must call it at the same point. A parameter whose gradient is ``None`` on a process counts as a
    zero gradient there; one whose gradient is ``None`` on every process keeps ``None`` (the optimizer skips it).

    Args:
        params: Parameters that DDP does not reduce.
        strategy: The Trainer's strategy (``trainer.strategy``); its public ``reduce`` does the all-reduce.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> p = nn.Parameter(torch.ones(2))
        >>> p.grad = torch.full((2,), 3.0)
        >>> _average_gradients([p], SingleDeviceStrategy(device=torch.device("cpu")))  # one process: unchanged
        >>> p.grad
        tensor([3., 3.])
    """
    world = strategy.world_size if isinstance(strategy, ParallelStrategy) else 1
    if world <= 1:
        return
    device = params[0].device
    dtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p, dtype=dtype)).reshape(-1).to(dtype) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = strategy.reduce(torch.cat([*parts, present]), reduce_op="sum")
    # Whether a gradient exists anywhere is only read (a host-device sync) on a process that lacks one: on the
    # others every count is >= 1 already.
    local_all = all(p.grad is not None for p in params)
    has_grad = [True] * len(params) if local_all else [c > 0 for c in flat[-len(params) :].tolist()]
    offset = 0
    for p, keep in zip(params, has_grad, strict=True):
        n = p.numel()
        if keep:
            grad = flat[offset : offset + n].view_as(p).div_(world).to(p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
        offset += n

"""Gradient (activation) checkpointing for any transformer: ``enable_gradient_checkpointing`` and its callback.

Checkpointed blocks keep only their inputs during the forward pass and recompute their activations during the backward
pass: activation memory drops by roughly the depth of the network, at the cost of a second forward of each block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lightning_txopt.memory import CheckpointingChoice, CudaMemory, DeviceMemory
from lightning_txopt.utils.blocks import BlockList, disable_kv_cache, find_block_lists
from lightning_txopt.utils.checks import check_positive_int
from lightning_txopt.utils.sharding import checkpoint_wrapper_type, clean_name

__all__ = [
    "CheckpointingPlan",
    "GradientCheckpointing",
    "check_not_checkpointed_twice",
    "disable_gradient_checkpointing",
    "enable_gradient_checkpointing",
    "hf_checkpointing_enable",
    "selective_checkpointing_available",
]

Mode = Literal["full", "selective"]
_MODES = ("full", "selective")


def selective_checkpointing_available() -> bool:
    """Whether the installed torch has selective activation checkpointing (``create_selective_checkpoint_contexts``).

    Example:
        >>> mode = "selective" if selective_checkpointing_available() else "full"  # selective needs torch >= 2.5
        >>> GradientCheckpointing(every_n_layers=2, mode=mode).mode in ("selective", "full")
        True
    """
    import torch.utils.checkpoint as tc

    return hasattr(tc, "create_selective_checkpoint_contexts") and hasattr(tc, "CheckpointPolicy")


def _save_matmuls_policy() -> Callable[..., Any]:
    import torch.utils.checkpoint as tc

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ):
        op = getattr(aten, name, None)
        if op is not None:
            keep.add(op.default)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return tc.CheckpointPolicy.MUST_SAVE if op in keep else tc.CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_context_fn() -> Callable[[], Any]:
    import torch.utils.checkpoint as tc

    return functools.partial(tc.create_selective_checkpoint_contexts, _save_matmuls_policy())


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache", "cache_params")


class _CheckpointedForward:
    """Replaces a block's ``forward``: runs the class's forward under non-reentrant ``torch.utils.checkpoint``.

    An instance attribute rather than a wrapper module, so parameter and state-dict names do not change; a plain
    picklable object (not a closure), so models still pickle for ``ddp_spawn`` and deep-copy.
    """

    def __init__(self, module: nn.Module, mode: Mode) -> None:
        self.module = module
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward
        if not (self.module.training and torch.is_grad_enabled()):
            return forward(self.module, *args, **kwargs)
        cache = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None]
        if kwargs.get("use_cache") or cache:
            raise RuntimeError(
                f"A checkpointed {type(self.module).__name__} was called with a KV cache "
                f"({', '.join(cache) or 'use_cache=True'}): its recomputation in the backward pass would write the "
                "cache a second time. Call the model with use_cache=False in training (enable_gradient_checkpointing "
                "already sets config.use_cache=False on every config of the model)."
            )
        extra: dict[str, Any] = {"use_reentrant": False}
        if self.mode == "selective":
            extra["context_fn"] = _selective_context_fn()
        return checkpoint(forward, self.module, *args, **extra, **kwargs)


@dataclasses.dataclass(frozen=True)
class CheckpointingPlan:
    """What :func:`enable_gradient_checkpointing` did.

    Blocks are counted over all block lists of the model in model order: for T5 (2 encoder and 2 decoder blocks),
    indices 0-1 are the encoder's blocks and 2-3 the decoder's.

    Attributes:
        mechanism: ``"huggingface"`` (the model's own ``gradient_checkpointing_enable``) or ``"wrap"`` (our wrapper).
        block_list: Qualified name of the (first) block list (``None`` with the Hugging Face mechanism).
        checkpointed: Indices of the checkpointed blocks, counted over all block lists.
        num_blocks: Number of blocks in all block lists.
        mode: ``"full"`` or ``"selective"``.
        block_lists: Qualified names of every block list, in model order (each stack of an encoder-decoder; empty
            when the Hugging Face mechanism is used on a model whose blocks are not detectable).
        blocks_per_list: Number of blocks of each of ``block_lists``.

    Example:
        >>> model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=3, num_decoder_layers=2,
        ...                        dim_feedforward=16, batch_first=True)
        >>> plan = enable_gradient_checkpointing(model, every_n_layers=2)
        >>> plan.mechanism, plan.block_lists, plan.blocks_per_list, plan.num_blocks
        ('wrap', ('encoder.layers', 'decoder.layers'), (3, 2), 5)
        >>> plan.checkpointed, plan.checkpointed_in("encoder.layers"), plan.checkpointed_in("decoder.layers")
        ((0, 2, 3), (0, 2), (0,))
    """

    mechanism: str
    block_list: str | None
    checkpointed: tuple[int, ...]
    num_blocks: int
    mode: str
    block_lists: tuple[str, ...] = ()
    blocks_per_list: tuple[int, ...] = ()

    def checkpointed_in(self, block_list: str) -> tuple[int, ...]:
        """Indices, inside ``block_list``, of its checkpointed blocks.

        Raises:
            ValueError: If ``block_list`` is not one of :attr:`block_lists`.
        """
        if block_list not in self.block_lists:
            raise ValueError(f"{block_list!r} is not a checkpointed block list; they are {list(self.block_lists)}.")
        start = sum(self.blocks_per_list[: self.block_lists.index(block_list)])
        size = self.blocks_per_list[self.block_lists.index(block_list)]
        return tuple(i - start for i in self.checkpointed if start <= i < start + size)


def hf_checkpointing_enable(model: nn.Module, use_reentrant: bool = False) -> None:
    """Call a Hugging Face model's own checkpointing switch, under its current name.

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns); earlier releases only have the old one.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        ...                              intermediate_size=8, vocab_size=20))
        >>> hf_checkpointing_enable(model)
        >>> any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # the model's own flag
        True
    """
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def _hf_checkpointing_disable(model: nn.Module) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        disable = getattr(model, name, None)
        if callable(disable):
            disable()
            return


def enable_gradient_checkpointing(
    model: nn.Module,
    *,
    every_n_layers: int = 1,
    mode: Mode = "full",
    block_classes: Sequence[str] | None = None,
    prefer_native: bool = True,
) -> CheckpointingPlan:
    """Checkpoint the activations of ``model``'s transformer blocks.

    Hugging Face models that support it, with ``every_n_layers=1``, ``mode="full"`` and no ``block_classes``, use
    their own mechanism with non-reentrant checkpointing. Any other model, or any other setting: every repeated block
    list is found (see :func:`~lightning_txopt.utils.blocks.find_block_lists`: both stacks of an encoder-decoder) and
    every ``every_n_layers``-th block of each (0, n, 2n, ...) runs under non-reentrant ``torch.utils.checkpoint``;
    parameter names do not change. Either way ``use_cache`` is turned off on every configuration of the model (T5's
    stacks have their own copies): a KV cache is useless in training and a recomputed block would write it twice.

    Args:
        model: The model.
        every_n_layers: Checkpoint one block in ``n`` of each block list (trade memory for speed).
        mode: ``"full"`` recomputes everything in a block; ``"selective"`` keeps matmul and attention outputs and
            recomputes the cheap pointwise ops (PyTorch's selective activation checkpointing).
        block_classes: Class names of the blocks, overriding detection.
        prefer_native: Use a Hugging Face model's own mechanism where possible.

    Returns:
        A :class:`CheckpointingPlan`.

    Raises:
        ValueError: On invalid arguments or a model without a detectable block list.
        RuntimeError: With ``mode="selective"`` on a torch without selective checkpointing.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        >>> enable_gradient_checkpointing(model, every_n_layers=2).checkpointed
        (0, 2)
        >>> model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
        ...                        dim_feedforward=16, batch_first=True)
        >>> plan = enable_gradient_checkpointing(model, every_n_layers=2)
        >>> plan.block_lists, plan.checkpointed, plan.checkpointed_in("decoder.layers")
        (('encoder.layers', 'decoder.layers'), (0, 2), (0,))
    """
    check_positive_int("every_n_layers", every_n_layers)
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    if mode == "selective" and not selective_checkpointing_available():
        raise RuntimeError(
            f"mode='selective' needs torch.utils.checkpoint.create_selective_checkpoint_contexts, which torch "
            f"{torch.__version__} lacks. Upgrade torch (>= 2.5) or use mode='full'."
        )
    native = (
        prefer_native
        and every_n_layers == 1
        and mode == "full"
        and block_classes is None
        and getattr(model, "supports_gradient_checkpointing", False)
        and (
            callable(getattr(model, "activation_checkpointing_enable", None))
            or callable(getattr(model, "gradient_checkpointing_enable", None))
        )
    )
    if native:
        hf_checkpointing_enable(model)
        disable_kv_cache(model)
        return _native_plan(model, mode)
    lists = find_block_lists(model, block_classes)
    checkpointed: list[int] = []
    done: set[int] = set()
    start = 0
    for found in lists:
        for i in range(0, len(found), every_n_layers):
            checkpointed.append(start + i)
            block = found[i]
            if id(block) in done:
                continue  # a block shared by several positions is wrapped once
            done.add(id(block))
            block.forward = _CheckpointedForward(block, mode)
        start += len(found)
    disable_kv_cache(model)
    return CheckpointingPlan("wrap", lists[0].name, tuple(checkpointed), start, mode, *_names_and_sizes(lists))


def _names_and_sizes(lists: list[BlockList]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return tuple(b.name for b in lists), tuple(len(b) for b in lists)


def _native_plan(model: nn.Module, mode: Mode) -> CheckpointingPlan:
    """Report what the Hugging Face mechanism checkpoints: the blocks whose ``gradient_checkpointing`` flag is set."""
    try:
        lists = find_block_lists(model)
    except ValueError:
        num = getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0
        return CheckpointingPlan("huggingface", None, tuple(range(num)), num, mode)
    blocks = [block for found in lists for block in found.blocks]
    if any(hasattr(block, "gradient_checkpointing") for block in blocks):
        chosen = tuple(i for i, block in enumerate(blocks) if getattr(block, "gradient_checkpointing", False))
    else:  # older transformers keep the flag on the stack, which then checkpoints each of its blocks
        chosen = tuple(range(len(blocks)))
    return CheckpointingPlan("huggingface", None, chosen, len(blocks), mode, *_names_and_sizes(lists))


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing` (both mechanisms).

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> _ = enable_gradient_checkpointing(model)
        >>> "forward" in vars(model.layers[0])  # the block's forward runs under torch.utils.checkpoint
        True
        >>> disable_gradient_checkpointing(model)
        >>> "forward" in vars(model.layers[0])
        False
    """
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            del module.forward
    if getattr(model, "supports_gradient_checkpointing", False):
        _hf_checkpointing_disable(model)


def check_not_checkpointed_twice(model: nn.Module, plan: CheckpointingPlan, strategy: str = "the strategy") -> None:
    """Refuse a model in which torch's ``checkpoint_wrapper`` checkpoints modules too, besides ``plan``.

    ``FSDPStrategy(activation_checkpointing_policy=...)`` wraps blocks in ``checkpoint_wrapper`` after it has wrapped
    the model (as may a ``configure_model`` under ``ModelParallelStrategy``): blocks already checkpointed by
    :func:`enable_gradient_checkpointing` would then be recomputed twice in every backward pass.

    Args:
        model: The model as the strategy runs it.
        plan: What :func:`enable_gradient_checkpointing` did.
        strategy: The strategy's name, for the message.

    Raises:
        ValueError: If ``plan`` checkpoints blocks and ``model`` holds a ``checkpoint_wrapper`` module; the message
            names it and says to use one of the two mechanisms.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> check_not_checkpointed_twice(model, enable_gradient_checkpointing(model))  # our wrapper only: fine
    """
    wrapper = checkpoint_wrapper_type()
    if wrapper is None or not plan.checkpointed:
        return
    found = [clean_name(name) or type(m).__name__ for name, m in model.named_modules() if isinstance(m, wrapper)]
    if found:
        where = ", ".join(plan.block_lists) or "the model's blocks"
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise ValueError(
            f"GradientCheckpointing checkpoints {len(plan.checkpointed)} blocks of {where} ({plan.mechanism} "
            f"mechanism), and {strategy} wrapped {found[0]}{more} in torch's checkpoint_wrapper as well "
            "(FSDPStrategy(activation_checkpointing_policy=...), or checkpoint_wrapper in configure_model): those "
            "blocks would be recomputed twice in every backward pass. Use one mechanism: drop "
            "activation_checkpointing_policy (GradientCheckpointing composes with FSDP's auto_wrap_policy, see "
            "docs/fsdp.md), or drop the GradientCheckpointing callback."
        )


class GradientCheckpointing(Callback):
    """Apply :func:`enable_gradient_checkpointing` to the LightningModule in ``setup``, before DDP wraps it.

    The callback looks for the transformer inside the LightningModule: with ``attribute`` it uses
    ``pl_module.<attribute>``; otherwise the first child that is a Hugging Face ``PreTrainedModel`` with native
    support, else the LightningModule itself (whose block list is then detected).

    Sharded training (``docs/fsdp.md``): the blocks are checkpointed in ``setup``, before ``FSDPStrategy`` wraps
    them in FSDP units (``auto_wrap_policy={BlockClass}``) or ``configure_model`` applies ``fully_shard``; each unit
    then holds a checkpointed block, and the recomputation runs while FSDP has the block's parameters unsharded.
    This is the one supported way: with ``FSDPStrategy(activation_checkpointing_policy=...)`` (or a
    ``checkpoint_wrapper`` of your own) as well, ``on_fit_start`` raises, since blocks would be checkpointed twice.

    Checkpointing to a memory budget: with ``every_n_layers="auto"`` nothing is checkpointed in ``setup``; at
    ``on_fit_start`` the fewest blocks are checkpointed for the planned batches at the DataModule's (fixed) token
    budget to fit ``max_memory_fraction`` of the GPU, measured by probing real training steps
    (:func:`~lightning_txopt.callbacks.token_budget.fit_checkpointing`; needs CUDA and a ``BucketDataModule``). The
    choice is saved in checkpoints and reused on resume. Use it with a fixed ``max_tokens``; to trade the other way,
    keep checkpointing fixed and let :class:`~lightning_txopt.callbacks.TokenBudgetFinder` find a larger budget.

    Args:
        every_n_layers: Checkpoint one block in ``n``, or ``"auto"`` (see above).
        mode: ``"full"`` or ``"selective"``.
        block_classes: Class names of the blocks, overriding detection.
        prefer_native: Use a Hugging Face model's own mechanism where possible.
        attribute: Name of the LightningModule attribute holding the model.
        max_memory_fraction: ``"auto"``: the share of the GPU's memory the peak may take.
        memory: ``"auto"``: how device memory is read (default CUDA's allocator;
            :class:`~lightning_txopt.memory.SavedTensorsMemory` estimates it on a CPU, for tests and demos).

    Raises:
        ValueError: On invalid arguments (checked here, not at fit time); at ``on_fit_start``, as
            :func:`check_not_checkpointed_twice`, or with ``"auto"`` and no fixed token budget.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_txopt import BucketDataModule, TransformerModule
        >>> module = TransformerModule(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 4,
        ...     "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}, num_labels=2)
        >>> samples = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in (2, 3, 4, 5) * 2]
        >>> data = BucketDataModule(samples, pad_token_id=0, batch_size=4, shuffle=False)
        >>> checkpointing = GradientCheckpointing(every_n_layers=2)  # blocks 0 and 2 of 4
        >>> trainer = pl.Trainer(accelerator="cpu", max_steps=2, callbacks=[checkpointing], logger=False,
        ...     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=data)
        >>> checkpointing.plan.mechanism, checkpointing.plan.block_lists, checkpointing.plan.checkpointed
        ('wrap', ('bert.encoder.layer',), (0, 2))
        >>> GradientCheckpointing(every_n_layers="auto").every_n_layers  # the fewest blocks that fit, at fit start
        'auto'
    """

    def __init__(
        self,
        *,
        every_n_layers: int | Literal["auto"] = 1,
        mode: Mode = "full",
        block_classes: list[str] | None = None,
        prefer_native: bool = True,
        attribute: str | None = None,
        max_memory_fraction: float = 0.9,
        memory: DeviceMemory | None = None,
    ) -> None:
        if every_n_layers != "auto" and (
            isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1
        ):
            raise ValueError(f"`every_n_layers` must be a positive integer or 'auto', got {every_n_layers!r}.")
        if not 0 < max_memory_fraction <= 1:
            raise ValueError(f"`max_memory_fraction` must be in (0, 1], got {max_memory_fraction!r}.")
        self.max_memory_fraction = float(max_memory_fraction)
        self.memory = memory
        self.chosen: int | None = None  # "auto": the interval chosen by probing (0: no checkpointing)
        self.choice: CheckpointingChoice | None = None
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
        self.every_n_layers: int | Literal["auto"] = every_n_layers
        self.mode: Mode = mode
        self.block_classes = block_classes
        self.prefer_native = prefer_native
        self.attribute = attribute
        self.plan: CheckpointingPlan | None = None

    def _enable(self, pl_module: pl.LightningModule, every_n_layers: int) -> None:
        target = _find_model(pl_module, self.attribute)
        self.plan = enable_gradient_checkpointing(
            target,
            every_n_layers=every_n_layers,
            mode=self.mode,
            block_classes=self.block_classes,
            prefer_native=self.prefer_native,
        )
        where = ", ".join(self.plan.block_lists) or type(target).__name__
        rank_zero_info(
            f"GradientCheckpointing: {len(self.plan.checkpointed)}/{self.plan.num_blocks} blocks of {where} "
            f"checkpointed ({self.plan.mode}, {self.plan.mechanism} mechanism)."
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.plan is not None:
            return
        if self.every_n_layers != "auto":
            self._enable(pl_module, self.every_n_layers)
            return
        from lightning_txopt.callbacks.token_budget import prepare_memory

        memory = self.memory if self.memory is not None else CudaMemory()
        # before .to(): the model's weights are not on the device yet
        prepare_memory(memory, trainer.strategy.root_device, "GradientCheckpointing(every_n_layers='auto')")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_layers == "auto" and self.chosen is None:
            self._choose(trainer, pl_module)
        elif self.every_n_layers == "auto" and self.chosen and self.plan is None:
            self._enable(pl_module, self.chosen)  # resumed (callback state loads after setup): no new probe
        # after the strategy has wrapped the model (FSDP1 applies its activation_checkpointing_policy then)
        if self.plan is not None:
            check_not_checkpointed_twice(pl_module, self.plan, type(trainer.strategy).__name__)

    def _choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_txopt.callbacks.token_budget import fit_checkpointing

        budget = getattr(getattr(trainer, "datamodule", None), "max_tokens", None)
        if not isinstance(budget, int):
            raise ValueError(
                f"GradientCheckpointing(every_n_layers='auto') needs a fixed token budget (it fits checkpointing to "
                f"the planned batches at that budget), got max_tokens={budget!r}. Give BucketDataModule(max_tokens="
                "<int>), or use TokenBudgetFinder with a fixed every_n_layers instead."
            )
        target = _find_model(pl_module, self.attribute)

        def apply(n: int | None) -> None:
            disable_gradient_checkpointing(target)
            self.plan = None
            if n:
                self._enable(pl_module, n)

        blocks = sum(len(found) for found in find_block_lists(target, self.block_classes))
        choice = fit_checkpointing(
            trainer, pl_module, apply, blocks, max_memory_fraction=self.max_memory_fraction, memory=self.memory
        )
        self.choice, self.chosen = choice, choice.every_n_layers or 0
        rank_zero_info(
            f"GradientCheckpointing(every_n_layers='auto'): {choice.checkpointed}/{blocks} blocks checkpointed "
            f"(every_n_layers={choice.every_n_layers}) to fit {self.max_memory_fraction:.0%} of the GPU at "
            f"max_tokens={budget}."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen} if self.every_n_layers == "auto" else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "chosen" in state_dict and self.every_n_layers == "auto":
            self.chosen = state_dict["chosen"]


def _find_model(pl_module: nn.Module, attribute: str | None) -> nn.Module:
    if attribute is not None:
        target = getattr(pl_module, attribute, None)
        if not isinstance(target, nn.Module):
            raise ValueError(f"{type(pl_module).__name__}.{attribute} is not an nn.Module.")
        return target
    for child in pl_module.modules():
        if getattr(child, "supports_gradient_checkpointing", False) and hasattr(child, "config"):
            return child
    return pl_module

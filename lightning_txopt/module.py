"""``TransformerModule``: a LightningModule for Hugging Face sequence classification and causal language models."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_txopt.callbacks.accumulation import LOSS_REDUCTIONS, estimated_optimizer_steps
from lightning_txopt.data.packing import is_packed
from lightning_txopt.losses import (
    DEFAULT_CHUNK_SIZE,
    check_chunked_loss_support,
    chunked_linear_cross_entropy,
    lm_head_of,
)
from lightning_txopt.memory import explaining_out_of_memory
from lightning_txopt.models.attention import (
    VARLEN_ATTENTION,
    attention_dropout,
    register_varlen_attention,
    segment_ids,
    varlen_kernel_available,
)
from lightning_txopt.models.packing import (
    PackingSupport,
    check_packing_support,
    packed_classification_logits,
    packed_model_inputs,
)
from lightning_txopt.utils.checks import check_positive_int
from lightning_txopt.utils.sharding import clean_name, is_fsdp2_module

__all__ = ["TASKS", "TransformerModule", "linear_warmup_decay"]

Task = Literal["sequence-classification", "causal-lm"]
TASKS: tuple[str, ...] = ("sequence-classification", "causal-lm")
LossReduction = Literal["auto", "mean", "sum"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Any:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    Example:
        >>> f = linear_warmup_decay(2, 10)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class _WarmupDecay:
    """``LambdaLR`` multiplier whose step count is known only when training starts.

    ``configure_optimizers`` runs before the training loader exists (and before a token budget may have been found),
    so the number of optimizer steps is set in ``on_train_start``. Step 0 needs no total: warm-up starts at 0 and a
    run without warm-up starts at 1. A picklable object (not a closure), so the module still pickles for ddp_spawn.
    """

    def __init__(self, warmup: float) -> None:
        self.warmup = warmup
        self.total: int | None = None

    def __call__(self, step: int) -> float:
        if self.total is None:
            if step == 0:
                return 0.0 if self.warmup > 0 else 1.0
            raise RuntimeError("The LR schedule has no step count yet: TransformerModule sets it in on_train_start.")
        total = max(self.total, 1)
        warmup = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        return linear_warmup_decay(warmup, total)(step)


class TransformerModule(pl.LightningModule):
    """Fine-tune or train a Hugging Face ``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM``.

    Built from a model name or local folder (``model``) or from a config (``config``: a ``PretrainedConfig`` or a
    dict with ``model_type``, handy in YAML). AdamW (fused on CUDA; no weight decay on biases and norms), linear
    warm-up and decay over the *true* number of optimizer steps (:func:`estimated_optimizer_steps`), validation
    accuracy (classification) or perplexity (causal LM) with torchmetrics, synchronised across ranks.

    Packed batches (``strategy="packed"``; a batch is packed when it carries ``cu_seq_lens_q``) work for both
    tasks. With ``attn_implementation="auto"`` (the default) the model runs the varlen attention backend
    (:func:`~lightning_txopt.models.use_varlen_attention`): packed batches go to FlashAttention's variable-length
    kernel on CUDA in bf16/fp16 (no mask, the model's sliding windows applied) and to an exact block-masked SDPA
    elsewhere; padded batches run SDPA as before. Classification pools each packed sample the way the model's own
    head does (first token, last token or mean) and runs the model's own head on it. The first packed batch of any
    stage (fit, validate, test, predict) is preceded by :func:`~lightning_txopt.models.check_packing_support`: a model
    that would mix packed samples is refused with a ``ValueError`` before any step.

    Evaluation logs ``val_loss``/``val_acc`` (or ``val_ppl``) and ``test_loss``/``test_acc`` (or ``test_ppl``), summed
    over all ranks; :meth:`predict_step` returns each sample's dataset position (``"index"``, from the batch) with its
    logits, so that :func:`~lightning_txopt.restore_order` can put predictions back in dataset order.

    Loss contract (:attr:`loss_reduction`): ``training_step`` returns the mean loss over the batch's items, or their
    sum when ``loss_reduction == "sum"``. The default ``"auto"`` means "mean, unless a callback that normalises by
    items asks for sums": :class:`~lightning_txopt.callbacks.AccumulationScheduler` with ``normalize="tokens"`` sets
    it to ``"sum"`` at setup (and back at teardown), then divides by the items of the whole window and all ranks.
    The items are what :meth:`count_loss_items` counts: labels ``!= -100``; for causal LMs the shifted labels, one
    fewer per row and none across the boundary of two packed samples.

    Args:
        model: Hugging Face model name or local folder (``from_pretrained``).
        config: A ``PretrainedConfig`` or a dict with ``model_type`` (random initialisation).
        task: ``"sequence-classification"`` or ``"causal-lm"``.
        num_labels: Number of classes (classification).
        learning_rate: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and normalisation weights).
        warmup: Warm-up length: a fraction of the optimizer steps (< 1) or a step count (>= 1).
        betas: AdamW betas.
        eps: AdamW epsilon.
        attn_implementation: ``"auto"`` (the varlen backend: SDPA for padded batches, the varlen kernel or an exact
            fallback for packed ones) or a Hugging Face name passed through (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``, ...).
        loss_chunk_size: Causal LM: compute the output layer and the cross-entropy in chunks of this many tokens
            (:func:`~lightning_txopt.losses.chunked_linear_cross_entropy`), so the ``(tokens, vocabulary)`` logits
            never exist at once (4 GiB of bf16 logits for a 128k vocabulary at 16,384 tokens). Exact: loss and
            gradients equal the unchunked ones. ``None`` computes full logits. Models whose logits are not exactly
            ``lm_head(hidden states)`` (soft-capped or scaled logits, custom heads) are checked at the first batch
            and get full logits, with an info message. Classification ignores it.
        compile: Run the model under ``torch.compile`` (compiled on first use). With static shapes
            (``BucketDataModule(strategy="packed", static_shapes=True)``) it compiles once; with bucketed batches,
            ``pad_to_lengths`` bounds the number of shapes, hence of recompilations.
        compile_mode: ``torch.compile``'s ``mode`` with ``compile=True``: ``None`` (torch's default), ``"default"``,
            ``"reduce-overhead"`` (CUDA graphs: replays each compiled graph with one launch; static shapes only, and
            the graphs' memory is kept between steps), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``
            (Inductor benchmarks kernel choices, GEMMs included, at the first compile: minutes longer).
        loss_reduction: ``"auto"``, ``"mean"`` or ``"sum"`` (see the loss contract above).
        head_lr_factor: The task head's learning rate is ``learning_rate * head_lr_factor`` (same schedule). The head
            is every parameter outside the backbone (``model.base_model``): a classifier's freshly initialised
            ``classifier``/``score`` layer; a causal LM's output layer unless it is tied to the input embeddings.
            A fresh head needs to travel much further than pretrained weights: with AdamW each step moves a weight
            by about the learning rate, so few, large steps (token-budget batches) reach a given accuracy sooner
            with a larger head factor (``docs/gpu_compare.md``, time to accuracy).

    Raises:
        ValueError: If neither or both of ``model``/``config`` are given, on an unknown task, or on a learning rate,
            warm-up, head factor or chunk size out of range, or on a ``compile_mode`` that is unknown or given
            without ``compile=True``.

    Example:
        >>> import torch
        >>> module = TransformerModule(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
        ...     "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50}, num_labels=3)
        >>> batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        ...          "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": torch.tensor([0, 2])}
        >>> loss, items, logits = module.loss_and_items(batch, "mean")
        >>> int(items), tuple(logits.shape), module.model.config._attn_implementation
        (2, (2, 3), 'txopt_varlen')
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        config: Any | None = None,
        task: Task = "sequence-classification",
        num_labels: int | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup: float = 0.06,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        attn_implementation: str | None = "auto",
        head_lr_factor: float = 1.0,
        loss_reduction: LossReduction = "auto",
        loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        compile: bool = False,
        compile_mode: CompileMode | None = None,
    ) -> None:
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError("Give exactly one of `model` (a name or local folder) and `config`.")
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        if learning_rate <= 0 or warmup < 0:
            raise ValueError(f"`learning_rate` must be > 0 and `warmup` >= 0, got {learning_rate!r}, {warmup!r}.")
        if not head_lr_factor > 0:
            raise ValueError(f"`head_lr_factor` must be > 0, got {head_lr_factor!r}.")
        check_positive_int("loss_chunk_size", loss_chunk_size, optional=True)
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"`compile_mode` must be one of {COMPILE_MODES} or None, got {compile_mode!r}.")
        if compile_mode is not None and not compile:
            raise ValueError(f"`compile_mode={compile_mode!r}` needs `compile=True`: without it nothing is compiled.")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
        self.save_hyperparameters(ignore=["config"] if not isinstance(config, dict | None) else None)
        self.task: Task = task
        hf_model: Any = self._build(model, config, task, num_labels, attn_implementation)
        hf_model.train()  # from_pretrained returns eval mode (dropout off); Lightning does not switch modes for us
        self.model = hf_model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.betas = betas
        self.eps = eps
        self.head_lr_factor = head_lr_factor
        self.loss_reduction: LossReduction = loss_reduction
        self.compile_model = compile
        self.compile_mode: CompileMode | None = compile_mode
        self.loss_chunk_size = loss_chunk_size
        self._chunked: bool | None = None  # whether the chunked loss applies to this model (checked at first use)
        self._loss_in_progress_bar = True
        self._schedule = _WarmupDecay(self.warmup)
        self._packing: PackingSupport | None = None  # set by the first packed batch's check
        self._compiled: dict[str, Any] = {}  # torch.compile wrappers, kept out of the module tree (and state_dict)
        self._dropout_checked = False
        self._batch: dict[str, Any] | None = None
        # decided on the unwrapped model (FSDP1 shards parameters into 1-D views of one flat tensor later): weight
        # decay on weight matrices, not on biases and norms; the parameter count FLOP estimates use
        self._decays = {n for n, p in self.named_parameters() if not (p.ndim < 2 or "norm" in n.lower())}
        self._non_embedding_params = int(hf_model.num_parameters(exclude_embeddings=True))
        num_classes = int(hf_model.config.num_labels)
        for stage in ("val", "test"):  # metrics are summed over every rank when computed
            if task == "sequence-classification":
                setattr(self, f"{stage}_accuracy", MulticlassAccuracy(num_classes=num_classes, average="micro"))
            setattr(self, f"{stage}_loss_sum", SumMetric())
            setattr(self, f"{stage}_items", SumMetric())

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a new process (``ddp_spawn``, DataLoader workers): register the varlen backend there too."""
        super().__setstate__(state)
        if getattr(self.model.config, "_attn_implementation", None) == VARLEN_ATTENTION:
            register_varlen_attention()

    @staticmethod
    def _build(model: str | None, config: Any, task: Task, num_labels: int | None, attn: str | None) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
        kwargs: dict[str, Any] = {}
        if num_labels is not None and task == "sequence-classification":
            kwargs["num_labels"] = num_labels
        if isinstance(config, dict):
            config = dict(config)
            model_type = config.pop("model_type", None)
            if model_type is None:
                raise ValueError("A `config` dict needs a 'model_type' (e.g. 'bert', 'gpt2').")
            config = AutoConfig.for_model(model_type, **config)
        if config is not None and "num_labels" in kwargs:
            config.num_labels = kwargs.pop("num_labels")

        def build(implementation: str | None) -> nn.Module:
            extra = dict(kwargs)
            if implementation is not None:
                extra["attn_implementation"] = implementation
            if model is not None:
                # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps a bf16 file's dtype by
                # default): Lightning's precision plugin, not the checkpoint, decides what runs in lower precision
                return auto.from_pretrained(model, dtype=torch.float32, **extra)
            return auto.from_config(config, **extra)

        if attn != "auto":
            return build(attn)
        try:
            return build(register_varlen_attention())
        except (ValueError, NotImplementedError) as err:  # attention that does not dispatch through the interface
            rank_zero_info(f"TransformerModule: attn_implementation='auto' falls back to 'sdpa' ({err}).")
            return build("sdpa")

    # ------------------------------------------------------------------ forward and loss
    def _run(self, name: str, module: nn.Module) -> Any:
        """``module`` itself, or its ``torch.compile`` wrapper with ``compile=True`` (made once per entry point)."""
        if not self.compile_model:
            return module
        if name not in self._compiled:
            self._compiled[name] = torch.compile(module, mode=self.compile_mode)
        return self._compiled[name]

    def _check_packed(self) -> PackingSupport:
        """The first packed batch checks that the model keeps packed samples apart (else a ValueError)."""
        if self._packing is None:
            if is_fsdp2_module(self.model):
                raise ValueError(
                    f"{type(self.model).__name__} is sharded with FSDP2 (fully_shard): packed batches run the base "
                    "model and the task head separately, outside the sharded root's forward. Use FSDPStrategy "
                    "(FSDP1) or strategy='bucket' with FSDP2."
                )
            self._packing = check_packing_support(
                self.model, task="sequence-classification" if self.task == "sequence-classification" else "base"
            )
        return self._packing

    def _warn_dropout_once(self, batch: dict[str, Any]) -> None:
        """Packed training batches on the varlen kernel get no attention dropout: say so once."""
        self._dropout_checked = True
        ids = batch["input_ids"]
        half = torch.is_autocast_enabled(ids.device.type) and torch.get_autocast_dtype(ids.device.type) in (
            torch.bfloat16,
            torch.float16,
        )
        dtype = next(self.model.parameters()).dtype
        kernel = varlen_kernel_available(ids.device, torch.get_autocast_dtype(ids.device.type) if half else dtype)
        p = attention_dropout(self.model)
        if kernel and p > 0 and getattr(self.model.config, "_attn_implementation", None) == VARLEN_ATTENTION:
            rank_zero_warn(
                f"TransformerModule: {type(self.model).__name__} has attention dropout {p}, which the varlen kernel "
                "does not apply: packed batches train without attention dropout (hidden-state dropout still "
                "applies). Set the attention dropout to 0 to silence this, or use strategy='bucket'."
            )

    def forward_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a batch: ``(samples, classes)`` for classification, ``(rows, width, vocab)`` for causal LMs.

        Packed batches (``cu_seq_lens_q`` present) are checked once, then run as
        :func:`~lightning_txopt.models.packed_model_inputs` says for the model's attention implementation.
        """
        if not is_packed(batch):
            inputs = {k: v for k, v in batch.items() if k in _MODEL_KEYS}
            return self._run("model", self.model)(**inputs).logits
        support = self._check_packed()
        if self.training and not self._dropout_checked:
            self._warn_dropout_once(batch)
        if self.task == "sequence-classification":
            assert support.pooling is not None
            base = self._run("base", self.model.base_model)
            logits, _ = packed_classification_logits(
                self.model, batch, support.pooling, base=base, offset=support.position_offset
            )
            return logits
        rows, width = batch["input_ids"].shape
        inputs = packed_model_inputs(self.model, batch, offset=support.position_offset)
        out = self._run("model", self.model)(**inputs).logits
        return out.reshape(rows, width, -1)

    def _lm_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token targets ``labels[:, 1:]``; in packed rows none across a boundary (where a segment starts)."""
        labels = batch["labels"][..., 1:]
        if is_packed(batch):
            labels = labels.masked_fill(batch["position_ids"][..., 1:] == 0, -100)
        return labels

    def count_loss_items(self, batch: dict[str, Any]) -> torch.Tensor:
        """The items a batch's loss sums over: what ``loss_reduction="sum"`` divides by to give the mean.

        A 0-dim tensor on the batch's device. Classification: labels ``!= -100``. Causal LM: the shifted labels
        ``labels[:, 1:] != -100`` (the first position of each row predicts nothing, nor, in packed rows, the last
        token of a sample the first of the next).

        Example:
            >>> m = TransformerModule(config={"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
            ...     "vocab_size": 50, "n_positions": 16}, task="causal-lm")
            >>> int(m.count_loss_items({"labels": torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])}))
            3
        """
        labels = self._lm_targets(batch) if self.task == "causal-lm" else batch["labels"]
        return (labels != -100).sum()

    def _use_chunked_loss(self) -> bool:
        if self._chunked is None:
            self._chunked = False
            if self.task == "causal-lm" and self.loss_chunk_size is not None:
                try:
                    check_chunked_loss_support(self.model)
                    self._chunked = True
                except ValueError as err:
                    rank_zero_info(f"TransformerModule: full logits for the loss ({err})")
        return self._chunked

    def _chunked_lm_loss(
        self, batch: dict[str, Any], reduction: Literal["mean", "sum"]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal-LM loss without the full logits: hidden states, then the output layer and loss chunk by chunk."""
        if is_packed(batch):
            support = self._check_packed()
            inputs = packed_model_inputs(self.model, batch, offset=support.position_offset)
        else:
            inputs = {k: v for k, v in batch.items() if k in _MODEL_KEYS}
        hidden = self._run("base", self.model.base_model)(**inputs).last_hidden_state
        targets = self._lm_targets(batch)
        targets = torch.cat([targets, torch.full_like(targets[..., :1], -100)], dim=-1)  # lines up with hidden
        head = lm_head_of(self.model)
        assert self.loss_chunk_size is not None
        loss = chunked_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            targets.reshape(-1),
            bias=head.bias,
            chunk_size=self.loss_chunk_size,
            reduction=reduction,
        )
        return loss, (targets != -100).sum()

    def loss_and_items(
        self, batch: dict[str, Any], reduction: Literal["mean", "sum"]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loss, item count, logits)`` of a batch; items as :meth:`count_loss_items` counts them.

        ``logits`` is ``None`` for a causal LM under the chunked loss (they never exist whole); use
        :meth:`forward_logits` for them.
        """
        if self.task == "causal-lm" and self._use_chunked_loss():
            loss, items = self._chunked_lm_loss(batch, reduction)
            return loss, items, None
        logits = self.forward_logits(batch)
        if self.task == "causal-lm":
            labels = self._lm_targets(batch).reshape(-1)
            logits_flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        else:
            labels, logits_flat = batch["labels"], logits
        loss = F.cross_entropy(logits_flat.float(), labels, ignore_index=-100, reduction=reduction)
        return loss, (labels != -100).sum(), logits

    @override
    def on_fit_start(self) -> None:
        # Lightning turns progress-bar values into numbers after every batch: one host-device sync per step. Only pay
        # for it when there is a progress bar to show the loss in (the loss is logged either way).
        self._loss_in_progress_bar = getattr(self.trainer, "progress_bar_callback", None) is not None

    @override
    def on_train_start(self) -> None:
        # the loader exists now (and a found token budget is in force): count the run's optimizer steps
        self._schedule.total = estimated_optimizer_steps(self.trainer)

    @override
    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The loss of a batch: its mean or, with ``loss_reduction="sum"``, its sum over the items.

        An out-of-memory error here or in :meth:`backward` names the batch's shape, its tokens, the token budget in
        force and what to do (:func:`~lightning_txopt.memory.explain_out_of_memory`).
        """
        self._batch = batch  # for backward's explanation of an out-of-memory error
        with explaining_out_of_memory(batch, max_tokens=self._token_budget()):
            summed = self.loss_reduction == "sum"
            loss, items, _ = self.loss_and_items(batch, "sum" if summed else "mean")
        mean = loss.detach() / items.clamp_min(1) if summed else loss.detach()
        self.log("train_loss", mean, prog_bar=self._loss_in_progress_bar, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with explaining_out_of_memory(self._batch, max_tokens=self._token_budget(), where="backward pass"):
            super().backward(loss, *args, **kwargs)

    def _token_budget(self) -> Any:
        """The DataModule's ``max_tokens``, read only to explain an out-of-memory error."""
        try:
            datamodule = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            return None
        return getattr(datamodule, "max_tokens", None)

    def _evaluate(self, stage: str, batch: dict[str, Any]) -> None:
        loss_sum, items, logits = self.loss_and_items(batch, "sum")
        getattr(self, f"{stage}_loss_sum").update(loss_sum.detach())
        getattr(self, f"{stage}_items").update(items)
        if self.task == "sequence-classification":
            assert logits is not None
            keep = batch["labels"] != -100
            getattr(self, f"{stage}_accuracy").update(logits.argmax(-1)[keep], batch["labels"][keep])

    def _log_evaluation(self, stage: str) -> None:
        total, items = getattr(self, f"{stage}_loss_sum").compute(), getattr(self, f"{stage}_items").compute()
        loss = total / items.clamp_min(1)
        metrics = {f"{stage}_loss": loss}
        if self.task == "sequence-classification":
            metrics[f"{stage}_acc"] = getattr(self, f"{stage}_accuracy").compute()
            getattr(self, f"{stage}_accuracy").reset()
        else:
            metrics[f"{stage}_ppl"] = torch.exp(loss.clamp(max=30.0))
        # already summed over every rank by the metrics: the mean over ranks of equal values changes nothing
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=True)
        getattr(self, f"{stage}_loss_sum").reset()
        getattr(self, f"{stage}_items").reset()

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("val", batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate("test", batch)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-sample predictions with each sample's dataset position, for :func:`~lightning_txopt.restore_order`.

        Returns ``{"index", "logits", "preds"}`` for classification (logits ``(samples, classes)``) and
        ``{"index", "logits", "nll", "tokens"}`` for causal LMs: the logits at each sample's last token
        ``(samples, vocab)``, the sample's summed next-token loss and the number of tokens it sums over (labels
        ``!= -100``; without labels, the input ids are the targets). ``index`` is the batch's ``"index"`` (every
        :class:`~lightning_txopt.BucketDataModule` evaluation batch has it); entries of static-shape filler slots
        have index -1.
        """
        logits = self.forward_logits(batch)
        index = batch["index"] if "index" in batch else torch.full((logits.shape[0],), -1, device=logits.device)
        if self.task == "sequence-classification":
            return {"index": index, "logits": logits, "preds": logits.argmax(-1)}
        if "labels" not in batch:
            batch = {**batch, "labels": batch["input_ids"]}
        targets = self._lm_targets(batch)
        token_nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )  # (rows, width - 1)
        valid = targets != -100
        if is_packed(batch):
            last = batch["last_index"]
            owner = self._sample_of_tokens(batch)[..., 1:]
            n = last.shape[0]
            nll = torch.zeros(n, device=logits.device).index_add_(0, owner[valid], token_nll[valid])
            tokens = torch.zeros(n, device=logits.device, dtype=torch.long).index_add_(
                0, owner[valid], torch.ones_like(owner[valid])
            )
            final = logits[last[:, 0], last[:, 1]]
        else:
            nll, tokens = (token_nll * valid).sum(1), valid.sum(1)
            mask = batch.get("attention_mask")
            ends = (mask.sum(1) - 1) if mask is not None and mask.dim() == 2 else torch.full_like(nll, -1).long()
            final = logits[torch.arange(logits.shape[0], device=logits.device), ends]
        return {"index": index, "logits": final, "nll": nll, "tokens": tokens}

    @staticmethod
    def _sample_of_tokens(batch: dict[str, Any]) -> torch.Tensor:
        """``(rows, width)``: the sample slot of each token of a packed batch (padding maps to a slot it is not in)."""
        rows, width = batch["input_ids"].shape
        cu = batch["cu_seq_lens_q"]
        seg = segment_ids(cu, rows * width).view(rows, width)
        row = torch.arange(rows, device=seg.device)[:, None]
        return (seg - row).clamp(0, batch["cls_index"].shape[0] - 1)  # sample i is segment i + its row

    # ------------------------------------------------------------------ optimisation
    def head_parameter_names(self) -> set[str]:
        """Names (as in ``named_parameters()``) of the task head: the parameters outside ``model.base_model``.

        Empty when the model has no separate backbone, and for an output layer tied to the input embeddings.

        Example:
            >>> m = TransformerModule(config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
            ...     "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}, num_labels=3)
            >>> sorted(m.head_parameter_names())
            ['model.classifier.bias', 'model.classifier.weight']
        """
        base = getattr(self.model, "base_model", self.model)
        if base is self.model:
            return set()
        backbone = {id(p) for p in base.parameters()}
        return {name for name, p in self.named_parameters() if id(p) not in backbone and name.startswith("model.")}

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay on weight matrices only (not biases, norms or embeddings' norms).

        The first group (backbone, with weight decay) is always there; other groups only when they have parameters.
        With ``head_lr_factor != 1`` the head's parameters get groups of their own with
        ``lr = learning_rate * head_lr_factor``.
        """
        head = self.head_parameter_names() if self.head_lr_factor != 1.0 else set()
        # (in head, decays) -> parameters, in group order
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
            (False, True): [],
            (False, False): [],
            (True, True): [],
            (True, False): [],
        }
        for name, p in self.named_parameters():
            if p.requires_grad:  # FSDP1 inserts wrapper segments in names (and flattens shards to 1-D views)
                buckets[(name in head, clean_name(name) in self._decays)].append(p)
        groups = []
        for (in_head, decays), params in buckets.items():
            if params or (not in_head and decays):  # the first group always exists
                group: dict[str, Any] = {"params": params, "weight_decay": self.weight_decay if decays else 0.0}
                if in_head:
                    group["lr"] = self.learning_rate * self.head_lr_factor
                groups.append(group)
        return groups

    @override
    def configure_optimizers(self) -> Any:
        on_cuda = all(p.is_cuda for p in self.parameters())
        optimizer = torch.optim.AdamW(
            self.optimizer_groups(), lr=self.learning_rate, betas=self.betas, eps=self.eps, fused=on_cuda or None
        )
        self._schedule = _WarmupDecay(self.warmup)  # its step count is set in on_train_start
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Any = None,
    ) -> None:
        """Step, then free the gradients at once.

        Lightning zeroes gradients inside the next step's closure, after its forward pass: the previous step's
        gradients (one parameter-sized fp32 buffer, 0.41 GiB for BERT-base) would stay allocated through the forward,
        where activation memory peaks. Freeing them here lowers peak memory by that much and changes no result.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def flops_per_token(self, seq_len: int = 128) -> float:
        """Training FLOPs per token: ``6 * non-embedding parameters + 12 * layers * hidden * seq_len`` (attention).

        The usual estimate (Kaplan et al., 2020; PaLM appendix B); ``seq_len`` is the mean processed length.
        """
        config = self.model.config
        layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0)
        hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0)
        return 6.0 * self._non_embedding_params + 12.0 * layers * hidden * seq_len

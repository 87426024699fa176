"""``TransformerModule``: a LightningModule for Hugging Face sequence classification and causal language models."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_txopt.callbacks.accumulation import estimated_optimizer_steps
from lightning_txopt.data.packing import check_packing_support, packed_classification_logits

__all__ = ["TASKS", "TransformerModule", "linear_warmup_decay"]

Task = Literal["sequence-classification", "causal-lm"]
TASKS: tuple[str, ...] = ("sequence-classification", "causal-lm")
LossReduction = Literal["auto", "mean", "sum"]
LOSS_REDUCTIONS: tuple[str, ...] = ("auto", "mean", "sum")
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

    Packed batches (``strategy="packed"``) work for both tasks: classification pools each sample at its own first
    token (BERT-style heads) or last token (decoder heads); at fit start the model is checked to keep packed samples
    apart, else a clear ``ValueError``.

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
        attn_implementation: Passed to Hugging Face (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...).
        loss_reduction: ``"auto"``, ``"mean"`` or ``"sum"`` (see the loss contract above).
        head_lr_factor: The task head's learning rate is ``learning_rate * head_lr_factor`` (same schedule). The head
            is every parameter outside the backbone (``model.base_model``): a classifier's freshly initialised
            ``classifier``/``score`` layer; a causal LM's output layer unless it is tied to the input embeddings.
            A fresh head needs to travel much further than pretrained weights: with AdamW each step moves a weight
            by about the learning rate, so few, large steps (token-budget batches) reach a given accuracy sooner
            with a larger head factor (``docs/gpu_compare.md``, time to accuracy).

    Raises:
        ValueError: If neither or both of ``model``/``config`` are given, on an unknown task, or on a learning rate,
            warm-up or head factor out of range.
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
        attn_implementation: str | None = "sdpa",
        head_lr_factor: float = 1.0,
        loss_reduction: LossReduction = "auto",
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
        self._loss_in_progress_bar = True
        self._schedule = _WarmupDecay(self.warmup)
        if task == "sequence-classification":
            self.val_accuracy = MulticlassAccuracy(num_classes=int(hf_model.config.num_labels), average="micro")
        self.val_loss_sum = SumMetric()
        self.val_items = SumMetric()

    @staticmethod
    def _build(model: str | None, config: Any, task: Task, num_labels: int | None, attn: str | None) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
        kwargs: dict[str, Any] = {}
        if num_labels is not None and task == "sequence-classification":
            kwargs["num_labels"] = num_labels
        if attn is not None:
            kwargs["attn_implementation"] = attn
        if model is not None:
            # fp32 master weights whatever the checkpoint's dtype (transformers 5 keeps a bf16 file's dtype by
            # default): Lightning's precision plugin, not the checkpoint, decides what runs in lower precision
            return auto.from_pretrained(model, dtype=torch.float32, **kwargs)
        if isinstance(config, dict):
            config = dict(config)
            model_type = config.pop("model_type", None)
            if model_type is None:
                raise ValueError("A `config` dict needs a 'model_type' (e.g. 'bert', 'gpt2').")
            config = AutoConfig.for_model(model_type, **config)
        if "num_labels" in kwargs:
            config.num_labels = kwargs.pop("num_labels")
        return auto.from_config(config, **kwargs)

    # ------------------------------------------------------------------ loss
    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in _MODEL_KEYS}

    def count_loss_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The items a batch's loss sums over: what ``loss_reduction="sum"`` divides by to give the mean.

        A 0-dim tensor on the batch's device. Classification: labels ``!= -100``. Causal LM: the shifted labels
        ``labels[:, 1:] != -100`` (the first position of each row predicts nothing).

        Example:
            >>> m = TransformerModule(config={"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
            ...     "vocab_size": 50, "n_positions": 16}, task="causal-lm")
            >>> int(m.count_loss_items({"labels": torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])}))
            3
        """
        labels = batch["labels"]
        if self.task == "causal-lm":
            labels = labels[..., 1:]
        return (labels != -100).sum()

    def loss_and_items(
        self, batch: dict[str, torch.Tensor], reduction: Literal["mean", "sum"]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, item count, logits)`` of a batch; items as :meth:`count_loss_items` counts them."""
        if "cls_index" in batch and self.task == "sequence-classification":  # packed rows: pool each sample
            logits = packed_classification_logits(self.model, batch)
        else:
            logits = self.model(**self._model_inputs(batch)).logits
        labels = batch["labels"]
        if self.task == "causal-lm":
            logits_flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            labels = labels[:, 1:].reshape(-1)
        else:
            logits_flat = logits
        loss = F.cross_entropy(logits_flat.float(), labels, ignore_index=-100, reduction=reduction)
        return loss, (labels != -100).sum(), logits

    @override
    def on_fit_start(self) -> None:
        # Lightning turns progress-bar values into numbers after every batch: one host-device sync per step. Only pay
        # for it when there is a progress bar to show the loss in (the loss is logged either way).
        self._loss_in_progress_bar = getattr(self.trainer, "progress_bar_callback", None) is not None
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "strategy", None) == "packed":  # fail now, clearly, rather than mix samples
            check_packing_support(self.model, causal=self.task == "causal-lm")

    @override
    def on_train_start(self) -> None:
        # the loader exists now (and a found token budget is in force): count the run's optimizer steps
        self._schedule.total = estimated_optimizer_steps(self.trainer)

    @override
    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        summed = self.loss_reduction == "sum"
        loss, items, _ = self.loss_and_items(batch, "sum" if summed else "mean")
        mean = loss.detach() / items.clamp_min(1) if summed else loss.detach()
        self.log("train_loss", mean, prog_bar=self._loss_in_progress_bar, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, items, logits = self.loss_and_items(batch, "sum")
        self.val_loss_sum.update(loss_sum.detach())
        self.val_items.update(items)
        if self.task == "sequence-classification":
            keep = batch["labels"] != -100
            self.val_accuracy.update(logits.argmax(-1)[keep], batch["labels"][keep])

    @override
    def on_validation_epoch_end(self) -> None:
        total, items = self.val_loss_sum.compute(), self.val_items.compute()
        loss = total / items.clamp_min(1)
        metrics = {"val_loss": loss}
        if self.task == "sequence-classification":
            metrics["val_acc"] = self.val_accuracy.compute()
            self.val_accuracy.reset()
        else:
            metrics["val_ppl"] = torch.exp(loss.clamp(max=30.0))
        self.log_dict(metrics, prog_bar=True)
        self.val_loss_sum.reset()
        self.val_items.reset()

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
            if p.requires_grad:
                buckets[(name in head, not (p.ndim < 2 or "norm" in name.lower()))].append(p)
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
        params = int(self.model.num_parameters(exclude_embeddings=True))
        return 6.0 * params + 12.0 * layers * hidden * seq_len

"""Chunked language-model loss: the output projection and the cross-entropy, a chunk of tokens at a time.

A causal LM's loss is ``cross_entropy(hidden @ weight.T + bias, labels)`` over ``N`` tokens and a vocabulary of ``V``
words. Computed whole, the ``(N, V)`` logits dominate the memory of long-context training: 16,384 tokens of a
128k-word vocabulary are 4 GiB of bf16 logits, 8 GiB more for their fp32 copy, and as much again for the saved
log-softmax and its gradient. :func:`chunked_linear_cross_entropy` computes the same loss and the same gradients a
chunk of ``chunk_size`` tokens at a time, so no ``(N, V)`` tensor ever exists: the extra memory is
``O(chunk_size * V)``. The gradients are formed in the forward pass, where each chunk's softmax is at hand (as
Liger-Kernel's Triton "fused linear cross-entropy" does; this is plain PyTorch), or, where the upstream gradient must
be known first, in the backward pass from each chunk's logits recomputed there.

:func:`chunked_causal_lm_loss` applies it to a Hugging Face causal LM: hidden states of the base model, labels
shifted within each row, the LM head found by :func:`lm_head_of`, which refuses models whose logits are not exactly
``lm_head(last_hidden_state)`` (soft-capping, scaling, an MLM-style transform before the head, remote code).
:func:`check_chunked_loss_support` also compares both on a short input, once, at set-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNKED_LOSS_MODELS",
    "DEFAULT_CHUNK_SIZE",
    "check_chunked_loss_support",
    "chunked_causal_lm_loss",
    "chunked_linear_cross_entropy",
    "lm_head_of",
    "shift_labels",
]

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

DEFAULT_CHUNK_SIZE = 4096
"""Tokens per chunk. 4096 tokens of a 128k vocabulary are 2 GiB of fp32 logits (+1 GiB bf16), against ~30 GiB for
16,384 tokens unchunked. Smaller chunks need less memory but add a pass over the ``(V, H)`` fp32 weight gradient per
chunk (``docs/memory.md``)."""

CHUNKED_LOSS_MODELS: dict[str, str] = {
    # model_type -> the transformers class whose forward is ``lm_head(base_model(...).last_hidden_state)``: each one is
    # tested in tests/test_losses.py (loss and gradients equal the model's own loss).
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
"""The Hugging Face causal LMs :func:`lm_head_of` accepts, by ``config.model_type`` and class name."""

# Config attributes of transformers families that transform the logits or the last hidden state before the loss,
# named in the refusal (the refusal itself is the absence from CHUNKED_LOSS_MODELS).
_LOGIT_TRANSFORMS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (  # attribute, what it does, values that do nothing
    ("final_logit_softcapping", "soft-caps the logits (tanh(logits / c) * c)", (None,)),
    ("logit_scale", "multiplies the logits by a scale", (None, 1)),
    ("logits_scaling", "scales the logits or the last hidden state", (None, 1)),
    ("lm_head_multiplier", "multiplies the logits", (None, 1)),
    ("logits_mup_width_multiplier", "divides the last hidden state", (None, 1)),
)


def _check_call(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
    reduction: str,
) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1 (tokens per chunk), got {chunk_size!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`hidden` must be (..., H) and `weight` (V, H) (an nn.Linear's weight), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}."
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"`labels` must have the shape of `hidden` without its last dimension ({tuple(hidden.shape[:-1])}), "
            f"got {tuple(labels.shape)}."
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"`bias` must be ({weight.shape[0]},) like the weight's rows, got {tuple(bias.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be integer class indices, got dtype {labels.dtype}.")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight, bias)`` computes in: autocast's, or the inputs' own (which must agree)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        bias_dtype = bias.dtype if bias is not None else "no bias"
        raise TypeError(
            f"`hidden` ({hidden.dtype}), `weight` ({weight.dtype}) and `bias` ({bias_dtype}) must share a dtype "
            "outside autocast (as for F.linear): cast them, or run under torch.autocast."
        )
    return hidden.dtype


def _add_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in fp32 (``acc`` updated in place); ``a @ b`` computed and rounded in ``a``'s dtype.

    Each chunk's product is rounded as the unchunked matmul's whole product is (once, from an fp32 accumulator
    inside the matmul), then summed in fp32: the same code on CPU and CUDA, so the CPU tests cover both.
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    product = torch.mm(a, b).float()
    return product if acc is None else acc.add_(product)


class _Grads:
    """Gradients of ``hidden``, ``weight`` and ``bias`` (those in ``needs``), accumulated a chunk of rows at a time."""

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, ...]
    ) -> None:
        self.needs = needs[0], needs[1], needs[2] and bias is not None
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight: torch.Tensor | None = None  # fp32 accumulators, created by the first chunk
        self.bias: torch.Tensor | None = None
        self.like = [(t.shape, t.dtype, t.device) if t is not None else None for t in (weight, bias)]

    def add(self, rows: slice, grad_logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        """Add the contribution of ``rows``, whose logits' gradient is ``grad_logits`` (in the compute dtype)."""
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ w
        if self.needs[1]:
            self.weight = _add_mm(self.weight, grad_logits.t(), h)
        if self.needs[2]:
            chunk_sum = grad_logits.sum(0).float()  # rounded like the reference's sum; dtype=fp32 copies on CPU
            self.bias = chunk_sum if self.bias is None else self.bias.add_(chunk_sum)

    def finish(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
        """The three gradients (``None`` where not needed), times ``scale`` (a scalar tensor) if given."""
        grad_hidden = (
            self.hidden if scale is None or self.hidden is None else (self.hidden * scale).to(self.hidden.dtype)
        )
        out: list[torch.Tensor | None] = [grad_hidden]
        for grad, like, need in zip((self.weight, self.bias), self.like, self.needs[1:], strict=True):
            if not need or like is None:
                out.append(None)
                continue
            shape, dtype, device = like
            grad = torch.zeros(shape, dtype=torch.float32, device=device) if grad is None else grad  # no rows
            out.append((grad if scale is None else grad * scale).to(dtype))
        return tuple(out)


def _softmax_minus_onehot(
    probs: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``scale * (probs - onehot(targets))`` rounded to ``dtype``: the logits' gradient (``probs`` is overwritten)."""
    probs.scatter_add_(1, targets[:, None], torch.full_like(scale[:, None], -1.0))
    return probs.mul_(scale[:, None]).to(dtype)  # what the reference's `.float()` passes back to the matmul


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(linear(hidden, weight, bias).float(), labels)`` by chunks of rows.

    Two ways to the gradients, the same results: ``precompute`` (a tuple of which inputs need gradients) forms them
    in the forward pass, where each chunk's softmax is at hand, and the backward pass only multiplies them by the
    upstream gradient (3 matmuls in all, like the reference); otherwise the forward pass keeps one log-sum-exp per row
    and the backward pass recomputes each chunk's logits (4 matmuls), which any upstream gradient suits (a per-row
    one for ``reduction="none"``; fp16 loss scaling, applied before rounding to fp16 as in the reference).
    Saved for backward: the inputs (no copies), labels and log-sum-exps, or the three gradients.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        reduction: str,
        dtype: torch.dtype,
        precompute: tuple[bool, bool, bool] | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        valid = labels != ignore_index
        targets = labels.masked_fill(~valid, 0)  # any class; ignored rows are masked out below
        count = valid.sum()
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grads = _Grads(hidden, weight, bias, precompute) if precompute is not None else None
        if grads is not None:  # d loss / d logits of a row: (softmax - onehot), / count for the mean, 0 if ignored
            scale = valid / count.clamp_min(1) if reduction == "mean" else valid.float()
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                h = hidden[rows].to(dtype)
                logits = F.linear(h, w, b).float()  # the reference's `logits.float()`
                target_logit = logits.gather(1, targets[rows, None]).squeeze(1)
                top = logits.amax(1, keepdim=True)
                sums = logits.sub_(top).exp_().sum(1)  # in place: one fp32 chunk at a time
                lse[rows] = sums.log().add_(top.squeeze(1))
                losses[rows] = lse[rows] - target_logit
                if grads is not None:  # logits become the softmax in place
                    grad_logits = _softmax_minus_onehot(logits.div_(sums[:, None]), targets[rows], scale[rows], dtype)
                    grads.add(rows, grad_logits, h, w)
                    del grad_logits
                del logits  # before the next chunk's logits exist
        losses = torch.where(valid, losses, 0.0)
        ctx.chunk_size, ctx.reduction, ctx.dtype = chunk_size, reduction, dtype
        if grads is not None:
            ctx.grads = grads  # gradients of the loss itself (not inputs: nothing to save_for_backward)
            ctx.precomputed = True
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, count)
            ctx.precomputed = False
        if reduction == "none":
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / count.clamp_min(1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        none = (None,) * 6  # labels, chunk_size, ignore_index, reduction, dtype, precompute
        if ctx.precomputed:
            return (*ctx.grads.finish(grad_output.float()), *none)
        hidden, weight, bias, targets, valid, lse, count = ctx.saved_tensors
        chunk_size, reduction, dtype = ctx.chunk_size, ctx.reduction, ctx.dtype
        n = hidden.shape[0]
        grad_output = grad_output.float()
        if reduction == "mean":
            grad_output = grad_output / count.clamp_min(1)
        scale = torch.where(valid, grad_output.expand(n), 0.0)  # d loss / d logits = scale * (softmax - onehot)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                h = hidden[rows].to(dtype)
                probs = F.linear(h, w, b).float().sub_(lse[rows, None]).exp_()  # softmax, recomputed
                grads.add(rows, _softmax_minus_onehot(probs, targets[rows], scale[rows], dtype), h, w)
                del probs
        return (*grads.finish(), *none)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    recompute: bool | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)``, never holding the ``(N, V)`` logits.

    The same loss and gradients as that unchunked reference (fp32: within 1e-5 relative, tested), computed a chunk
    of ``chunk_size`` rows at a time: extra memory ``O(chunk_size * V)`` instead of ``O(N * V)``. The gradients of
    ``hidden``, ``weight`` and ``bias`` are formed one of two ways, with the same results:

    * in the forward pass (``recompute=False``, the technique of Liger-Kernel's fused linear cross-entropy), where
      each chunk's softmax is at hand; backward multiplies them by the upstream gradient. Three ``N x H x V``
      matmuls, as unchunked; the gradients (``(N, H)`` and an fp32 ``(V, H)``) are held from forward to backward;
    * in the backward pass (``recompute=True``), from each chunk's logits recomputed there; the forward pass keeps one
      fp32 log-sum-exp per row. Four matmuls; suits any upstream gradient.

    ``recompute=None`` (default) recomputes only where the first way would not give the reference's result: for
    ``reduction="none"`` (a gradient per row) and for fp16 (loss scaling must reach the logits' gradient before it
    is rounded to fp16, as in the reference), and forms the gradients in forward otherwise. Nothing is computed
    for backward when no input requires a gradient or under ``torch.no_grad()``.

    Precision follows the reference: under ``torch.autocast`` the logits are computed in autocast's dtype (as
    autocast computes ``F.linear``) and upcast to fp32 for the log-softmax; the logits' gradient is rounded to that
    dtype before the matmuls that use it. The gradient of ``weight`` is accumulated over chunks in fp32 (on CUDA
    within the matmul), then cast to ``weight.dtype``. Outside autocast the inputs must share a dtype. A ``weight``
    shared with the input embeddings (tied, as in GPT-2) receives its gradient through autograd like any other use
    of the tensor, so both contributions add up as in the unchunked model.

    Differences from ``F.cross_entropy``: ``"mean"`` of zero counted labels is 0 (not NaN) with zero gradients;
    labels out of ``[0, V)`` other than ``ignore_index`` raise on CPU and trip a device-side assert on CUDA, as with
    the reference. No host-device synchronisation. Not twice differentiable.

    ``torch.compile``: the function always runs eagerly (``torch.compiler.disable``: one graph break). Compiled
    (tried on CPU, ``aot_eager`` and ``inductor``, ``fullgraph=True``) it gave the eager loss and gradients, but the
    compiler saved every chunk's logits for backward instead of recomputing them: the full ``(N, V)``. A compiled
    caller gets the eager results and keeps the memory saving (tested on CPU with ``inductor``).

    Args:
        hidden: ``(..., H)`` inputs of the output layer (a causal LM's last hidden states, flattened or not).
        weight: ``(V, H)``: the output layer's ``nn.Linear.weight`` (possibly the input embedding matrix, if tied).
        labels: Class indices, the shape of ``hidden`` without its last dimension; ``ignore_index`` marks rows that
            do not count.
        bias: ``(V,)`` the output layer's bias, if any.
        chunk_size: Rows (tokens) per chunk. A chunk holds about ``chunk_size * V * 6`` bytes at its peak under
            bf16 autocast (fp32 logits and their bf16 gradient; more on CPU, whose matmuls copy transposed operands);
            each chunk adds a pass over the fp32 ``(V, H)`` gradient accumulator.
        ignore_index: Label of rows that count neither in the loss nor in the mean's denominator.
        reduction: ``"mean"`` over counted rows, ``"sum"``, or ``"none"`` (a loss per row, 0 where ignored).
        recompute: Where the gradients are formed (above); ``None`` picks.

    Returns:
        A scalar fp32 loss (``"mean"``, ``"sum"``) or fp32 losses of ``labels``' shape (``"none"``).

    Raises:
        ValueError: On a ``chunk_size`` < 1, an unknown ``reduction``, shapes that do not fit together, or
            ``recompute=False`` with ``reduction="none"`` or in fp16.
        TypeError: On non-integer labels, or inputs of different dtypes outside autocast.

    Example:
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> hidden = torch.randn(10, 8, requires_grad=True)
        >>> head = torch.nn.Linear(8, 50)
        >>> labels = torch.tensor([3, 7, -100, 1, 0, 49, 2, -100, 5, 5])
        >>> loss = chunked_linear_cross_entropy(hidden, head.weight, labels, bias=head.bias, chunk_size=4)
        >>> reference = F.cross_entropy(head(hidden).float(), labels, ignore_index=-100)
        >>> bool(torch.allclose(loss, reference))
        True
    """
    _check_call(hidden, weight, labels, bias, chunk_size, reduction)
    dtype = _compute_dtype(hidden, weight, bias)
    forward_ok = reduction != "none" and dtype != torch.float16
    if recompute is False and not forward_ok:
        raise ValueError(
            f"`recompute=False` forms the gradients before the upstream gradient is known, which "
            f"{'is one per row' if reduction == 'none' else 'fp16 loss scaling needs before rounding'} "
            f"(reduction={reduction!r}, dtype {dtype}): use recompute=True or None."
        )
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    precompute = needs if (recompute is False or (recompute is None and forward_ok)) and any(needs) else None
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    loss = _apply_eagerly(
        flat_hidden, weight, bias, flat_labels, chunk_size, ignore_index, reduction, dtype, precompute
    )
    return loss.view(labels.shape) if reduction == "none" else loss


@torch.compiler.disable
def _apply_eagerly(*args: Any) -> torch.Tensor:
    """Run the autograd function outside ``torch.compile`` (a graph break).

    Compiled with ``recompute=True``, AOTAutograd's partitioner sees that the backward's recomputed logits equal the
    forward's and saves every chunk's logits for backward instead: all ``(N, V)`` of them, the memory this function
    exists to avoid (``tests/test_losses.py`` checks the saved tensors of a compiled caller).
    """
    return _ChunkedLinearCrossEntropy.apply(*args)


# ---------------------------------------------------------------------------------------------- Hugging Face models
def _describe(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type {model_type!r})"


def lm_head_of(model: nn.Module) -> nn.Linear:
    """The output layer of a Hugging Face causal LM whose logits are exactly ``head(model.base_model(...)[0])``.

    Accepts the transformers classes of :data:`CHUNKED_LOSS_MODELS` (each tested: the chunked loss of their base
    model's hidden states equals the model's own loss, gradients included), with a plain ``nn.Linear`` head
    (``model.get_output_embeddings()``, tied to the input embeddings or not, with or without bias) holding plain
    tensors. Only full logits are covered (``logits_to_keep=0``, the training default).

    Refused, because the loss would differ: families that soft-cap the logits (Gemma 2/3, ``final_logit_softcapping``),
    scale them (Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1 ``lm_head_multiplier``), scale the last
    hidden state (MiniCPM3) or put a transform between the base model and the head (BigBird, ELECTRA); any class not
    in the table (subclasses, remote code, PEFT wrappers included); heads that are not a plain ``nn.Linear``
    (quantised, LoRA, tensor-parallel layers) or hold tensor subclasses (FSDP2's ``DTensor``).

    Args:
        model: A Hugging Face causal LM (``AutoModelForCausalLM``).

    Returns:
        The head, whose ``weight`` (and ``bias``) :func:`chunked_linear_cross_entropy` takes.

    Raises:
        ValueError: If the model is not one of those classes or its head is not a plain ``nn.Linear``; the message
            names the model and says to compute the loss unchunked instead.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
        >>> head = lm_head_of(model)
        >>> head.weight is model.get_input_embeddings().weight  # tied
        True
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    off = "compute the loss unchunked instead (turn the chunked loss off)"
    for attr, what, identity in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in identity:
            raise ValueError(
                f"{_describe(model)} {what} ({attr}={value!r}): the chunked loss computes plain "
                f"linear + cross-entropy and would differ; {off}."
            )
    cls = type(model)
    expected = CHUNKED_LOSS_MODELS.get(str(model_type))
    if expected is None or cls.__name__ != expected or not cls.__module__.startswith("transformers."):
        supported = ", ".join(f"{k} ({v})" for k, v in CHUNKED_LOSS_MODELS.items())
        raise ValueError(
            f"The chunked loss is verified for these causal LMs only: {supported}; got {_describe(model)} from "
            f"{cls.__module__}. Their logits must be exactly lm_head(base_model(...).last_hidden_state); {off}."
        )
    head = model.get_output_embeddings()  # type: ignore[operator]
    if type(head) is not nn.Linear:
        raise ValueError(
            f"{_describe(model)} has an output layer of type {type(head).__name__}, not a plain nn.Linear "
            f"(quantised, LoRA or parallel layers compute differently); {off}."
        )
    tensors = [head.weight] + ([head.bias] if head.bias is not None else [])
    odd = [type(t.detach()).__name__ for t in tensors if type(t.detach()) is not torch.Tensor]
    if odd:
        raise ValueError(
            f"{_describe(model)}'s output layer holds {odd[0]} parameters (e.g. FSDP2 shards), not plain tensors; "
            f"{off}."
        )
    if getattr(model, "base_model", model) is model:
        raise ValueError(
            f"{_describe(model)} has no base model (`model.base_model`) to take hidden states from; {off}."
        )
    return head


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels moved one position left within each row, ``ignore_index`` at the end: position t predicts t + 1.

    The shifted labels line up with the hidden states of every position, so those need no copy; the last position
    of each row counts for nothing, as in the unshifted ``logits[:, :-1]`` / ``labels[:, 1:]`` reference.

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7], [-100, 8, 9]])).tolist()
        [[6, 7, -100], [8, 9, -100]]
    """
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def chunked_causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """A Hugging Face causal LM's next-token loss, without its logits.

    Equals ``F.cross_entropy(model(**inputs).logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
    ignore_index=ignore_index, reduction=reduction)`` (and the model's own ``model(**inputs, labels=labels).loss``
    for ``"mean"``), gradients included: the base model's last hidden states, the labels shifted by
    :func:`shift_labels`, and :func:`chunked_linear_cross_entropy` with the head from :func:`lm_head_of`. Packed
    rows: pass ``inputs`` from :func:`~lightning_txopt.models.packed_model_inputs` (block masks for SDPA/eager, or
    the rows read as one sequence for the varlen backend; ``labels`` of the rows' shape are laid out like
    ``input_ids``), with each sample's first label ``ignore_index`` (``PackingCollator(causal=True)``) so that no
    position learns to predict the next sample.

    Args:
        model: A causal LM accepted by :func:`lm_head_of`.
        inputs: Keyword arguments of the model's forward (``input_ids``, ``attention_mask``, ``position_ids``...),
            given to ``model.base_model``; not ``labels``.
        labels: ``(batch, seq)`` token ids, ``ignore_index`` where nothing is predicted (padding, first tokens).
        chunk_size: Tokens per chunk (:func:`chunked_linear_cross_entropy`).
        ignore_index: Label that does not count.
        reduction: ``"mean"`` over the counted shifted labels, ``"sum"``, or ``"none"`` (``(batch, seq)``, the
            loss of predicting token t + 1 at position t, 0 at the last position).

    Returns:
        The loss, fp32.

    Raises:
        ValueError: As :func:`lm_head_of` and :func:`chunked_linear_cross_entropy`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> ids = torch.randint(0, 64, (2, 12))
        >>> loss = chunked_causal_lm_loss(model, {"input_ids": ids}, ids, chunk_size=8)
        >>> bool(torch.allclose(loss, model(input_ids=ids, labels=ids).loss))
        True
    """
    head = lm_head_of(model)
    base: Any = model.base_model
    ids = inputs.get("input_ids")
    if ids is not None and labels.shape != ids.shape and labels.numel() == ids.numel():
        labels = labels.reshape(ids.shape)  # packed rows read as one sequence (the varlen backend)
    hidden = base(**inputs)[0]  # last_hidden_state, also with return_dict=False
    return chunked_linear_cross_entropy(
        hidden,
        head.weight,
        shift_labels(labels, ignore_index),
        bias=head.bias,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        reduction=reduction,
    )


def check_chunked_loss_support(model: nn.Module) -> None:
    """Check, once, that ``model``'s logits are its head applied to its base model's hidden states.

    :func:`lm_head_of`'s checks, then a forward pass on 8 tokens (eval mode, no grad; training flags restored)
    comparing ``model(...).logits`` with ``F.linear(base_model(...).last_hidden_state, head.weight, head.bias)``:
    catches a head or forward changed after loading (forward hooks, patched ``forward`` methods).

    Raises:
        ValueError: As :func:`lm_head_of`, or if the two logits differ (with the largest difference); the message
            says to compute the loss unchunked instead.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> check_chunked_loss_support(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)))
        >>> from transformers import Gemma2Config, Gemma2ForCausalLM
        >>> gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, head_dim=8,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> check_chunked_loss_support(gemma)
        Traceback (most recent call last):
        ...
        ValueError: ...final_logit_softcapping...
    """
    head = lm_head_of(model)
    base: Any = model.base_model
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    vocab = int(getattr(embeddings, "num_embeddings", head.out_features))
    ids = (torch.arange(1, 9, device=head.weight.device) % vocab)[None]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state
            ours = F.linear(hidden, head.weight, head.bias).float()  # what the chunked loss computes
    finally:
        for module, training in modes.items():
            module.training = training
    if full.shape != ours.shape or not torch.allclose(full, ours, rtol=1e-5, atol=1e-5):
        diff = (full - ours).abs().max() if full.shape == ours.shape else float("nan")
        raise ValueError(
            f"{_describe(model)}'s logits are not lm_head(base_model(...).last_hidden_state) (max difference "
            f"{float(diff):.3g}; a forward hook or a patched forward?): compute the loss unchunked instead (turn "
            "the chunked loss off)."
        )

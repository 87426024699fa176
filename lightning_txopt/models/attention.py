"""A variable-length attention backend for Hugging Face models, built on ``torch.nn.attention.varlen``.

:func:`use_varlen_attention` registers ``"txopt_varlen"`` with transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` and switches a model to it. Every model that dispatches its attention through those
interfaces (BERT, RoBERTa, ELECTRA, DistilBERT, ModernBERT, GPT-2, Llama, Qwen2, Mistral, GPT-NeoX, ...) then runs
*packed* rows with no mask at all: the batch's segment boundaries (``cu_seq_lens_q``/``cu_seq_lens_k``,
``max_length_q``/``max_length_k``, see :mod:`lightning_txopt.data.packing`) go to the kernel, bidirectional for
encoders and causal for decoders (each attention module's ``is_causal``), the model's sliding window or local attention
through the kernel's ``window_size``.

Which kernel runs is decided per call, on the tensors at hand:

* packed, CUDA, bf16/fp16, a torch with ``varlen_attn``: a varlen kernel with the segment boundaries, no attention
  dropout (neither applies one here): SDPA's memory-efficient kernel for calls, eager or compiled, without a sliding
  window whose keys have as many heads as the queries (its 64-query tiles waste less on short samples), else
  FlashAttention's;
* packed, anywhere else (CPU, fp32, an old torch): an exact fallback, SDPA with a block mask built from the same
  boundaries (per row, so its cost is ``rows x width^2``, with dropout as SDPA applies it);
* not packed: transformers' own SDPA, with the mask transformers built (the window applied when it built none);
  an encoder's mask is built without reading its values on the host, so its padded batches make the host wait for
  nothing (``_varlen_mask``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

__all__ = [
    "VARLEN_ATTENTION",
    "attention_dropout",
    "register_varlen_attention",
    "segment_ids",
    "segment_mask",
    "use_varlen_attention",
    "varlen_attention_forward",
    "varlen_kernel_available",
]

#: The name of the backend in transformers' attention interfaces (``config._attn_implementation``).
VARLEN_ATTENTION = "txopt_varlen"


def _load_varlen_attn() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """Torch's ``varlen_attn`` and the names of its parameters, or ``None`` when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN_ATTN = _load_varlen_attn()  # read once: the attention function runs inside compiled graphs

#: The arguments :func:`_flash_varlen` passes to ``aten::_flash_attention_forward``, in order, then by keyword.
FLASH_FORWARD_ARGUMENTS = (
    "query",
    "key",
    "value",
    "cum_seq_q",
    "cum_seq_k",
    "max_q",
    "max_k",
    "dropout_p",
    "is_causal",
    "return_debug_mask",
    "scale",
    "window_size_left",
    "window_size_right",
)


#: The arguments :func:`_efficient_varlen` passes to ``aten::_efficient_attention_forward``, in order, then ``scale``.
EFFICIENT_FORWARD_ARGUMENTS = (
    "query",
    "key",
    "value",
    "bias",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "dropout_p",
    "custom_mask_type",
    "compute_log_sumexp",
    "scale",
)


#: The arguments :class:`_EfficientVarlen` passes to ``aten::_efficient_attention_backward``, in order, then by keyword.
EFFICIENT_BACKWARD_ARGUMENTS = (
    "grad_out_",
    "query",
    "key",
    "value",
    "bias",
    "out",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "logsumexp",
    "dropout_p",
    "philox_seed",
    "philox_offset",
    "custom_mask_type",
    "bias_requires_grad",
    "scale",
    "num_splits_key",
)


def _schema_matches(name: str, expected: tuple[str, ...]) -> bool:
    """Whether ``aten::<name>`` exists and its arguments start with ``expected`` (the one read of an op's schema)."""
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        return False
    names = [a.name for a in op.default._schema.arguments]
    return names[: len(expected)] == list(expected)


def flash_forward_schema_matches() -> bool:
    """Whether this torch's ``aten::_flash_attention_forward`` takes the arguments :func:`_flash_varlen` passes.

    The op is the one torch's public ``varlen_attn`` calls; a change of its schema switches the backend back to
    ``varlen_attn`` (and fails the test that checks this function).

    Example:
        >>> isinstance(flash_forward_schema_matches(), bool)
        True
    """
    return _schema_matches("_flash_attention_forward", FLASH_FORWARD_ARGUMENTS)


def efficient_forward_schema_matches() -> bool:
    """Whether this torch's memory-efficient varlen ops take the arguments the backend passes them.

    The ops are ``aten::_efficient_attention_forward`` (:func:`_efficient_varlen`) and
    ``aten::_efficient_attention_backward`` (:class:`_EfficientVarlen`): SDPA's memory-efficient kernel with segment
    boundaries, the ones torch's nested tensors call. A change of their schemas leaves every packed batch to
    FlashAttention's kernel (and fails the test that checks this function).

    Example:
        >>> isinstance(efficient_forward_schema_matches(), bool)
        True
    """
    return _schema_matches("_efficient_attention_forward", EFFICIENT_FORWARD_ARGUMENTS) and _schema_matches(
        "_efficient_attention_backward", EFFICIENT_BACKWARD_ARGUMENTS
    )


def efficient_backward_traces_with_scale() -> bool:
    """Whether ``aten::_efficient_attention_backward``'s fake implementation takes an explicit ``scale``.

    In torch 2.11-2.13 it lacks the op's ``out`` argument, so every later argument shifts by one and a ``scale``
    given by keyword collides with a positional one: a compiled graph's backward fails to trace (``got multiple
    values for argument 'scale'``). Left out, ``scale`` is never passed and the shapes it computes are still right.
    While this returns ``False``, compiled graphs run the memory-efficient kernel only with the default scale
    (passed as ``None``); once torch fixes it, it returns ``True`` and compiled graphs pass any scale. A CPU test
    checks both facts the backend relies on, and fails when the fake implementation changes otherwise.

    Example:
        >>> isinstance(efficient_backward_traces_with_scale(), bool)
        True
    """
    op = getattr(torch.ops.aten, "_efficient_attention_backward", None)
    if op is None:
        return False
    t = torch.empty(1, 8, 2, 64, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    seed = torch.empty((), device="meta", dtype=torch.int64)
    lse = torch.empty(1, 2, 8, device="meta", dtype=torch.float32)
    try:
        op(t, t, t, t, None, t, cu, cu, 4, 4, lse, 0.0, seed, seed, 0, False, scale=0.125)
    except (TypeError, RuntimeError):
        return False
    return True


_FLASH_OP = flash_forward_schema_matches()
_EFFICIENT_OP = efficient_forward_schema_matches()
_EFFICIENT_SCALE_TRACES = efficient_backward_traces_with_scale()
_FLASH_CAPABLE: dict[int, bool] = {}  # CUDA device index -> compute capability >= 8.0 (a fact of the hardware)


def _flash_capable(index: int) -> bool:
    """Whether CUDA device ``index`` runs FlashAttention (compute capability 8.0 or newer)."""
    if index not in _FLASH_CAPABLE:
        _FLASH_CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return _FLASH_CAPABLE[index]


def varlen_kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the variable-length FlashAttention kernel runs for tensors of ``dtype`` on ``device``.

    It needs a torch with ``torch.nn.attention.varlen.varlen_attn``, a CUDA device of compute capability 8.0 or
    newer (Ampere, Hopper) and bf16 or fp16 tensors.

    Example:
        >>> varlen_kernel_available("cpu", torch.bfloat16)
        False
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or _VARLEN_ATTN is None:
        return False
    return _flash_capable(device.index if device.index is not None else torch.cuda.current_device())


def segment_ids(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """The segment of each of ``total`` tokens, from the boundaries ``cu_seq_lens`` (empty segments allowed).

    Example:
        >>> segment_ids(torch.tensor([0, 3, 3, 5], dtype=torch.int32), 5).tolist()
        [0, 0, 0, 2, 2]
    """
    tokens = torch.arange(total, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    return torch.bucketize(tokens, cu_seq_lens[1:], right=True)


def segment_mask(
    cu_seq_lens: torch.Tensor, rows: int, width: int, *, causal: bool, window: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    """Boolean ``(rows, 1, width, width)`` mask: a token attends to the tokens of its own segment only.

    ``cu_seq_lens`` are boundaries over the ``rows * width`` tokens read row after row (no segment crosses a row);
    ``causal`` keeps keys at or before the query; ``window = (left, right)`` keeps keys at most ``left`` before and
    ``right`` after the query (-1: unbounded), FlashAttention's convention.

    Example:
        >>> m = segment_mask(torch.tensor([0, 2, 4], dtype=torch.int32), 1, 4, causal=True)
        >>> m[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    seg = segment_ids(cu_seq_lens, rows * width).view(rows, width)
    mask = seg[:, :, None] == seg[:, None, :]
    pos = torch.arange(width, device=seg.device)
    delta = pos[:, None] - pos[None, :]  # query - key, inside a row (a segment never crosses one)
    if causal:
        mask &= delta >= 0
    left, right = window
    if left >= 0:
        mask &= delta <= left
    if right >= 0:
        mask &= -delta <= right
    return mask[:, None]


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """FlashAttention's ``(left, right)`` for transformers' ``sliding_window`` argument (as its FA2 path reads it)."""
    if sliding_window is None:
        return (-1, 0) if causal else (-1, -1)
    reach = int(sliding_window) - 1
    return (reach, 0) if causal else (reach, reach)


def _kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None,
    window: tuple[int, int],
    memory_efficient: bool = True,
) -> torch.Tensor:
    """A varlen kernel on ``(tokens, heads, dim)`` tensors: memory-efficient where it applies, else FlashAttention's.

    The memory-efficient kernel (:func:`_efficient_varlen`) runs calls without a sliding window whose keys have as
    many heads as the queries and a head size of at most 128, eager or inside compiled graphs (its aten ops have
    fake implementations, so they trace, and CUDA graphs replay them). Inside compiled graphs only with the default
    scale ``1/sqrt(head size)``, which is then passed as ``None``: the fake implementation of its backward op lacks
    one of the op's arguments (torch 2.11-2.13), which only goes unnoticed when ``scale`` is left out
    (:func:`efficient_backward_traces_with_scale` says when torch has fixed it). FlashAttention's takes the rest and
    is called whatever this torch's signature; ``memory_efficient=False`` always takes it (the benchmarks time it so).
    """
    if memory_efficient and _EFFICIENT_OP and window[0] < 0 and k.shape[1] == q.shape[1] and q.shape[-1] <= 128:
        causal = window[1] == 0
        if not torch.compiler.is_compiling() or _EFFICIENT_SCALE_TRACES:
            return _efficient_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, causal=causal)
        if scale is None or math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-12):
            return _efficient_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, causal=causal)
    if _FLASH_OP:
        return _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window=window)
    found = _VARLEN_ATTN
    assert found is not None
    fn, params = found
    kwargs: dict[str, Any] = {"scale": scale}
    causal = window[1] == 0
    if "is_causal" in params:  # torch 2.10-2.11: a flag beside the window
        kwargs["is_causal"] = causal
    if "window_size" in params:
        kwargs["window_size"] = window
    elif window[0] >= 0:
        raise RuntimeError(
            f"torch {torch.__version__}'s varlen_attn has no window_size: this model's sliding window cannot run on "
            "it. Upgrade torch (>= 2.11) or use attn_implementation='sdpa' with strategy='bucket'."
        )
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return fn(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **kwargs)


#: How many splits of each segment's keys the memory-efficient backward runs (``num_splits_key``). torch's heuristic
#: takes ``max_length / 64`` (8 for rows of 512) whenever the longest segment exceeds 128 tokens: every split of a
#: short sample is an empty block, and the fp32 workspace they accumulate the query gradients in (``segments x heads
#: x max_length x head size``) is zeroed on every call: 2.8 ms of a 32 ms BERT-base step at 16,384 tokens on an H200
#: (``benchmarks/packing_step.py --profile``). One split needs no zeroing and is deterministic.
EFFICIENT_KEY_SPLITS: int | None = 1  # None: torch's heuristic (read at each forward call)


def _scale_by_name(scale: float | None) -> dict[str, float]:
    """The memory-efficient ops' ``scale`` keyword, left out when ``None``: see efficient_backward_traces_with_scale."""
    return {} if scale is None else {"scale": scale}


def _efficient_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float | None,
    causal: bool,
    log_sumexp: bool,
) -> Any:
    """``aten::_efficient_attention_forward`` on ``(tokens, heads, dim)`` tensors over the segments, no dropout."""
    return torch.ops.aten._efficient_attention_forward(
        q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, cu_q, cu_k, max_q, max_k, 0.0, int(causal), log_sumexp,
        **_scale_by_name(scale),
    )  # fmt: skip


class _EfficientVarlen(torch.autograd.Function):
    """The memory-efficient varlen kernel's forward and backward ops, the backward with :data:`EFFICIENT_KEY_SPLITS`.

    The forward op's own autograd formula leaves the splits to torch's heuristic.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        scale: float | None,
        causal: bool,
    ) -> torch.Tensor:
        out, lse, seed, offset, _, _ = _efficient_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, True)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu_q, cu_k)
        ctx.args = (max_q, max_k, int(causal), EFFICIENT_KEY_SPLITS, scale)
        return out[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, seed, offset, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, mask, splits, scale = ctx.args
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            grad.unsqueeze(0).contiguous(), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, out, cu_q, cu_k,
            max_q, max_k, lse, 0.0, seed, offset, mask, False, num_splits_key=splits, **_scale_by_name(scale),
        )  # fmt: skip
        return dq[0], dk[0], dv[0], None, None, None, None, None, None


def _efficient_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """SDPA's memory-efficient kernel over the segments ``cu_q``/``cu_k``: the other place that touches a private op.

    ``aten::_efficient_attention_forward`` with boundaries is what torch's nested tensors call; causality within each
    segment (``custom_mask_type=1``: from the segment's top left) and tiles of 64 queries where FlashAttention's varlen
    kernel takes 128: on short samples it leaves less of each tile empty. With gradients it runs as
    :class:`_EfficientVarlen` (its backward op with one split of the keys, :data:`EFFICIENT_KEY_SPLITS`). Measured on
    an H200 (``benchmarks/attention_kernels.py``, forward + backward per layer, the corpus's lengths): 1.52x
    FlashAttention's at 16,384 tokens and 1.89x at 65,536 (BERT shape), 1.94x and 2.24x (Llama shape, causal); with
    torch's split heuristic 1.19-1.34x. :func:`efficient_forward_schema_matches` guards the two ops' arguments; the
    GPU tests compare it with FlashAttention's kernel and with each sample alone.
    """
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grads and EFFICIENT_KEY_SPLITS is not None:
        return _EfficientVarlen.apply(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale, causal)
    # with gradients: the op's own autograd formula (torch's split heuristic)
    return _efficient_forward(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scale, causal, grads)[0][0]


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None,
    window: tuple[int, int],
) -> torch.Tensor:
    """The op under torch's public ``varlen_attn``, called directly: one of the two places that touch a private op.

    ``varlen_attn`` wraps ``aten::_flash_attention_forward`` in a Python custom op whose dispatch costs about
    0.47 ms of host time per layer and step more than SDPA's (715 vs 249 us per forward and backward on an H200),
    enough to make a host-bound training step 12% slower. The aten op has its own C++ autograd
    (``FlashAttentionBackward0``) and takes fewer key/value heads than query heads. :func:`flash_forward_schema_matches`
    guards its arguments; the GPU tests compare it with ``varlen_attn``.
    """
    out = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        cu_q,
        cu_k,
        int(max_q),
        int(max_k),
        0.0,
        window == (-1, 0),
        False,
        scale=scale,
        window_size_left=window[0],
        window_size_right=window[1],
    )
    return out[0]


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as ``"txopt_varlen"`` (transformers' ``AttentionInterface`` signature).

    ``query`` ``(batch, heads, seq, dim)``, ``key``/``value`` ``(batch, kv_heads, seq, dim)``; returns
    ``(batch, seq, heads, dim)``. Packed when ``cu_seq_lens_q`` is given (see the module docstring).

    Raises:
        ValueError: For a packed call with an additive position bias (T5's relative attention), which neither path
            can apply per segment.

    Example:
        >>> class Attention(nn.Module):
        ...     is_causal = True
        >>> q = k = v = torch.randn(1, 2, 5, 8)  # (batch, heads, tokens, dim): two samples of 3 and 2 tokens
        >>> cu = torch.tensor([0, 3, 5], dtype=torch.int32)
        >>> out, _ = varlen_attention_forward(Attention(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        ...                                   max_length_q=3, max_length_k=3)
        >>> second = q[:, :, 3:]
        >>> alone = torch.nn.functional.scaled_dot_product_attention(second, second, second, is_causal=True)
        >>> tuple(out.shape), torch.allclose(out[:, 3:], alone.transpose(1, 2), atol=1e-6)
        ((1, 5, 2, 8), True)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if cu_seq_lens_q is None:  # a plain padded batch: transformers' SDPA, with the mask transformers built
        if attention_mask is None and sliding_window is not None and query.shape[2] >= sliding_window:
            # transformers builds no mask without a padding mask: apply the window here
            seq = query.shape[2]
            cu = torch.tensor([0, seq], dtype=torch.int32, device=query.device)
            attention_mask = segment_mask(cu, 1, seq, causal=causal, window=_window(sliding_window, causal))
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if kwargs.get("position_bias") is not None:
        raise ValueError(
            f"{type(module).__name__} adds a position bias to its attention scores (relative attention, as in T5): "
            "packed rows cannot carry it. Use strategy='bucket' for this model."
        )
    cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
    query, key, value = _autocast_inputs(query, key, value)
    batch, heads, seq, dim = query.shape
    window = _window(sliding_window, causal)
    if varlen_kernel_available(query.device, query.dtype) and dim % 8 == 0 and dim <= 256:
        q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
        k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
        v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value.shape[-1])
        max_q = max_length_q if max_length_q is not None else seq
        max_k = max_length_k if max_length_k is not None else max_q
        out = _kernel(q, k, v, cu_seq_lens_q, cu_k, max_q, max_k, scale=scaling, window=window)
        return out.view(batch, seq, heads, -1), None
    # exact fallback: SDPA with a block mask built from the same boundaries
    mask = segment_mask(cu_seq_lens_q, batch, seq, causal=causal, window=window)
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in autocast's half dtype when autocast is on and one of them is fp32, as SDPA would get them.

    SDPA is on autocast's lower-precision list, the kernel op is not. Rotary embeddings multiply bf16 projections
    by fp32 ``cos``/``sin`` (Llama, Qwen2, Mistral under ``bf16-mixed``), which promotes the query and key to fp32:
    without this cast the packed batch would take the (exact, slower) fp32 fallback instead of the kernel.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device) or all(t.dtype != torch.float32 for t in tensors):
        return tensors
    half = torch.get_autocast_dtype(device)
    if half not in (torch.bfloat16, torch.float16):
        return tensors
    return tuple(t.to(half) for t in tensors)


def _varlen_mask(**kwargs: Any) -> Any:
    """The ``AttentionMaskInterface`` entry: no mask for packed rows, transformers' SDPA mask for padded batches.

    Packed batches come without a 2-D padding mask (their boundaries are in the batch); the attention function
    then applies causality and windows itself. Padded batches get transformers' SDPA mask. A bidirectional one is
    built without transformers' check for a batch with no padding (``padding_mask.all()``): reading the mask's values
    on the host makes the host wait for the GPU once per forward pass, which cost 10% of an eager BERT-base step
    (``docs/padding.md``). A batch whose mask is all ones then attends through that mask: the same result, with
    SDPA's masked kernel instead of its maskless one. Causal masks keep the check: without padding, it lets SDPA run
    its causal kernel, which skips the masked half of the scores.
    """
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**{**kwargs, "allow_is_bidirectional_skip": False})


def register_varlen_attention() -> str:
    """Register ``"txopt_varlen"`` with transformers' attention and mask interfaces (idempotent); return the name.

    Example:
        >>> from transformers import AttentionInterface
        >>> register_varlen_attention() in AttentionInterface()
        True
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attn_dropout")


def attention_dropout(model: nn.Module) -> float:
    """The largest attention-dropout probability in the model's config (0.0 when it has none).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> attention_dropout(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=8, vocab_size=10, attention_probs_dropout_prob=0.1)))
        0.1
    """
    config = getattr(model, "config", None)
    values = [getattr(config, key, 0.0) for key in _DROPOUT_KEYS]
    return max((float(v) for v in values if isinstance(v, int | float)), default=0.0)


def use_varlen_attention(model: nn.Module) -> nn.Module:
    """Switch a Hugging Face model to the ``"txopt_varlen"`` attention backend (in place; returns the model).

    Padded batches keep running SDPA unchanged; packed batches (with ``cu_seq_lens_q``) run the varlen kernel on
    CUDA in bf16/fp16 and an exact block-masked SDPA elsewhere. Warns when the model has attention dropout, which the
    kernel does not apply.

    Raises:
        ValueError: If ``model`` is not a Hugging Face model whose attention implementation can be set.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> model = use_varlen_attention(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8, vocab_size=10, attention_probs_dropout_prob=0.0)))
        >>> model.config._attn_implementation
        'txopt_varlen'
    """
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face PreTrainedModel (no set_attn_implementation): the varlen "
            "backend plugs into transformers' attention interface. Pack its batches with block masks instead."
        )
    name = register_varlen_attention()
    try:
        setter(name)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"{type(model).__name__} cannot use a custom attention implementation ({err}): its attention does not "
            "dispatch through transformers' AttentionInterface. Use attn_implementation='sdpa'."
        ) from err
    p = attention_dropout(model)
    if p > 0:
        rank_zero_warn(
            f"use_varlen_attention: {type(model).__name__} has attention dropout {p}; the varlen kernel applies none, "
            "so packed batches on the GPU train without attention dropout (hidden-state dropout still applies). Set "
            "the attention dropout to 0 to make every path the same, or train with strategy='bucket'."
        )
    return model

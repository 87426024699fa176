"""Packed batches on the model side: inputs for the model's attention, per-sample pooling, and the support probe.

A packed batch (:mod:`lightning_txopt.data.packing`) describes its samples' boundaries and carries no mask. What a
Hugging Face model needs from that description depends on its attention implementation:

* ``"txopt_varlen"`` (:func:`~lightning_txopt.models.attention.use_varlen_attention`): the rows as they are, with
  the boundaries (over the row-major tokens) as ``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/
  ``max_length_k``; no mask (the kernel flattens the rows; the exact fallback masks each row's block);
* FlashAttention (``"flash_attention_2"``/``"_3"``/``"_4"``): the same, the rows read as one row of
  ``rows * width`` tokens;
* ``"sdpa"`` and ``"eager"``: the rows as they are, with an exact block-diagonal mask built from the same boundaries
  (boolean for SDPA, additive for eager, causal for decoders). Models with sliding-window or local attention need
  one mask per layer type there, so they are refused on these two (use the varlen backend).

Positions restart at 0 in the batch; models whose positions start after the padding index (RoBERTa and its
descendants: ``padding_idx + 1``) get that offset added here (:func:`position_offset`).

:func:`check_packing_support` runs the model on short random samples longer than any of its attention windows,
packed and one by one, and returns a :class:`PackingSupport` (how to pool each sample for classification) or raises
with the reason and the alternative. Nothing else decides whether a model may be packed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.models.attention import VARLEN_ATTENTION, segment_ids, segment_mask

__all__ = [
    "PackingSupport",
    "attention_window",
    "check_packing_support",
    "is_causal_model",
    "packed_classification_logits",
    "packed_model_inputs",
    "pool_packed",
    "position_offset",
    "tiny_model",
]

Pooling = Literal["first", "last", "mean"]
_POOLINGS: tuple[Pooling, ...] = ("first", "last", "mean")
_VARLEN_STYLE = (VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3", "flash_attention_4")


def tiny_model(model_type: str, **config: Any) -> nn.Module:
    """A freshly initialised two-layer Hugging Face classifier of ``model_type`` (hidden size 16), for examples.

    ``config`` overrides the small defaults (e.g. ``sliding_window=8``); the model runs SDPA attention.

    Example:
        >>> type(tiny_model("llama")).__name__
        'LlamaForSequenceClassification'
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    small: dict[str, Any] = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    small.update(config)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(model_type, **small), attn_implementation="sdpa"
    )


def _config(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _attn_implementation(model: nn.Module) -> str:
    config = _config(model)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def attention_window(model: nn.Module) -> int | None:
    """The widest sliding or local attention window of the model's config, or ``None`` (full attention only).

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> attention_window(tiny("mistral", sliding_window=8, num_key_value_heads=1)), attention_window(tiny("bert"))
        (8, None)
    """
    config = _config(model)
    if config is None:
        return None
    windows: list[int] = []
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    if (
        isinstance(sliding, int)
        and sliding > 0
        and (getattr(config, "use_sliding_window", True) or "sliding_attention" in layer_types)
    ):
        windows.append(sliding)
    local = getattr(config, "local_attention", None)
    if isinstance(local, int) and local > 0:
        windows.append(local)
    return max(windows) if windows else None


def is_causal_model(model: nn.Module) -> bool:
    """Whether the model's self-attention is causal (a decoder): its attention modules say ``is_causal``.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> is_causal_model(tiny("llama")), is_causal_model(tiny("bert"))
        (True, False)
    """
    flags = [bool(m.is_causal) for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    return bool(getattr(_config(model), "is_decoder", False))


def position_offset(model: nn.Module) -> int:
    """What to add to packed ``position_ids`` (which restart at 0) for this model.

    ``padding_idx + 1`` for RoBERTa-style embeddings, whose positions start after the padding index; 0 otherwise.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> position_offset(tiny("roberta", pad_token_id=1)), position_offset(tiny("bert"))
        (2, 0)
    """
    for module in model.modules():
        if callable(getattr(module, "create_position_ids_from_input_ids", None)):
            padding_idx = getattr(module, "padding_idx", None)
            if isinstance(padding_idx, int):
                return padding_idx + 1
    return 0


def packed_model_inputs(model: nn.Module, batch: Mapping[str, Any], *, offset: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``model`` (or its base model) that run a packed ``batch`` exactly.

    ``offset`` is the model's :func:`position_offset` when the caller knows it already (it is looked up otherwise).

    Raises:
        ValueError: For an attention implementation that cannot take packed rows (e.g. a sliding-window model on
            ``"sdpa"``/``"eager"``, or ``"flex_attention"``), naming the alternative.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> batch = PackingCollator(8)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
        >>> sdpa = packed_model_inputs(tiny("bert"), batch)
        >>> tuple(sdpa["attention_mask"].shape), sdpa["attention_mask"][0, 0, 0].tolist()
        ((1, 1, 5, 5), [True, True, True, False, False])
        >>> from lightning_txopt.models import use_varlen_attention
        >>> varlen = packed_model_inputs(use_varlen_attention(tiny("bert")), batch)
        >>> "attention_mask" in varlen, varlen["cu_seq_lens_q"].tolist()
        (False, [0, 3, 5, 5])
    """
    impl = _attn_implementation(model)
    ids = batch["input_ids"]
    offset = position_offset(model) if offset is None else offset
    positions = batch["position_ids"] + offset if offset else batch["position_ids"]
    extra = {k: batch[k] for k in ("token_type_ids",) if k in batch}
    if impl in _VARLEN_STYLE:
        # the boundaries index the row-major tokens, so the rows can stay rows: the kernel flattens them itself, and
        # the exact fallback (CPU, fp32) then masks (rows, W, W) blocks, not one (rows * W)^2 square. Transformers'
        # own flash_attention_* implementations read packed boundaries from a single sequence: flattened for them.
        shape = ids.shape if impl == VARLEN_ATTENTION else (1, -1)
        flat = {k: v.reshape(shape) for k, v in extra.items()}
        return {
            "input_ids": ids.reshape(shape),
            "position_ids": positions.reshape(shape),
            "cu_seq_lens_q": batch["cu_seq_lens_q"],
            "cu_seq_lens_k": batch["cu_seq_lens_k"],
            "max_length_q": int(batch["max_length_q"]),
            "max_length_k": int(batch["max_length_k"]),
            **flat,
        }
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}, which cannot take packed rows. Use "
            "attn_implementation='auto' (the varlen backend) or 'sdpa', or strategy='bucket'."
        )
    window = attention_window(model)
    if window is not None:
        raise ValueError(
            f"{type(model).__name__} has sliding-window or local attention (window {window}): with "
            f"attn_implementation={impl!r} packed rows would need one mask per layer type. Use "
            "attn_implementation='auto' (the varlen backend applies each layer's window), or strategy='bucket'."
        )
    rows, width = ids.shape
    mask = segment_mask(batch["cu_seq_lens_q"], rows, width, causal=is_causal_model(model))
    if impl == "eager":  # eager attention adds its mask to the scores: 0 where allowed, a large negative elsewhere
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask, **extra}


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with a base model and a task head.")
    return base


def pool_packed(hidden: torch.Tensor, batch: Mapping[str, Any], pooling: Pooling) -> torch.Tensor:
    """One vector per sample of the packed ``hidden`` states ``(rows, width, dim)``: first, last or mean token.

    No host-device synchronisation; static-shape slots give finite filler vectors.

    Example:
        >>> batch = PackingCollator(8)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
        >>> hidden = torch.arange(5.0).view(1, 5, 1)
        >>> [pool_packed(hidden, batch, p).flatten().tolist() for p in ("first", "last", "mean")]
        [[0.0, 3.0], [2.0, 4.0], [1.0, 3.5]]
    """
    rows, width, dim = hidden.shape
    first = batch["cls_index"].to(hidden.device)
    if pooling == "first":
        return hidden[first[:, 0], first[:, 1]]
    if pooling == "last":
        last = batch["last_index"].to(hidden.device)
        return hidden[last[:, 0], last[:, 1]]
    cu = batch["cu_seq_lens_q"].to(hidden.device)
    segments = cu.numel() - 1
    seg = segment_ids(cu, rows * width)
    sums = torch.zeros(segments, dim, device=hidden.device, dtype=hidden.dtype)
    sums.index_add_(0, seg, hidden.reshape(rows * width, dim))
    counts = (cu[1:] - cu[:-1]).clamp_min(1).to(hidden.dtype)
    own = torch.arange(first.shape[0], device=hidden.device) + first[:, 0]  # sample i is segment i + its row
    return sums[own] / counts[own, None]


class _PooledBase:
    """Stands in for a base model's ``forward``: returns given per-sample states as a one-token sequence."""

    def __init__(self, base: nn.Module, states: torch.Tensor, output_type: type) -> None:
        self.base = base
        self.states = states
        self.output_type = output_type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fields: dict[str, Any] = {"last_hidden_state": self.states}
        pooler = getattr(self.base, "pooler", None)
        if "pooler_output" in getattr(self.output_type, "__dataclass_fields__", {}):
            fields["pooler_output"] = pooler(self.states) if isinstance(pooler, nn.Module) else None
        return self.output_type(**fields)


def _head_logits(model: nn.Module, pooled: torch.Tensor, output_type: type) -> torch.Tensor:
    """Run the model's own task head on one vector per sample (the base model's forward stood in for)."""
    base = _base_model(model)
    states = pooled[:, None, :]
    ones = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    config = _config(model)
    pad = getattr(config, "pad_token_id", None)
    # decoder heads read the ids only to find each row's last non-padding token: give one token that is not padding
    # (a model without a pad token gets -1 for the call, which no id equals: every packed sample is one row here)
    token = (pad + 1) % max(int(getattr(config, "vocab_size", 2) or 2), 2) if isinstance(pad, int) else 0
    base.forward = _PooledBase(base, states, output_type)
    if pad is None and config is not None:
        config.pad_token_id = -1
    try:
        return model(input_ids=torch.full_like(ones, token), attention_mask=ones).logits
    finally:
        del base.forward
        if pad is None and config is not None:
            config.pad_token_id = None


def packed_classification_logits(
    model: nn.Module, batch: Mapping[str, Any], pooling: Pooling, *, base: Any = None, offset: int | None = None
) -> tuple[torch.Tensor, Any]:
    """Sequence-classification logits ``(samples, classes)`` of a packed batch, and the base model's output.

    The base model runs once over the packed rows; each sample is pooled (``pooling``: what the model's own head
    reads, as :func:`check_packing_support` found) and the model's own head (pooler, dropout, pre-classifier,
    classifier) runs on the pooled vectors. ``base`` runs the base model instead of calling it (e.g. its
    ``torch.compile`` wrapper); ``offset`` as in :func:`packed_model_inputs`.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> model = tiny("distilbert", dim=16, n_heads=2, hidden_dim=32).eval()
        >>> batch = PackingCollator(16)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
        >>> logits, _ = packed_classification_logits(model, batch, "first")
        >>> alone = model(input_ids=torch.tensor([[8, 9]])).logits
        >>> tuple(logits.shape), torch.allclose(logits[1], alone[0], atol=1e-6)
        ((2, 3), True)
    """
    run = base if base is not None else _base_model(model)
    output = run(**packed_model_inputs(model, batch, offset=offset))
    rows, width = batch["input_ids"].shape
    hidden = output.last_hidden_state.reshape(rows, width, -1)
    return _head_logits(model, pool_packed(hidden, batch, pooling), type(output)), output


@dataclasses.dataclass(frozen=True)
class PackingSupport:
    """How a model takes packed batches, as :func:`check_packing_support` established it.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> check_packing_support(tiny("roberta", pad_token_id=1), task="sequence-classification")
        PackingSupport(model='RobertaForSequenceClassification', attn_implementation='sdpa', position_offset=2, \
pooling='first', window=None)

    Attributes:
        model: The model's class name.
        attn_implementation: The attention implementation checked.
        position_offset: Added to packed positions (RoBERTa-style models).
        pooling: What the classification head pools (``None`` for other tasks).
        window: The widest attention window the probe covered (``None``: full attention).
    """

    model: str
    attn_implementation: str
    position_offset: int
    pooling: Pooling | None
    window: int | None


def _probe_lengths(model: nn.Module) -> list[int]:
    config = _config(model)
    window = attention_window(model) or 0
    limit = None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limit = value - position_offset(model)
            break
    longest = max(2 * window + 5, 12)
    if limit is not None:
        longest = min(longest, limit)
    return [longest, max(longest // 2 + 1, 3), 3]


def check_packing_support(
    model: nn.Module,
    *,
    task: Literal["sequence-classification", "causal-lm", "base"] = "base",
    tolerance: float = 1e-4,
) -> PackingSupport:
    """Check that ``model`` gives each packed sample the result it gives that sample alone, or raise.

    Three random samples, the longest longer than twice any attention window of the model, are run packed in one
    row and one by one (eval mode, no gradient, autocast off: the model's current device and parameter dtype);
    compared are the base model's hidden states, and the task's logits (classification: the pooling that reproduces
    the model's own head is searched among first/last/mean token; causal LM: every token's logits). It runs in
    fp32 whatever the surrounding precision (``bf16-mixed`` keeps fp32 weights), so a mask leaking by 1e-3 shows;
    a model whose parameters are bf16 or fp16 can only be compared at that precision's tolerance (3e-2, 5e-3).

    Args:
        model: A Hugging Face model.
        task: What to compare beyond the hidden states.
        tolerance: Largest allowed difference relative to the largest magnitude, for fp32 parameters (bf16 and
            fp16 parameters: at least 3e-2 and 5e-3).

    Returns:
        A :class:`PackingSupport`.

    Raises:
        ValueError: Naming the model, the reason and the alternative, if the model is an encoder-decoder, rejects
            packed inputs, or mixes the samples.

    Example:
        >>> from lightning_txopt.models.packing import tiny_model as tiny
        >>> from lightning_txopt.models import use_varlen_attention
        >>> mistral = tiny("mistral", sliding_window=8, num_key_value_heads=1)
        >>> check_packing_support(use_varlen_attention(mistral), task="sequence-classification").window
        8
        >>> sdpa = tiny("mistral", sliding_window=8, num_key_value_heads=1)
        >>> check_packing_support(sdpa, task="sequence-classification")
        Traceback (most recent call last):
        ...
        ValueError: MistralForSequenceClassification has sliding-window or local attention (window 8): ...
    """
    name = type(model).__name__
    config = _config(model)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model: packing concatenates samples in one sequence, which its decoder "
            "inputs and relative attention cannot follow. Use strategy='bucket' for it."
        )
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    first = next(model.parameters())
    device = first.device
    tolerance = max(tolerance, _HALF_TOLERANCE.get(first.dtype, 0.0))
    gen = torch.Generator().manual_seed(0)
    pad = getattr(config, "pad_token_id", None)
    low = 3 if vocab > 4 else 0
    samples = []
    for n in _probe_lengths(model):
        ids = torch.randint(low, vocab, (n,), generator=gen)
        if pad is not None:
            ids[ids == pad] = (pad + 1) % vocab
        samples.append({"input_ids": ids})
    batch = PackingCollator(None)(samples)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    offset = position_offset(model)
    was_training = model.training
    model.eval()
    pooling: Pooling | None = None
    # TF32 matmuls (float32_matmul_precision "high", Lightning's advice on Ampere+) differ by ~5e-3 from fp32: compare
    # in full fp32, so that the tolerance can stay tight enough to catch a mask that leaks by that much
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        # the first packed training batch calls this inside the precision plugin's autocast: leave it
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            base = model if task == "causal-lm" else getattr(model, "base_model", model)
            alone = [s["input_ids"][None].to(device) for s in samples]
            if task == "causal-lm":
                packed = model(**packed_model_inputs(model, batch)).logits.reshape(-1, vocab)
                single = torch.cat([model(input_ids=a).logits[0] for a in alone])
            else:
                hidden = base(**packed_model_inputs(model, batch)).last_hidden_state
                packed = hidden.reshape(-1, hidden.shape[-1])
                single = torch.cat([base(input_ids=a).last_hidden_state[0] for a in alone])
            _compare(name, "hidden states" if task != "causal-lm" else "logits", packed, single, tolerance)
            if task == "sequence-classification":
                reference = torch.cat([model(input_ids=a).logits for a in alone])
                errors = {}
                for candidate in _POOLINGS:
                    logits, _ = packed_classification_logits(model, batch, candidate)
                    errors[candidate] = _relative_error(logits, reference)
                    if errors[candidate] <= tolerance:
                        pooling = candidate
                        break
                if pooling is None:
                    raise ValueError(
                        f"{name}'s classification head reads something other than one token or the mean of its "
                        f"sample (packed-vs-alone relative errors: "
                        + ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
                        + "). Use strategy='bucket' for this model."
                    )
    except (TypeError, RuntimeError, IndexError, AttributeError, KeyError) as err:
        raise ValueError(
            f"{name} cannot take packed input ({type(err).__name__}: {err}). Use strategy='bucket' for this model."
        ) from err
    finally:
        model.train(was_training)
        torch.set_float32_matmul_precision(matmul_precision)
    return PackingSupport(name, _attn_implementation(model), offset, pooling, attention_window(model))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


_HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _compare(name: str, what: str, packed: torch.Tensor, single: torch.Tensor, tolerance: float) -> None:
    error = _relative_error(packed, single)
    if not error <= tolerance:
        raise ValueError(
            f"{name} mixes packed samples: its {what} differ from each sample run alone by {error:.3g} (relative). "
            "It ignores position_ids or the segment boundaries. Use strategy='bucket' for this model."
        )

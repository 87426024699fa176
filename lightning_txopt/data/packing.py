"""Padding-free packing: samples concatenated into rows, kept apart by position ids and block-diagonal masks.

The planner (:func:`best_fit_decreasing`, used by :func:`~lightning_txopt.data.planning.plan_epoch` with
``pack_length``) fills rows of ``pack_length`` tokens; a batch is ``max_tokens // pack_length`` rows.
:class:`PackingCollator` turns the samples of a batch back into those rows:

* ``input_ids`` ``(rows, width)``: the samples of each row concatenated (``width`` = the longest row, so a row ends
  with at most a few pad tokens);
* ``position_ids``: restart at 0 for every sample, so absolute-position models see each sample as if alone;
* ``attention_mask`` ``(rows, 1, width, width)`` boolean: block-diagonal (and causal with ``causal=True``), so no token
  attends across a sample boundary (SDPA and eager attention take such 4-D masks);
* ``cu_seq_lens`` (int32) and ``max_length``: sample boundaries over the concatenated real tokens, the format of
  FlashAttention's varlen kernels, and what throughput counters read;
* labels: per sample (sequence classification, with ``cls_index``/``last_index`` giving each sample's first and last
  position) or per token (causal LM: each sample's first token gets ``label_pad_token_id``, so no token learns to
  predict the next sample).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_txopt.data.collator import _as_1d

__all__ = [
    "PackingCollator",
    "best_fit_decreasing",
    "check_packing_support",
    "next_fit_rows",
    "packed_classification_logits",
]


def best_fit_decreasing(
    lengths: np.ndarray, ids: np.ndarray, capacity: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``ids`` into rows of at most ``capacity`` tokens, best fit, longest first.

    Each sample goes to the open row with the least room that still fits it, or opens a new row. Equal lengths are
    taken in random order (``rng``) so rows differ between epochs.

    Returns:
        ``(order, row_offsets)``: sample ids row by row (rows in creation order, each row longest first) and the
        ``rows + 1`` boundaries. Because a row is opened only when its first (longest) sample fits no earlier row,
        :func:`next_fit_rows` over ``order`` recovers exactly these rows.

    Example:
        >>> order, offsets = best_fit_decreasing(np.array([6, 5, 4, 3, 2]), np.arange(5), 10)
        >>> [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        [[0, 2], [1, 3, 4]]
    """
    from lightning_txopt.data.planning import _sorted_with_random_ties

    if ids.size == 0:
        return ids.astype(np.int64), np.zeros(1, dtype=np.int64)
    if lengths[ids].max() > capacity:
        raise ValueError(f"A sample of {int(lengths[ids].max())} tokens does not fit rows of {capacity}.")
    order = _sorted_with_random_ties(lengths, ids, rng)[::-1]
    rows: list[list[int]] = []
    remaining: list[int] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # open rows by remaining room
    has_room = np.zeros(capacity + 1, dtype=bool)
    for sid, size in zip(order.tolist(), lengths[order].tolist()):
        free = has_room[size:]
        if free.any():
            room = size + int(np.argmax(free))
            row = by_room[room].pop()
            if not by_room[room]:
                has_room[room] = False
        else:
            row, room = len(rows), capacity
            rows.append([])
            remaining.append(capacity)
        rows[row].append(sid)
        left = room - size
        remaining[row] = left
        if left > 0:
            by_room[left].append(row)
            has_room[left] = True
    flat = np.fromiter((s for r in rows for s in r), dtype=np.int64, count=order.size)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return flat, offsets


def next_fit_rows(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[int]:
    """Row index of each item when items are laid into rows of ``capacity`` in order, a new row when one is full.

    Example:
        >>> next_fit_rows([6, 4, 5, 3, 2], 10)
        [0, 0, 1, 1, 1]
    """
    rows, used, row = [], 0, 0
    for n in lengths:
        n = int(n)
        if used and used + n > capacity:
            row, used = row + 1, 0
        rows.append(row)
        used += n
    return rows


class PackingCollator:
    """Collate the samples of a packed batch into rows without padding between samples.

    Args:
        pack_length: Row capacity in tokens (the planner's ``pack_length``); a longer sample gets a row of its own.
            ``None`` puts the whole batch in one row.
        pad_token_id: Fills the end of rows shorter than the longest row of the batch.
        causal: Causal (decoder) masks, and each sample's first token label ignored (no cross-sample prediction).
        label_pad_token_id: Ignored label value.
        input_key: Key of the token ids.

    Raises:
        ValueError: On invalid arguments, a sample without tokens, or label formats that cannot be packed.

    Example:
        >>> collate = PackingCollator()  # one row per batch
        >>> batch = collate([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8, 9], "labels": 0}])
        >>> batch["input_ids"].tolist(), batch["position_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [1, 0])
        >>> batch["attention_mask"][0, 0].int().tolist()[3]
        [0, 0, 0, 1, 1]
    """

    def __init__(
        self,
        pack_length: int | None = None,
        *,
        pad_token_id: int = 0,
        causal: bool = False,
        label_pad_token_id: int = -100,
        input_key: str = "input_ids",
    ) -> None:
        if pack_length is not None and (
            isinstance(pack_length, bool) or not isinstance(pack_length, int) or pack_length < 1
        ):
            raise ValueError(f"`pack_length` must be a positive integer or None, got {pack_length!r}.")
        self.pack_length = pack_length
        self.pad_token_id = pad_token_id
        self.causal = causal
        self.label_pad_token_id = label_pad_token_id
        self.input_key = input_key

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Pack ``samples`` (in the planner's order) into rows."""
        if not samples:
            raise ValueError("Cannot collate an empty list of samples.")
        key = self.input_key
        ids = [_as_1d(s[key], key, i) for i, s in enumerate(samples)]
        lens = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
        if (lens == 0).any():
            raise ValueError(f"Sample {int(np.argmin(lens))} has no tokens; remove empty samples before packing.")
        capacity = self.pack_length if self.pack_length is not None else int(lens.sum())
        row_of = np.asarray(next_fit_rows(lens, capacity))
        n_rows = int(row_of[-1]) + 1
        starts = np.zeros(len(ids), dtype=np.int64)
        row_len = np.zeros(n_rows, dtype=np.int64)
        for i, (r, n) in enumerate(zip(row_of.tolist(), lens.tolist())):
            starts[i] = row_len[r]
            row_len[r] += n
        width = int(row_len.max())
        input_ids = np.full((n_rows, width), self.pad_token_id, dtype=np.int64)
        position_ids = np.zeros((n_rows, width), dtype=np.int64)
        segment = np.full((n_rows, width), -1, dtype=np.int64)
        for i, (r, s, n) in enumerate(zip(row_of.tolist(), starts.tolist(), lens.tolist())):
            input_ids[r, s : s + n] = ids[i]
            position_ids[r, s : s + n] = np.arange(n)
            segment[r, s : s + n] = i
        seg = torch.from_numpy(segment)
        mask = seg[:, :, None] == seg[:, None, :]
        pads = seg < 0
        mask &= ~(pads[:, :, None] | pads[:, None, :])
        mask |= torch.eye(width, dtype=torch.bool)[None]  # pad queries attend to themselves only (no NaN rows)
        if self.causal:
            mask &= torch.tril(torch.ones(width, width, dtype=torch.bool))[None]
        cu = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        out: dict[str, torch.Tensor] = {
            key: torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "attention_mask": mask[:, None],
            "cu_seq_lens": torch.from_numpy(cu),
            "max_length": torch.tensor(int(lens.max())),
            "cls_index": torch.from_numpy(np.stack([row_of, starts], 1)),
            "last_index": torch.from_numpy(np.stack([row_of, starts + lens - 1], 1)),
        }
        first = samples[0]
        if "labels" in first or "label" in first:
            name = "labels" if "labels" in first else "label"
            values = [s[name] for s in samples]
            arrays = [np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for v in values]
            if all(a.ndim == 0 for a in arrays):
                out["labels"] = torch.as_tensor(np.stack(arrays))
            elif all(a.ndim == 1 and a.size == n for a, n in zip(arrays, lens.tolist())):
                labels = np.full((n_rows, width), self.label_pad_token_id, dtype=np.int64)
                for i, (r, s, n) in enumerate(zip(row_of.tolist(), starts.tolist(), lens.tolist())):
                    labels[r, s : s + n] = arrays[i]
                    if self.causal:
                        labels[r, s] = self.label_pad_token_id  # nothing predicts a sample's first token
                out["labels"] = torch.from_numpy(labels)
            else:
                raise ValueError("Cannot pack labels: give one scalar label per sample or one label per token.")
        for name in first:
            if name in (key, "labels", "label", "attention_mask", "position_ids"):
                continue  # rebuilt above
            values = [s[name] for s in samples]
            if isinstance(values[0], str | bytes) or values[0] is None:
                raise TypeError(f"Cannot collate key {name!r}: it holds {type(values[0]).__name__} values.")
            arrays = [np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for v in values]
            if all(a.ndim == 0 for a in arrays):  # per-sample numbers (ids, weights): one entry per sample
                out[name] = torch.as_tensor(np.stack(arrays))
            elif all(a.ndim == 1 and a.size == n for a, n in zip(arrays, lens.tolist())):  # per-token features
                packed = np.zeros((n_rows, width), dtype=arrays[0].dtype)
                for i, (r, s, n) in enumerate(zip(row_of.tolist(), starts.tolist(), lens.tolist())):
                    packed[r, s : s + n] = arrays[i]
                out[name] = torch.from_numpy(packed)
            else:
                raise ValueError(f"Cannot pack key {name!r}: neither one number per sample nor one per token.")
        return out


def _base_and_head(model: nn.Module) -> tuple[nn.Module, str]:
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with a base model and a head.")
    if hasattr(model, "classifier"):
        return base, "first"
    if hasattr(model, "score"):
        return base, "last"
    raise ValueError(
        f"Cannot pool packed samples for {type(model).__name__}: expected a `classifier` head (BERT-style, pooled "
        "first token) or a `score` head (decoder-style, last token). Use strategy='bucket' for this model."
    )


def packed_classification_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sequence-classification logits of packed samples: each sample pooled at its own first or last token.

    BERT-style models (a ``classifier`` head, and a ``pooler`` in the base model when it has one) pool each sample's
    first token; decoder-style models (a ``score`` head, e.g. GPT-2, Llama) its last token.

    Raises:
        ValueError: For models with another head layout.
    """
    base, where = _base_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "token_type_ids") if k in batch}
    hidden = base(**inputs).last_hidden_state
    index = batch["cls_index"] if where == "first" else batch["last_index"]
    states = hidden[index[:, 0], index[:, 1]]  # (samples, hidden)
    if where == "last":
        return model.score(states)  # type: ignore[operator]
    pooler: Any = getattr(base, "pooler", None)
    pooled = pooler(states[:, None]) if pooler is not None else states[:, None]
    head: Any = model.classifier
    dropout: Any = getattr(model, "dropout", None)
    if pooler is not None:  # BertForSequenceClassification: dropout + linear on the pooled vector
        return head(dropout(pooled) if dropout is not None else pooled)
    return head(pooled)  # RoBERTa-style heads take (batch, seq, hidden) and read position 0


def check_packing_support(model: nn.Module, *, causal: bool, vocab_size: int | None = None) -> None:
    """Check on two short random samples that ``model`` keeps packed samples apart.

    Runs the base model once on the two samples packed in one row and once on each alone (eval mode, no grad) and
    compares the hidden states.

    Raises:
        ValueError: If the model rejects the packed inputs (e.g. no ``position_ids`` or no 4-D masks) or mixes the
            samples (e.g. absolute positions that ignore ``position_ids``): use strategy='bucket' for it.
    """
    base = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    vocab = vocab_size or getattr(config, "vocab_size", None)
    if vocab is None:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        vocab = embeddings[0].num_embeddings if embeddings else 2
    vocab = int(vocab)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(1, vocab, (n,), generator=gen)} for n in (5, 3)]
    batch = PackingCollator(16, causal=causal)(samples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = base(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
            ).last_hidden_state[0]
            alone = torch.cat([base(input_ids=s["input_ids"][None].to(device)).last_hidden_state[0] for s in samples])
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{type(model).__name__} cannot take packed input ({type(err).__name__}: {err}). "
            "Use strategy='bucket' for this model."
        ) from err
    finally:
        model.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"{type(model).__name__} mixes packed samples (max difference "
            f"{float((packed.float() - alone.float()).abs().max()):.3g}): it ignores position_ids or the 4-D mask. "
            "Use strategy='bucket' for this model."
        )

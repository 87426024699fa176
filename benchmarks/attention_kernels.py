"""Packed attention on the GPU: flex attention with a document mask vs FlashAttention's varlen kernel, fwd + bwd.

    python attention_kernels.py                       # H200: bert and llama shapes, 16,384 and 65,536 tokens
    python attention_kernels.py --tokens 16384 --shape bert --data corpus   # one table
    python attention_kernels.py --quick               # CPU smoke run: correctness only, no timing claims

One question: for a *packed* batch (one flat sequence of ``T`` tokens holding many short samples, each attending only
within itself, the rest of ``T`` one padding segment of its own as in the library's packed layout), is
``torch.nn.attention.flex_attention.flex_attention`` under ``torch.compile`` with a document-mask ``BlockMask``
faster, forward + backward of the attention op alone, than the varlen kernel the library runs today?

Samples are drawn, seeded, from a shuffled stream of lengths (``--data``: ``corpus``, the embedded corpus's
BERT-uncased lengths, median 27, max 512; ``lognormal``, the second distribution of ``workloads.py``, median 23) into
the sequence until the next one would not fit. ``--batches`` distinct batches per table; queries, keys and values
bf16 ``(T, heads, 64)`` with ``requires_grad`` (flex gets them as ``(1, heads, T, 64)`` views, as a model's
projections give them), a random gradient of the output. Shapes (``--shape``): ``bert`` 12 heads x 64,
bidirectional; ``llama`` 16 heads x 64, causal. The cases:

* ``varlen``: ``lightning_txopt.models.attention.varlen_attention_forward``, the library's packed attention (on a
  CUDA device, bf16: FlashAttention's varlen kernel through ``aten::_flash_attention_forward``, or ``varlen_attn``
  where that op's schema differs), max length 512 (the row width the static-shape path passes);
* ``varlen_tight``: the same with max length = the batch's longest segment;
* ``flex``: ``torch.compile(flex_attention, dynamic=False)`` with a ``BlockMask`` (blocks of 128) from
  ``torch.compile(create_block_mask)`` over ``mask_mod`` "same document" (and ``q_idx >= kv_idx`` when causal),
  built before the timed region;
* ``flex_with_mask``: the same, building the ``BlockMask`` inside the timed region (what a per-batch data path pays);
* ``flex_k64``: ``flex`` with ``kernel_options`` tiles of 64 x 64 (forward and backward; torch's defaults on Hopper
  are 128 x 128 forward, 64 x 128 and 128 x 64 backward) on the same 128-block mask;
* ``flex_mask64`` (only with ``--cases``): a 64-block ``BlockMask`` with those tiles. torch 2.11-2.13 choose the
  backward's tiles from configs that must divide the mask's block size (Hopper: 64 x 128 and 128 x 64), so this is
  expected to fail to compile; the error is recorded.
* ``flex_direct`` / ``flex_direct_k64`` (only with ``--cases``): ``flex`` / ``flex_k64`` with the ``BlockMask``
  built inside the timed region *without* evaluating ``mask_mod`` over ``T x T``: :func:`document_block_mask` derives
  each query block's key blocks, partial and full, from the segment boundaries with a few vectorised tensor ops and
  passes them to ``BlockMask.from_kv_blocks``;
* ``varlen_static`` (only with ``--cases``): ``varlen`` with the static-shape layout's segment count: the padding
  as runs of at most 512 tokens (one per row of 512) and empty segments up to ``slots + rows`` segments, ``slots`` the
  most samples of the table's batches plus 10%, rounded up to 8 (the DataModule's own count is of that order: 464 at
  16,384 tokens on the corpus). Every segment is a block row of FlashAttention's grid, empty or not: this case
  measures what the empty ones cost;
* ``varlen_split`` (only with ``--cases``): two varlen calls, the samples longer than 128 tokens with max length 512
  and the others (and the padding, in runs of at most 128) with max length 128, so that a short sample occupies one
  query block of the grid instead of four; the tokens are gathered into that order and the output scattered back
  inside the timed region (what a layout that placed long samples first would save, less those copies);
* ``efficient`` / ``efficient_static`` (only with ``--cases``): the library's memory-efficient varlen kernel
  (``_efficient_varlen``, 64-query tiles, what eager and compiled packed batches run) over each batch's segments
  (max length its longest) / over ``varlen_static``'s segments (max length 512), its backward with the library's
  one split of the keys; ``efficient_auto_splits`` / ``efficient_static_auto_splits``: the same with torch's split
  heuristic (8 splits of rows of 512, and their fp32 workspace zeroed on every call);
* ``njt_cudnn`` / ``njt_flash`` (only with ``--cases``, bidirectional only): ``scaled_dot_product_attention`` on
  jagged nested tensors (``torch.nested.nested_tensor_from_jagged`` over the segment offsets, max length 512 given,
  so nothing syncs) under ``sdpa_kernel`` with cuDNN's or FlashAttention's backend: the public route to cuDNN's
  ragged attention.

A case that cannot run (an API this torch lacks, a compile error) is reported with its error, the others go on.
Timing: CUDA events around ``--iters`` passes (cycling over the batches), ``--windows`` windows in ABBA order over the
cases, the median window; every case runs once per batch before (compilation happens there: its first call is
reported apart, with dynamo's frame and graph counts; ``torch.compiler.reset()`` between (shape, tokens), one
``BlockMask`` shape per ``T``, so nothing recompiles per batch, and the script says so if something does).
Compiles: per (shape, tokens) 3 dynamo frames, the mask builder and ``flex_attention`` (in ``flex``'s setup and first
call) and ``flex_attention`` again for ``flex_k64``'s ``kernel_options``; none for the second data set nor per batch.
The default run: 4 (shape, tokens), 12 frames (8 flex forward + backward compilations, 4 mask builders). Measured on
an H200 (2026-12-01): ``--shape bert --data corpus`` (2 tables) took 232 s, 203 s of it the first table, whose first
compiled ``create_block_mask`` alone took 193 s (a cold Inductor cache); the default run did not finish in 250 s.
``--cases varlen varlen_tight flex flex_with_mask`` saves 4 compilations. Results: ``docs/results/issue15_h200.md``.
Correctness: each case's output and ``dq``/``dk``/``dv`` against ``varlen``'s on every batch; a difference above
``--tolerance`` x max |reference| fails the run (after the report is written). ``--quick`` runs on the CPU in fp32:
256 tokens, lengths clipped to 64, flex eager (no compile), everything against an independent reference, SDPA with
a dense block-diagonal (and causal) mask; flex refuses backward on a CPU, so there only its output is compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import RECORDED_LENGTHS, environment, markdown_table, write_outputs
from torch.nn.attention import SDPBackend
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from workloads import LOGNORMAL, lognormal_lengths

from lightning_txopt.models import attention
from lightning_txopt.models.attention import (
    flash_forward_schema_matches,
    segment_ids,
    varlen_attention_forward,
    varlen_kernel_available,
)
from lightning_txopt.utils.checks import round_up

DATA = ("corpus", "lognormal")
SHAPES: dict[str, tuple[int, int, bool]] = {"bert": (12, 64, False), "llama": (16, 64, True)}  # heads, dim, causal
CASES = (
    "varlen",
    "varlen_tight",
    "flex",
    "flex_with_mask",
    "flex_k64",
    "flex_mask64",
    "flex_direct",
    "flex_direct_k64",
    "njt_cudnn",
    "njt_flash",
    "varlen_static",
    "varlen_split",
    "efficient",
    "efficient_static",
    "efficient_auto_splits",
    "efficient_static_auto_splits",
)
DEFAULT_CASES = CASES[:5]
WIDTH = 512  # the packed rows' width: the longest sample, and the max length the static-shape path passes
QUICK = {"tokens": [256], "width": 64, "batches": 2, "iters": 2, "windows": 2}
TOLERANCE = {"gpu": 2e-2, "quick": 1e-4}  # max abs diff / max |reference|: bf16 kernels vs each other; fp32
#: ``flex_k64``'s tiles, 64 x 64 in the forward and in both backward kernels, 4 warps (torch's own choice for Hopper
#: below head dim 64; at 64 it takes 128 x 128 forward, 64 x 128 and 128 x 64 backward, 8 warps); they divide the
#: 128-block mask. Keys with ``fwd_``/``bwd_`` apply to one pass (torch >= 2.8's lowering).
TILES_64 = {
    "fwd_BLOCK_M": 64,
    "fwd_BLOCK_N": 64,
    "bwd_BLOCK_M1": 64,
    "bwd_BLOCK_N1": 64,
    "bwd_BLOCK_M2": 64,
    "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 4,
}
#: Where a flex case's ``BlockMask`` is built: ``create_block_mask`` before the timed region or inside it, or
#: :func:`document_block_mask` from the segment boundaries inside it; the words the report adds for it.
MASK_BUILDS = {
    "before": "",
    "timed": ", mask built in the timed region",
    "boundaries": ", mask built in the timed region from the boundaries (document_block_mask)",
}
#: case -> (BlockMask block size, kernel_options, where its mask is built: a key of MASK_BUILDS)
FLEX: dict[str, tuple[int, dict[str, int] | None, str]] = {
    "flex": (128, None, "before"),
    "flex_with_mask": (128, None, "timed"),
    "flex_k64": (128, TILES_64, "before"),
    "flex_mask64": (64, TILES_64, "before"),
    "flex_direct": (128, None, "boundaries"),
    "flex_direct_k64": (128, TILES_64, "boundaries"),
}

Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def distribution(data: str) -> np.ndarray:
    """The sample lengths of ``data``: the corpus's recorded lengths or ``workloads.py``'s lognormal ones."""
    if data == "corpus":
        return np.load(RECORDED_LENGTHS).astype(np.int64)
    spec = LOGNORMAL
    return lognormal_lengths(
        int(spec["n"]),
        median=float(spec["median"]),
        sigma=float(spec["sigma"]),
        max_length=int(spec["max_length"]),
        seed=int(spec["seed"]),
    )


def packed_lengths(lengths: np.ndarray, tokens: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """The sample lengths of ``count`` packed batches of ``tokens`` tokens: consecutive samples of a seeded shuffled
    stream of ``lengths`` (reshuffled when used up), each batch closed when its next sample would not fit.

    Example:
        >>> [b.tolist() for b in packed_lengths(np.array([3, 4, 5]), 8, 2)]
        [[5, 3], [4]]
    """
    if int(lengths.max()) > tokens:
        raise ValueError(f"A sample of {int(lengths.max())} tokens cannot fit in a batch of {tokens} tokens.")
    rng = np.random.default_rng(seed)
    stream = np.empty(0, dtype=np.int64)
    batches = []
    for _ in range(count):
        ends = np.cumsum(stream)
        while ends.size == 0 or ends[-1] <= tokens:  # not yet a sample that would not fit: draw more
            stream = np.concatenate([stream, lengths[rng.permutation(lengths.size)]])
            ends = np.cumsum(stream)
        n = int(np.searchsorted(ends, tokens, side="right"))
        batches.append(stream[:n].copy())
        stream = stream[n:]
    return batches


def segments(sample_lengths: np.ndarray, tokens: int) -> np.ndarray:
    """The batch's segments: its samples, then the rest of ``tokens`` as one padding segment (none when full).

    Example:
        >>> segments(np.array([4, 3]), 8).tolist(), segments(np.array([4, 4]), 8).tolist()
        ([4, 3, 1], [4, 4])
    """
    pad = tokens - int(sample_lengths.sum())
    return np.concatenate([sample_lengths, [pad]]) if pad else sample_lengths


def abba(names: list[str], windows: int) -> list[str]:
    """The order of the timed windows: the cases, then the cases reversed, and so on.

    Example:
        >>> abba(["a", "b", "c"], 3)
        ['a', 'b', 'c', 'c', 'b', 'a', 'a', 'b', 'c']
    """
    return [n for w in range(windows) for n in (names if w % 2 == 0 else names[::-1])]


def document_mask(doc: torch.Tensor, causal: bool) -> Callable[..., torch.Tensor]:
    """flex attention's ``mask_mod``: query and key in the same segment (and the key not after the query)."""

    def same_document(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = doc[q_idx] == doc[kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    return same_document


def _cu(lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    """int32 boundaries ``[0, l0, l0 + l1, ...]`` of segments of ``lengths``, on ``device``."""
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)


@dataclasses.dataclass
class Batch:
    """One packed batch: its segments' boundaries and each token's segment, on the device."""

    samples: np.ndarray
    segments: np.ndarray
    cu: torch.Tensor
    doc: torch.Tensor
    mask_mod: Callable[..., torch.Tensor]
    causal: bool

    @classmethod
    def build(cls, samples: np.ndarray, tokens: int, causal: bool, device: torch.device) -> Batch:
        seg = segments(samples, tokens)
        cu = _cu(seg, device)
        doc = segment_ids(cu, tokens)
        return cls(samples, seg, cu, doc, document_mask(doc, causal), causal)


@dataclasses.dataclass
class Inputs:
    """Queries, keys and values ``(T, heads, dim)`` (leaves, ``requires_grad``) and the output's gradient."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor

    @classmethod
    def random(cls, tokens: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> Inputs:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(tokens, heads, dim, generator=gen, device=device, dtype=dtype) for _ in range(4))
        return cls(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad)

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """``(T, heads, dim)`` as the ``(1, heads, T, dim)`` view attention functions take."""
    return x.unsqueeze(0).transpose(1, 2)


def fwd_bwd(attn: Attention, i: int, inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """One forward + backward pass on batch ``i``: the output and ``dq``, ``dk``, ``dv``."""
    for t in inputs.leaves():
        t.grad = None
    out = attn(i, *inputs.leaves())
    out.backward(inputs.grad)
    assert inputs.q.grad is not None and inputs.k.grad is not None and inputs.v.grad is not None
    return out, inputs.q.grad, inputs.k.grad, inputs.v.grad


class _Module(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal


def _varlen(module: _Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, width: int) -> Any:
    """The library's packed attention on ``(T, heads, dim)`` tensors over segments ``cu``, max length ``width``, on
    FlashAttention's varlen kernel where it runs (the library runs these calls on the memory-efficient kernel: the
    ``efficient`` cases), else the exact fallback."""
    if varlen_kernel_available(q.device, q.dtype):
        window = (-1, 0) if module.is_causal else (-1, -1)
        return attention._kernel(q, k, v, cu, cu, width, width, scale=None, window=window, memory_efficient=False)
    out, _ = varlen_attention_forward(
        module, heads_first(q), heads_first(k), heads_first(v), None, is_causal=module.is_causal,
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=width, max_length_k=width,
    )  # fmt: skip
    return out[0]  # (1, T, heads, dim) -> (T, heads, dim)


def varlen_case(batches: list[Batch], causal: bool, max_length: int | None) -> Attention:
    """The library's packed attention with ``max_length`` (``None``: each batch's longest segment) as max length."""
    module = _Module(causal)
    longest = [int(b.segments.max()) for b in batches]

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _varlen(module, q, k, v, batches[i].cu, longest[i] if max_length is None else max_length)

    return attn


SPLIT = 128  # varlen_split: samples of at most this many tokens go to the second call (one query block of 128)


def static_segments(samples: np.ndarray, tokens: int, slots: int, width: int) -> np.ndarray:
    """The segments of ``samples`` packed in ``tokens`` as the static layout counts them: the samples, the padding in
    runs of at most ``width`` tokens (one per row), then empty segments up to ``slots + tokens // width`` in all.

    Example:
        >>> static_segments(np.array([300, 212]), 1024, 4, 512).tolist()
        [300, 212, 512, 0, 0, 0]
    """
    pad = tokens - int(samples.sum())
    runs = [width] * (pad // width) + ([pad % width] if pad % width else [])
    out = np.concatenate([samples, np.array(runs, dtype=np.int64)])
    total = slots + tokens // width
    if out.size > total:
        raise ValueError(f"{out.size} segments exceed the static layout's {total} (slots={slots})")
    return np.concatenate([out, np.zeros(total - out.size, dtype=np.int64)])


def varlen_static_case(batches: list[Batch], causal: bool, slots: int, tokens: int, width: int) -> Attention:
    """``varlen`` over the static layout's segments (:func:`static_segments`), max length ``width``."""
    module = _Module(causal)
    cus = [_cu(static_segments(b.samples, tokens, slots, width), b.cu.device) for b in batches]

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _varlen(module, q, k, v, cus[i], width)

    return attn


def efficient_case(
    batches: list[Batch], causal: bool, static: tuple[int, int, int] | None, splits: int | None = 1
) -> Attention:
    """The library's memory-efficient varlen kernel (``_efficient_varlen``) over each batch's segments (max length
    its longest), or with ``static = (slots, tokens, width)`` over the static layout's segments, max length
    ``width``; its backward with ``splits`` splits of the keys (``None``: torch's heuristic)."""
    if static is None:
        cus, widths = [b.cu for b in batches], [int(b.segments.max()) for b in batches]
    else:
        slots, tokens, width = static
        cus = [_cu(static_segments(b.samples, tokens, slots, width), b.cu.device) for b in batches]
        widths = [width] * len(batches)

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        before, attention.EFFICIENT_KEY_SPLITS = attention.EFFICIENT_KEY_SPLITS, splits  # read by the forward call
        try:
            return attention._efficient_varlen(q, k, v, cus[i], cus[i], widths[i], widths[i], scale=None, causal=causal)
        finally:
            attention.EFFICIENT_KEY_SPLITS = before

    return attn


def varlen_split_case(batches: list[Batch], causal: bool, width: int) -> Attention:
    """Two varlen calls: segments longer than ``SPLIT`` (max length ``width``), then the rest (max length ``SPLIT``),
    on the tokens gathered long segments first; the output scattered back to the batch's order."""
    module = _Module(causal)
    plans = []
    for b in batches:
        seg = b.segments.astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(seg)[:-1]])
        long = seg > SPLIT
        pieces = []  # short side: segments of at most SPLIT tokens (a long padding run cut into pieces)
        for start, n in zip(starts[~long], seg[~long], strict=True):
            pieces += [(start + j, min(SPLIT, n - j)) for j in range(0, n, SPLIT)]
        long_segs = [(int(a), int(n)) for a, n in zip(starts[long], seg[long], strict=True) if n > 0]
        order = np.concatenate([np.arange(a, a + n) for a, n in long_segs + pieces])
        device = b.cu.device
        perm = torch.tensor(order, dtype=torch.long, device=device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=device)
        split = int(sum(n for _, n in long_segs))
        plans.append(
            (
                perm,
                inverse,
                split,
                _cu(np.array([n for _, n in long_segs]), device),
                _cu(np.array([n for _, n in pieces]), device),
            )
        )

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        perm, inverse, split, cu_long, cu_short = plans[i]
        qp, kp, vp = (x.index_select(0, perm) for x in (q, k, v))
        parts = []
        if split:
            parts.append(_varlen(module, qp[:split], kp[:split], vp[:split], cu_long, width))
        if split < qp.shape[0]:
            parts.append(_varlen(module, qp[split:], kp[split:], vp[split:], cu_short, SPLIT))
        return torch.cat(parts).index_select(0, inverse)

    return attn


class FlexCases:
    """The flex cases of one (shape, tokens): one compiled ``flex_attention`` and one compiled mask builder for all of
    them (a second ``torch.compile`` of the same function would compile again), and the current table's prebuilt
    ``BlockMask`` s per block size (the first build's time kept: it compiles the builder)."""

    def __init__(self, tokens: int, device: torch.device, compiled: bool) -> None:
        self.tokens, self.device = tokens, device
        self.flex: Callable[..., Any] = flex_attention
        self.builder: Callable[..., Any] = create_block_mask
        if compiled:
            self.flex = torch.compile(flex_attention, dynamic=False)
            self.builder = torch.compile(create_block_mask, dynamic=False)
        self.batches: list[Batch] = []
        self.masks: dict[int, list[Any]] = {}
        self.first_build_s: dict[int, float] = {}

    def start(self, batches: list[Batch]) -> None:
        """A new table: its batches; the previous table's masks are dropped."""
        self.batches, self.masks, self.first_build_s = batches, {}, {}

    def build(self, i: int, block: int) -> Any:
        """The ``BlockMask`` of batch ``i`` (``B=None, H=None``: one mask for every row and head)."""
        mod = self.batches[i].mask_mod
        return self.builder(mod, None, None, self.tokens, self.tokens, device=self.device, BLOCK_SIZE=block)

    def prebuilt(self, block: int) -> list[Any]:
        if block not in self.masks:
            start = _synced()
            masks = [self.build(0, block)]
            self.first_build_s[block] = _synced() - start
            self.masks[block] = masks + [self.build(i, block) for i in range(1, len(self.batches))]
        return self.masks[block]

    def case(self, name: str) -> Attention:
        block, options, where = FLEX[name]
        masks = self.prebuilt(block) if where == "before" else None

        def mask_of(i: int) -> Any:
            if masks is not None:
                return masks[i]
            if where == "boundaries":
                b = self.batches[i]
                return document_block_mask(b.cu, self.tokens, block, b.causal, b.mask_mod)
            return self.build(i, block)

        def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            mask = mask_of(i)
            out = self.flex(heads_first(q), heads_first(k), heads_first(v), block_mask=mask, kernel_options=options)
            return out[0].transpose(0, 1)  # (1, heads, T, dim) -> (T, heads, dim)

        return attn


def document_block_mask(cu: torch.Tensor, tokens: int, block: int, causal: bool, mask_mod: Any) -> Any:
    """The document ``BlockMask`` of segments ``cu`` (int32 boundaries over ``tokens``), built from the boundaries.

    Query block ``i``'s keys lie in the blocks from the start of its first token's segment to the end of its last
    token's (and not after block ``i`` when causal); a block pair is *full* (``mask_mod`` skipped) when both blocks lie
    inside one segment (and, causal, the key block is before the query block). O(blocks^2) tensor ops, no evaluation
    of ``mask_mod`` over ``tokens x tokens``; equal to ``create_block_mask``'s (checked by the run's correctness pass).
    """
    n = tokens // block
    starts = torch.arange(n, device=cu.device) * block
    bounds = cu.long()
    doc = torch.searchsorted(bounds, torch.stack([starts, starts + block - 1]), right=True) - 1  # (2, n): first/last
    first, last = doc[0], doc[1]
    lo = bounds[first] // block
    hi = (bounds[last + 1] - 1) // block
    j = torch.arange(n, device=cu.device)
    in_range = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    single = first == last
    full = in_range & single[:, None] & single[None, :] & (first[:, None] == first[None, :])
    if causal:
        in_range &= j[None, :] <= j[:, None]
        full &= j[None, :] < j[:, None]
    partial = in_range & ~full

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = dense.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None, None], idx[None, None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(tokens, tokens)
    )


def njt_case(batches: list[Batch], backend: Any, width: int) -> Attention:
    """SDPA over jagged nested tensors (one component per segment) under one SDPA backend."""
    from torch.nn.attention import sdpa_kernel

    offsets = [b.cu.long() for b in batches]

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def nested(x: torch.Tensor) -> torch.Tensor:
            nt = torch.nested.nested_tensor_from_jagged(x, offsets[i], min_seqlen=1, max_seqlen=width)
            return nt.transpose(1, 2)  # (segments, heads, j, dim)

        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(nested(q), nested(k), nested(v))
        return out.transpose(1, 2).values()  # (T, heads, dim)

    return attn


def dense_reference(batches: list[Batch], causal: bool) -> Attention:
    """SDPA with a dense boolean block-diagonal (and causal) mask from the segment lengths (small ``T`` only)."""
    masks = []
    for b in batches:
        mask = torch.block_diag(*(torch.ones(int(n), int(n), dtype=torch.bool) for n in b.segments))
        masks.append(mask.tril() if causal else mask)

    def attn(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = masks[i].to(q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), attn_mask=mask
        )
        return out[0].transpose(0, 1)

    return attn


def _synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def fail_on_recompile_limit() -> bool:
    """Make dynamo raise when a function hits its recompile limit, instead of running it eagerly (for flex attention:
    the dense math fallback, whose timing would be meaningless); ``False`` where this torch has no such switch.

    The one place this script sets dynamo's (private) configuration: no public API offers the switch.
    ``tests/test_benchmarks.py`` checks that the switch exists on the installed torch.
    """
    config = torch._dynamo.config
    if not hasattr(config, "fail_on_recompile_limit_hit"):
        return False
    config.fail_on_recompile_limit_hit = True
    return True


def _dynamo_counts() -> tuple[int, int]:
    """Frames dynamo compiled and graphs it made so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"]), int(counters["stats"]["unique_graphs"])


@dataclasses.dataclass
class Result:
    """One case of one table: its windows, first call, differences from the reference, or why it did not run."""

    case: str
    implementation: str = ""
    skipped: str | None = None
    backward: str | None = None  # why the backward did not run (then only the output is compared)
    first_call_s: float | None = None
    dynamo_frames: int = 0
    dynamo_graphs: int = 0
    windows_ms: list[float] = dataclasses.field(default_factory=list)
    diff: dict[str, float | None] = dataclasses.field(default_factory=dict)
    rel_diff: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def ms(self) -> float | None:
        return statistics.median(self.windows_ms) if self.windows_ms else None


def _window_ms(attn: Attention, inputs: Inputs, iters: int, count: int) -> float:
    """ms per forward + backward pass over ``iters`` passes cycling over the ``count`` batches."""
    if inputs.q.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for it in range(iters):
            fwd_bwd(attn, it % count, inputs)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / iters
    t0 = time.perf_counter()
    for it in range(iters):
        fwd_bwd(attn, it % count, inputs)
    return (time.perf_counter() - t0) * 1e3 / iters


def _compare(result: Result, got: tuple[torch.Tensor | None, ...], ref: tuple[torch.Tensor, ...]) -> None:
    """Keep the largest absolute (and relative to max |reference|) difference of each tensor over the batches."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        if a is None:
            result.diff[name] = result.rel_diff[name] = None
            continue
        d = float((a.detach().float() - b.float()).abs().max())
        rel = d / max(float(b.float().abs().max()), 1e-12)
        result.diff[name] = max(d, result.diff.get(name) or 0.0)
        result.rel_diff[name] = max(rel, result.rel_diff.get(name) or 0.0)


def run_table(
    shape: str, data: str, tokens: int, args: argparse.Namespace, device: torch.device, flex: FlexCases
) -> dict[str, Any]:
    """Every case of one (shape, data, tokens): warm-up, correctness against the reference, the timed windows."""
    heads, dim, causal = SHAPES[shape]
    dtype = torch.float32 if args.quick else torch.bfloat16
    lengths = np.minimum(distribution(data), args.width)
    batches = [Batch.build(s, tokens, causal, device) for s in packed_lengths(lengths, tokens, args.batches)]
    inputs = Inputs.random(tokens, heads, dim, dtype, device)
    flex.start(batches)
    kernel = varlen_kernel_available(device, dtype)
    varlen_impl = (
        ("aten::_flash_attention_forward" if flash_forward_schema_matches() else "varlen_attn")
        if kernel
        else "the library's exact fallback (SDPA + block mask): no varlen kernel here"
    )
    results: dict[str, Result] = {}
    attns: dict[str, Attention] = {}
    for name in args.cases:
        result = results[name] = Result(name)
        frames, graphs = _dynamo_counts()
        try:
            if name.startswith("varlen"):
                if device.type == "cuda" and not kernel:
                    raise RuntimeError(f"no varlen kernel for {dtype} on this device (varlen_kernel_available)")
                result.implementation = varlen_impl
                if name == "varlen_static":
                    slots = int(round_up(int(1.1 * max(b.samples.size for b in batches)), 8))
                    result.implementation += f", static layout: {slots} slots + {tokens // args.width} rows"
                    attns[name] = varlen_static_case(batches, causal, slots, tokens, args.width)
                elif name == "varlen_split":
                    result.implementation += (
                        f", two calls: segments > {SPLIT} (max {args.width}), the rest (max {SPLIT})"
                    )
                    attns[name] = varlen_split_case(batches, causal, args.width)
                else:
                    attns[name] = varlen_case(batches, causal, None if name == "varlen_tight" else args.width)
            elif name.startswith("efficient"):
                if device.type != "cuda":
                    raise RuntimeError("the memory-efficient kernel with boundaries needs a CUDA device")
                splits = None if name.endswith("_auto_splits") else attention.EFFICIENT_KEY_SPLITS
                result.implementation = (
                    "aten::_efficient_attention_forward with boundaries (64 x 64 tiles), backward with "
                    + ("torch's split heuristic" if splits is None else f"{splits} split(s) of the keys")
                )
                static = None
                if name.startswith("efficient_static"):
                    slots = int(round_up(int(1.1 * max(b.samples.size for b in batches)), 8))
                    result.implementation += f", static layout: {slots} slots + {tokens // args.width} rows"
                    static = (slots, tokens, args.width)
                attns[name] = efficient_case(batches, causal, static, splits)
            elif name.startswith("njt_"):
                if causal:
                    raise RuntimeError("nested-tensor SDPA refuses is_causal: bidirectional shapes only")
                backend = SDPBackend.CUDNN_ATTENTION if name == "njt_cudnn" else SDPBackend.FLASH_ATTENTION
                result.implementation = f"SDPA on jagged nested tensors, {backend.name}"
                attns[name] = njt_case(batches, backend, args.width)
            else:
                block, options, where = FLEX[name]
                result.implementation = (
                    f"flex_attention{', compiled' if not args.quick else ', eager'}, BlockMask of {block}"
                    + (f", kernel_options {options}" if options else "")
                    + MASK_BUILDS[where]
                )
                attns[name] = flex.case(name)
            start = _synced()
            try:
                fwd_bwd(attns[name], 0, inputs)
            except NotImplementedError as error:  # flex on a CPU: no backward
                if device.type == "cuda":
                    raise
                result.backward = _error(error)
            result.first_call_s = _synced() - start
            if result.backward is None:
                for i in range(len(batches)):  # warm-up: every batch once (a per-batch recompile would show here)
                    fwd_bwd(attns[name], i, inputs)
            _synced()
        except Exception as error:
            result.skipped = _error(error)
            attns.pop(name, None)
        now = _dynamo_counts()
        result.dynamo_frames, result.dynamo_graphs = now[0] - frames, now[1] - graphs
    # correctness: the reference's output and gradients on each batch, then each case's
    if args.quick:
        ref_name, reference = "dense SDPA reference (fp32)", dense_reference(batches, causal)
    elif "varlen" in attns:
        ref_name, reference = "varlen", attns["varlen"]
    else:
        ref_name, reference = "none (varlen did not run)", None
    if reference is not None:
        for i in range(len(batches)):
            ref = tuple(t.detach().clone() for t in fwd_bwd(reference, i, inputs))
            for name, attn in attns.items():
                if results[name].backward is None:
                    got: tuple[torch.Tensor | None, ...] = fwd_bwd(attn, i, inputs)
                else:
                    with torch.no_grad():
                        got = (attn(i, *(t.detach() for t in inputs.leaves())), None, None, None)
                _compare(results[name], got, ref)
    # timing: ABBA over the cases that train
    timed = [n for n in attns if results[n].backward is None]
    frames, graphs = _dynamo_counts()
    for name in abba(timed, args.windows):
        results[name].windows_ms.append(_window_ms(attns[name], inputs, args.iters, len(batches)))
    now = _dynamo_counts()
    base = next((results[n].ms for n in timed), None)
    cases = []
    for name in args.cases:
        r = results[name]
        row = dataclasses.asdict(r)
        row["ms"] = r.ms
        row["x_varlen"] = base / r.ms if base and r.ms else None
        cases.append(row)
    longest = max(int(b.segments.max()) for b in batches)
    return {
        "shape": shape,
        "heads": heads,
        "dim": dim,
        "causal": causal,
        "data": data,
        "tokens": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "batches": len(batches),
        "samples_per_batch": [int(b.samples.size) for b in batches],
        "padding_per_batch": [int(tokens - b.samples.sum()) for b in batches],
        "longest_segment": longest,
        "sum_squared_lengths_per_batch": [int((b.samples.astype(np.int64) ** 2).sum()) for b in batches],
        "reference": ref_name,
        "time_base": timed[0] if timed else None,
        "mask_first_build_s": dict(flex.first_build_s),
        "dynamo_frames_during_timing": now[0] - frames,
        "dynamo_graphs_during_timing": now[1] - graphs,
        "cases": cases,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report_table(table: dict[str, Any], quick: bool) -> str:
    """One table's title line and markdown table."""
    samples = table["samples_per_batch"]
    title = (
        f"**{table['shape']}** ({table['heads']} heads x {table['dim']}, "
        f"{'causal' if table['causal'] else 'bidirectional'}), **{table['data']}**, T = {table['tokens']:,} "
        f"({table['dtype']}): {table['batches']} batches of {min(samples)}-{max(samples)} samples, longest segment "
        f"{table['longest_segment']}, padding {min(table['padding_per_batch'])}-{max(table['padding_per_batch'])} "
        f"tokens; differences against {table['reference']}"
    )
    if table["mask_first_build_s"]:
        builds = ", ".join(f"blocks of {b}: {s:.1f} s" for b, s in table["mask_first_build_s"].items())
        title += f"; first BlockMask build (compile included): {builds}"
    if table["dynamo_frames_during_timing"] or table["dynamo_graphs_during_timing"]:
        title += (
            f"; WARNING: dynamo compiled {table['dynamo_frames_during_timing']} frames "
            f"({table['dynamo_graphs_during_timing']} graphs) during the timed windows"
        )
    rows = []
    for c in table["cases"]:
        if c["skipped"]:
            rows.append([c["case"], f"skipped: {c['skipped'][:120]}", "", "", "", ""])
            continue
        d = c["diff"]
        grads = (
            f"backward refused: {c['backward'][:60]}"
            if c["backward"]
            else " / ".join(_fmt(d.get(k), ".1e") for k in ("dq", "dk", "dv"))
        )
        rows.append(
            [
                c["case"],
                _fmt(c["ms"], ".3f"),
                _fmt(c["x_varlen"], ".2f") + ("x" if c["x_varlen"] else ""),
                f"{_fmt(c['first_call_s'], '.1f')} ({c['dynamo_frames']} / {c['dynamo_graphs']})",
                _fmt(d.get("out"), ".1e"),
                grads,
            ]
        )
    ms = "ms per fwd+bwd (CPU smoke run, not a claim)" if quick else "ms per fwd+bwd"
    base = table["time_base"] or "the first case"
    header = [
        "case",
        ms,
        f"x {base}",
        "first call s (frames / graphs compiled)",
        "max abs diff out",
        "max abs diff dq / dk / dv",
    ]
    return title + "\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536], help="T, tokens per packed batch")
    parser.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    parser.add_argument("--shape", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    parser.add_argument("--batches", type=int, default=8, help="distinct packed batches per table")
    parser.add_argument("--iters", type=int, default=20, help="timed fwd+bwd passes per window")
    parser.add_argument("--windows", type=int, default=4, help="timed windows per case, ABBA order")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="max abs diff / max |reference| allowed (2e-2; --quick: 1e-4)"
    )
    parser.add_argument("--quick", action="store_true", help="CPU, fp32, T=256, flex eager: correctness only")
    parser.add_argument("--json", default=None, help="write everything here")
    args = parser.parse_args()
    args.width = WIDTH
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.tolerance is None:
        args.tolerance = TOLERANCE["quick" if args.quick else "gpu"]
    if min(args.batches, args.iters, args.windows) < 1:
        parser.error("--batches, --iters and --windows must be >= 1")
    if any(t < args.width or t % 128 for t in args.tokens):
        parser.error(f"--tokens must be multiples of 128 of at least {args.width}: got {args.tokens}")
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs a CUDA device (the varlen kernel and compiled flex attention's backward); use --quick")
    device = torch.device("cpu" if args.quick else "cuda")
    fail_on_recompile_limit()
    warnings.filterwarnings("ignore", message=r"flex_attention called without torch\.compile")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    tables = []
    for shape in args.shape:
        for tokens in args.tokens:
            torch.compiler.reset()  # each (shape, tokens) compiles afresh: no recompile limits from the others
            flex = FlexCases(tokens, device, compiled=not args.quick)
            for data in args.data:
                t0 = time.perf_counter()
                tables.append(run_table(shape, data, tokens, args, device, flex))
                print(f"{shape} {data} T={tokens}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    try:
        import triton

        triton_version = f"triton {triton.__version__}, "
    except ImportError:
        triton_version = ""
    header = (
        f"Packed attention, forward + backward of the attention op alone, {device_name}: {args.batches} batches per "
        f"table, median of {args.windows} windows of {args.iters} passes (ABBA); x varlen: varlen's ms / the case's "
        f"(above 1: faster than varlen); {'CPU smoke run, fp32: correctness only; ' if args.quick else ''}"
        f"{triton_version}{environment()}"
    )
    report = header + "\n\n" + "\n\n".join(report_table(t, args.quick) for t in tables)
    failures = [
        f"{t['shape']} {t['data']} T={t['tokens']} {c['case']}: {k} differs by {rel:.2e} of max |reference|"
        for t in tables
        for c in t["cases"]
        for k, rel in c["rel_diff"].items()
        if rel is not None and rel > args.tolerance
    ]
    result = {
        "header": header,
        "device": device_name,
        "torch": torch.__version__,
        "settings": vars(args),
        "wall_s": time.perf_counter() - started,
        "failures": failures,
        "tables": tables,
    }
    write_outputs(result, report, args.json, None, lambda *a: None)
    print(f"attention_kernels: {result['wall_s']:.0f} s in all", file=sys.stderr, flush=True)
    if failures:
        raise SystemExit(
            f"attention_kernels: {len(failures)} differences above --tolerance {args.tolerance}:\n"
            + "\n".join(failures)
        )


if __name__ == "__main__":
    main()

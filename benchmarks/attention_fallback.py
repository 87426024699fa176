"""Packed attention where the varlen kernel cannot run (CPU, fp32): the exact block-mask fallback vs flex attention.

    python benchmarks/attention_fallback.py [--rows 8] [--heads 12] [--dim 64] [--repeats 5] [--json out.json]
    python benchmarks/attention_fallback.py --quick        # 2 rows, 2 heads, no compile (the CI smoke run)

Issue #15 asks for the faster of two exact layouts where the kernel does not run: rows of ``max_length`` with
block masks, or flex attention. This measures both on the same packed rows, forward + backward of the attention op
alone, and the forward alone (evaluation and prediction):

* ``block mask (the fallback)``: :func:`~lightning_txopt.models.attention.varlen_attention_forward` as
  ``TransformerModule`` calls it on a CPU: SDPA with a boolean ``(rows, 1, W, W)`` mask of each row's segments;
* ``flex attention, compiled``: ``torch.nn.attention.flex_attention.flex_attention`` under ``torch.compile`` with a
  ``BlockMask`` from the same segments (``create_block_mask``; blocks of 128), its build timed separately;
* ``flex attention, eager`` (``--eager-flex``): the same without compile, a reference.

The rows are the first packed batch of ``BucketDataModule(strategy="packed", max_length=512)`` over the corpus's
BERT-uncased lengths (``tests/data/fortune_lengths.npy``), fp32 queries, keys and values ``(rows, heads, 512, dim)``
with ``requires_grad``; bidirectional (encoders) and causal (decoders). Each variant's output is compared with the
fallback's (max abs difference). Time: median of ``--repeats`` after ``--warmup`` (compile happens in warm-up). A
variant that refuses backward on this device (flex attention on a CPU, torch 2.13: ``NotImplementedError``) is
reported as such, with its forward time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import RECORDED_LENGTHS, environment, markdown_table, write_outputs
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lightning_txopt import BucketDataModule
from lightning_txopt.models.attention import segment_ids, varlen_attention_forward

WIDTH = 512


class _Attention(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal


def packed_rows(rows: int, width: int) -> torch.Tensor:
    """``cu_seq_lens`` of the first packed batch of ``rows`` rows of ``width`` tokens over the corpus's lengths."""
    lengths = np.minimum(np.load(RECORDED_LENGTHS), width)
    samples = [{"input_ids": np.ones(int(n), dtype=np.int64), "labels": 0} for n in lengths]
    dm = BucketDataModule(samples, pad_token_id=0, strategy="packed", max_tokens=rows * width, max_length=width, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return batch["cu_seq_lens_q"]


def fallback(causal: bool, cu: torch.Tensor) -> Callable[..., torch.Tensor]:
    module = _Attention(causal)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = varlen_attention_forward(
            module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=WIDTH, max_length_k=WIDTH
        )
        return out.transpose(1, 2)  # (rows, heads, W, dim), as flex returns

    return run


def block_mask(causal: bool, cu: torch.Tensor, rows: int, width: int) -> Any:
    seg = segment_ids(cu, rows * width).view(rows, width)

    def same_segment(b: Any, h: Any, q: Any, kv: Any) -> Any:
        keep = seg[b, q] == seg[b, kv]
        return keep & (q >= kv) if causal else keep

    return create_block_mask(same_segment, rows, None, width, width, device="cpu")


def flex(mask: Any, compiled: bool) -> Callable[..., torch.Tensor]:
    if compiled:
        torch.compiler.reset()  # each compiled variant compiles afresh (no recompile limits from the other mask)
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fn(q, k, v, block_mask=mask)

    return run


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def training_ms(attn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], args: argparse.Namespace) -> str:
    """Forward + backward time in ms, or why it cannot run."""

    def step() -> None:
        for t in inputs:
            t.grad = None
        attn(*inputs).sum().backward()

    try:
        return f"{timed(step, args.warmup, args.repeats):.1f}"
    except NotImplementedError as error:
        return f"refused: {str(error).splitlines()[0][:70]}"


def forward_ms(attn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], args: argparse.Namespace) -> float:
    frozen = tuple(t.detach() for t in inputs)

    def step() -> None:
        with torch.no_grad():
            attn(*frozen)

    return timed(step, args.warmup, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eager-flex", action="store_true", help="also flex attention without compile")
    parser.add_argument("--quick", action="store_true", help="2 rows, 2 heads, flex eager only (CI smoke run)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.heads, args.repeats, args.warmup = 2, 2, 1, 1
    if min(args.rows, args.heads, args.dim, args.repeats) < 1:
        parser.error("--rows, --heads, --dim and --repeats must be >= 1")
    cu = packed_rows(args.rows, WIDTH)
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.heads, WIDTH, args.dim)
    inputs = tuple(torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    results, rows = [], []
    for causal in (False, True):
        t0 = time.perf_counter()
        mask = block_mask(causal, cu, args.rows, WIDTH)
        build_ms = (time.perf_counter() - t0) * 1e3
        variants: list[tuple[str, Callable[..., torch.Tensor]]] = [("block mask (the fallback)", fallback(causal, cu))]
        if not args.quick:
            variants.append(("flex attention, compiled", flex(mask, compiled=True)))
        if args.quick or args.eager_flex:
            variants.append(("flex attention, eager", flex(mask, compiled=False)))
        with torch.no_grad():
            reference = variants[0][1](*(t.detach() for t in inputs))
        first = None
        for name, fn in variants:
            fwd = forward_ms(fn, inputs, args)
            train = training_ms(fn, inputs, args)
            with torch.no_grad():
                diff = float((fn(*(t.detach() for t in inputs)) - reference).abs().max())
            first = first or fwd
            extra = f" (+ {build_ms:.1f} ms to build the BlockMask)" if name.startswith("flex") else ""
            results.append(
                {"causal": causal, "variant": name, "forward_ms": fwd, "train_ms": train, "max_abs_diff": diff}
            )
            mask_kind = "causal" if causal else "bidirectional"
            rows.append([mask_kind, name + extra, f"{fwd:.1f}", f"{first / fwd:.2f}x", train, f"{diff:.1e}"])
    segments = int(cu.numel() - 1)
    header = (
        f"Packed attention on the CPU, fp32: {args.rows} rows of {WIDTH} tokens ({segments} segments from the corpus's "
        f"lengths), {args.heads} heads x {args.dim}; the attention op, median of {args.repeats} "
        f"after {args.warmup} warm-up; {torch.get_num_threads()} threads; {environment()}"
    )
    report = (
        header
        + "\n\n"
        + markdown_table(
            ["mask", "variant", "forward ms", "forward vs fallback", "forward + backward ms", "max abs diff"], rows
        )
    )
    write_outputs({"header": header, "settings": vars(args), "rows": results}, report, args.json, None, lambda *a: None)


if __name__ == "__main__":
    main()

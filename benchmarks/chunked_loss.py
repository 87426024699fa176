"""Peak memory and time of a causal LM's output layer + cross-entropy: unchunked vs ``chunked_linear_cross_entropy``.

    python benchmarks/chunked_loss.py [--tokens 16384] [--rows 4] [--hidden 2048] [--vocab 128256] [--dtype bf16]
                                      [--chunk-sizes 1024,2048,4096,8192] [--repeats 10] [--json out.json]
    python benchmarks/chunked_loss.py --quick        # small sizes, CPU-friendly (the CI smoke run)

One forward + backward of the last step of a causal LM: fp32 hidden states ``(rows, tokens / rows, H)`` (what a
final norm gives under autocast) and an fp32 ``(V, H)`` head weight (master weights) with ``requires_grad``, labels
with 5% ignored (``-100``). Rows of the table:

* ``unchunked, as TransformerModule today``: ``logits = F.linear(hidden, weight)`` (the model's logits, kept until
  the step ends), ``logits[:, :-1].reshape(-1, V).float()``, ``F.cross_entropy(..., labels[:, 1:])``;
* ``unchunked, flat``: ``F.cross_entropy(F.linear(hidden, weight).float(), shifted labels)`` on a flat view, the
  smallest unchunked form;
* ``chunked, chunk C``: ``chunked_linear_cross_entropy(hidden, weight, shift_labels(labels), chunk_size=C)``,
  gradients formed in forward (the default for bf16);
* ``chunked, chunk C, recompute``: the same with ``recompute=True`` (logits recomputed in backward; fp16's way).

Memory: the peak during forward + backward minus what was allocated before it (the inputs); it includes the
weight's fp32 gradient (``V * H * 4`` bytes) and the hidden states' gradient in every row. CUDA: from
``torch.cuda.max_memory_allocated``; CPU: the peak of the profiler's allocation events (``profile_memory=True``),
measured in a separate untimed run. Time: median over ``--repeats`` runs (after ``--warmup``) of forward +
backward, in ms (CUDA: synchronised). ``--dtype bf16|fp16`` runs under ``torch.autocast``; ``fp32`` without.
Each row also reports its loss's relative difference from the first row's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import environment, markdown_table

from lightning_txopt.losses import chunked_linear_cross_entropy, shift_labels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(
    rows: int, seq: int, hidden: int, vocab: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(rows, seq, hidden, generator=gen).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden**-0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = -100
    return h, w, labels.to(device)


def module_today(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat.float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def flat_reference(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h.view(-1, h.shape[-1]), w).float()
    return F.cross_entropy(logits, shift_labels(labels).view(-1), ignore_index=-100, reduction="sum")


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(hidden, weight, labels) -> summed loss``: one variant the benchmark measures."""


def chunked(chunk_size: int, recompute: bool | None) -> LossFn:
    def run(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = shift_labels(labels)
        return chunked_linear_cross_entropy(h, w, labels, chunk_size=chunk_size, reduction="sum", recompute=recompute)

    return run


def step(fn: LossFn, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h.grad = w.grad = None
    with torch.autocast(h.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = fn(h, w, labels)
    loss.backward()
    return loss.detach()


def peak_bytes(fn: LossFn, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> int:
    """Peak allocation during one forward + backward, above what was allocated before it."""
    h.grad = w.grad = None
    if h.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, h, w, labels, dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, h, w, labels, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        raise RuntimeError("The profiler recorded no memory events: cannot measure CPU memory with this torch.")
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def timed_ms(
    fn: LossFn, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, repeats: int, warmup: int
) -> float:
    for _ in range(warmup):
        step(fn, h, w, labels, dtype)
    times = []
    for _ in range(repeats):
        if h.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fn, h, w, labels, dtype)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(fn, h, w, labels, dtype)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="positions per step, all rows together")
    parser.add_argument("--rows", type=int, default=4, help="rows (sequences) the tokens are split into")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-sizes", default="1024,2048,4096,8192")
    parser.add_argument("--no-recompute-rows", action="store_true", help="skip the recompute=True rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,048 tokens in 2 rows, H 128, V 8,000, chunks 256,1024")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rows, args.hidden, args.vocab, args.chunk_sizes = 2048, 2, 128, 8000, "256,1024"
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    if (
        not chunk_sizes
        or min(chunk_sizes) < 1
        or min(args.tokens, args.rows, args.hidden, args.vocab, args.repeats) < 1
    ):
        parser.error("--tokens, --rows, --hidden, --vocab, --repeats and every chunk size must be >= 1")
    if args.tokens % args.rows:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --rows ({args.rows})")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    h, w, labels = make_inputs(args.rows, args.tokens // args.rows, args.hidden, args.vocab, device)

    variants: list[tuple[str, LossFn]] = [
        ("unchunked, as TransformerModule today", module_today),
        ("unchunked, flat", flat_reference),
    ]
    default_recompute = dtype == torch.float16
    variants += [
        (f"chunked, chunk {c}" + (", recompute" if default_recompute else ""), chunked(c, None)) for c in chunk_sizes
    ]
    if not default_recompute and not args.no_recompute_rows:
        variants += [(f"chunked, chunk {c}, recompute", chunked(c, True)) for c in chunk_sizes]
    rows, results = [], []
    first_loss = first_mem = first_ms = None
    for name, fn in variants:
        loss = float(step(fn, h, w, labels, dtype))
        mem = peak_bytes(fn, h, w, labels, dtype)
        ms = timed_ms(fn, h, w, labels, dtype, args.repeats, args.warmup)
        if first_loss is None or first_mem is None or first_ms is None:
            first_loss, first_mem, first_ms = loss, mem, ms
        rel = abs(loss - first_loss) / abs(first_loss)
        results.append({"variant": name, "peak_bytes": mem, "ms": ms, "loss": loss, "loss_rel_diff": rel})
        rows.append(
            [name, f"{mem / 2**30:.3f}", f"{mem / first_mem:.2f}x", f"{ms:.2f}", f"{first_ms / ms:.2f}x", f"{rel:.1e}"]
        )
    header = (
        f"{args.tokens:,} tokens ({args.rows} rows), H {args.hidden:,}, V {args.vocab:,}, {args.dtype}"
        f"{' autocast' if dtype != torch.float32 else ''}, {device.type}; forward + backward, median of "
        f"{args.repeats} (after {args.warmup} warm-up)"
    )
    print(header + "\n")
    cols = ["variant", "peak extra GiB", "memory vs first", "ms", "speed vs first", "loss rel. diff"]
    print(markdown_table(cols, rows))
    env = environment() + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    print(f"\n{env}")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"header": header, "settings": settings, "rows": results, "environment": env}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

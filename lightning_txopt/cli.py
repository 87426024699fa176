"""The ``txopt`` command: ``stats``, ``fit``, ``demo`` and ``bench``.

The library never prints; this module is the one place that does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_txopt.utils.table import markdown_table

__all__ = ["main"]

_KNOWN_ERRORS = (FileNotFoundError, ValueError, KeyError, ImportError, TypeError)


# ---------------------------------------------------------------------------------------------------------- stats
def _stats(args: argparse.Namespace) -> int:
    from lightning_txopt.data.corpus import load_fortunes
    from lightning_txopt.data.report import padding_report
    from lightning_txopt.data.text import load_tokenizer, read_records

    if args.batch_size is None and args.max_tokens is None:  # the two are mutually exclusive options
        args.batch_size = 32
    records: list[dict[str, Any]] = [dict(r) for r in load_fortunes()] if args.data is None else read_records(args.data)
    if not records:
        raise ValueError(f"{args.data} holds no records.")
    if args.text_column not in records[0]:
        raise ValueError(
            f"No column {args.text_column!r} in {args.data} (columns: {sorted(records[0])}); use --text-column."
        )
    tokenizer = load_tokenizer(args.tokenizer)
    texts = [str(r[args.text_column]) for r in records]
    ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = np.array([max(len(x), 1) for x in ids])
    source = args.data or "embedded corpus (fortunes)"
    q = np.percentile(lengths, [50, 90, 99])
    print(f"{source}: {lengths.size:,} texts, {int(lengths.sum()):,} tokens (truncated at {args.max_length})")
    print(
        f"length: min {lengths.min()}, median {q[0]:.0f}, mean {lengths.mean():.1f}, p90 {q[1]:.0f}, "
        f"p99 {q[2]:.0f}, max {lengths.max()}\n"
    )
    rows = padding_report(
        lengths, batch_size=args.batch_size, max_tokens=args.max_tokens, max_length=args.max_length, seed=args.seed
    )
    unit = f"batch {args.batch_size}" if args.batch_size else f"max_tokens {args.max_tokens}"
    print(
        markdown_table(
            [f"strategy ({unit})", "batches", "real tokens", "processed tokens", "efficiency"],
            [[r.strategy, r.batches, r.real_tokens, r.processed_tokens, r.efficiency] for r in rows],
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"lengths": {"n": int(lengths.size), "median": float(q[0])}, "rows": [r.as_dict() for r in rows]},
                indent=2,
            )
        )
    if args.plot:
        _plot_stats(lengths, rows, args.plot, source)
        print(f"\nchart: {args.plot}")
    return 0


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("Charts need matplotlib: `pip install matplotlib` (or the `demo` extra).") from err
    return plt


def _plot_stats(lengths: np.ndarray, rows: Sequence[Any], path: str, title: str) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(lengths, bins=60, color="#4c72b0")
    left.set_yscale("log")
    left.set_xlabel("tokens per text")
    left.set_ylabel("texts (log)")
    left.set_title(f"Length distribution: {title}")
    names = [r.strategy for r in rows]
    right.bar(names, [r.processed_tokens for r in rows], color="#dd8452", label="processed (with padding)")
    right.bar(names, [r.real_tokens for r in rows], color="#55a868", label="real")
    for i, r in enumerate(rows):
        right.text(i, r.processed_tokens, f"{r.efficiency:.1%}", ha="center", va="bottom")
    right.set_ylabel("tokens per epoch")
    right.set_title("Processed vs real tokens per strategy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- fit
def _fit(argv: list[str]) -> int:
    from lightning.pytorch.cli import LightningCLI

    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.module import TransformerModule

    LightningCLI(
        TransformerModule,
        TextDataModule,
        args=["fit", *argv],
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "txopt fit"},
    )
    return 0


# ---------------------------------------------------------------------------------------------------------- demo
def _model_source(tiny: bool) -> tuple[str | None, Any]:
    """``(model path, config)``: the demo extra's pretrained MiniLM, or with ``--tiny`` a tiny random BERT."""
    if tiny:
        from transformers import BertConfig

        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        )
        return None, config
    from lightning_txopt.data.text import default_tokenizer_path

    return str(default_tokenizer_path()), None


def _demo_sizes(args: argparse.Namespace) -> tuple[str, int | None, int, int]:
    import torch

    accelerator = args.accelerator
    gpu = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    limit = args.limit if args.limit is not None else (None if gpu else 800)
    max_length = args.max_length if args.max_length is not None else (512 if gpu else 128)
    epochs = args.epochs if args.epochs is not None else (2 if gpu else 1)
    return ("cuda" if gpu else "cpu"), limit, max_length, epochs


def _demo(args: argparse.Namespace) -> int:
    from lightning_txopt.callbacks import AccumulationScheduler, FreezeEmbeddings
    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.demo import measure_run
    from lightning_txopt.precision import resolve_precision

    model, config = _model_source(args.tiny)
    device, limit, max_length, epochs = _demo_sizes(args)
    max_tokens = args.max_tokens or (16384 if device == "cuda" else 4096)
    common: dict[str, Any] = dict(limit=limit, max_length=max_length, seed=args.seed)
    print(
        f"txopt demo on {device}: {'all' if limit is None else limit} texts of the embedded corpus, max_length "
        f"{max_length}, {epochs} epoch(s), model {'tiny BERT (random)' if args.tiny else 'all-MiniLM-L6-v2'}\n"
    )

    baseline_dm = TextDataModule(None, args.tokenizer, strategy="fixed", batch_size=32, **common)
    baseline = measure_run(
        "baseline: fixed padding, fp32, no callbacks",
        datamodule=baseline_dm,
        model=model,
        config=config,
        precision="32-true",
        accelerator=device,
        max_epochs=epochs,
        max_steps=args.max_steps,
        enable_progress_bar=not args.quiet,
    )
    precision = resolve_precision("auto", accelerator=device)
    optimised_dm = TextDataModule(
        None,
        args.tokenizer,
        strategy="bucket",
        max_tokens=max_tokens,
        pad_to_multiple_of=8 if precision != "32-true" else None,
        **common,
    )
    callbacks = [FreezeEmbeddings(), AccumulationScheduler({0: 1}, normalize="tokens")]
    optimised = measure_run(
        f"optimised: bucketed max_tokens={max_tokens}, {precision}, frozen embeddings, exact accumulation",
        datamodule=optimised_dm,
        model=model,
        config=config,
        callbacks=callbacks,
        precision=precision,
        accelerator=device,
        max_epochs=epochs,
        max_steps=args.max_steps,
        enable_progress_bar=not args.quiet,
    )
    results = [baseline, optimised]
    header = ["run", "real tokens/s", "padding efficiency", "peak memory MiB", "train s", "wall s", "val accuracy"]
    rows = [
        [
            r.name,
            r.real_tokens_per_sec,
            r.padding_efficiency,
            r.peak_memory_mib,
            r.train_seconds,
            r.wall_seconds,
            r.val_accuracy,
        ]
        for r in results
    ]
    speedup = optimised.real_tokens_per_sec / baseline.real_tokens_per_sec if baseline.real_tokens_per_sec else 0
    print("\n" + markdown_table(header, rows))
    print(f"\nreal tokens/s: {speedup:.2f}x; wall time: {baseline.wall_seconds / optimised.wall_seconds:.2f}x shorter.")
    print("Gradient checkpointing is off: MiniLM's activations fit; it pays only when memory is the limit.")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps([r.as_dict() for r in results], indent=2))
    try:
        _plot_demo(results, str(out / "demo.png"))
        print(f"results: {out / 'demo.json'}, chart: {out / 'demo.png'}")
    except ImportError as err:
        print(f"results: {out / 'demo.json'} (no chart: {err})")
    return 0


def _plot_demo(results: Sequence[Any], path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = ["baseline", "optimised"]
    for ax, (title, values) in zip(
        axes,
        [
            ("real tokens / s", [r.real_tokens_per_sec for r in results]),
            ("padding efficiency", [r.padding_efficiency for r in results]),
            ("wall time (s)", [r.wall_seconds for r in results]),
        ],
    ):
        ax.bar(names, values, color=["#8c8c8c", "#4c72b0"])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.3g}", ha="center", va="bottom")
    fig.suptitle("txopt demo: all-MiniLM-L6-v2 on the embedded corpus")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- bench
def _bench(args: argparse.Namespace) -> int:
    import torch

    from lightning_txopt.callbacks import FreezeEmbeddings, GradientCheckpointing
    from lightning_txopt.data.text import TextDataModule
    from lightning_txopt.demo import measure_run
    from lightning_txopt.precision import resolve_precision

    gpu = args.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    limit = args.limit if args.limit is not None else (4096 if gpu else 256)
    max_length = args.max_length or (512 if gpu else 128)
    max_tokens = args.max_tokens or (16384 if gpu else 4096)
    model, config = _model_source(args.tiny)
    precision = resolve_precision("auto", accelerator=device)
    combos: list[tuple[str, dict[str, Any], str, list[Any]]] = [
        ("fixed, fp32", dict(strategy="fixed", batch_size=32), "32-true", []),
        ("dynamic, fp32", dict(strategy="dynamic", batch_size=32), "32-true", []),
        ("bucket batch 32, fp32", dict(strategy="bucket", batch_size=32), "32-true", []),
        (f"bucket max_tokens {max_tokens}, fp32", dict(strategy="bucket", max_tokens=max_tokens), "32-true", []),
        (f"bucket max_tokens {max_tokens}, {precision}", dict(strategy="bucket", max_tokens=max_tokens), precision, []),
        ("+ frozen embeddings", dict(strategy="bucket", max_tokens=max_tokens), precision, ["freeze"]),
        ("+ gradient checkpointing", dict(strategy="bucket", max_tokens=max_tokens), precision, ["freeze", "ckpt"]),
    ]
    results = []
    for name, dm_kwargs, prec, extras in combos:
        dm = TextDataModule(None, args.tokenizer, limit=limit, max_length=max_length, seed=args.seed, **dm_kwargs)
        callbacks: list[Any] = []
        if "freeze" in extras:
            callbacks.append(FreezeEmbeddings())
        if "ckpt" in extras:
            callbacks.append(GradientCheckpointing())
        results.append(
            measure_run(
                name,
                datamodule=dm,
                model=model,
                config=config,
                callbacks=callbacks,
                precision=prec,
                accelerator=device,
                max_epochs=1,
                max_steps=args.max_steps,
                enable_progress_bar=False,
                validate=False,
            )
        )
    base = results[0].real_tokens_per_sec or 1.0
    rows = [
        [
            r.name,
            r.real_tokens_per_sec,
            r.real_tokens_per_sec / base,
            r.padding_efficiency,
            r.peak_memory_mib,
            r.optimizer_steps,
        ]
        for r in results
    ]
    table = markdown_table(
        ["combination", "real tokens/s", "x first row", "padding efficiency", "peak memory MiB", "steps"], rows
    )
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"txopt bench on {name}: {limit} texts, max_length {max_length}\n\n{table}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(f"txopt bench on {name}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps([r.as_dict() for r in results], indent=2))
    print(f"\nresults: {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txopt", description="Faster transformer training in PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)

    stats = sub.add_parser("stats", help="length distribution and padding of every batching strategy")
    stats.add_argument("--data", help=".jsonl/.csv/.tsv file or saved HF dataset folder (default: embedded corpus)")
    stats.add_argument("--tokenizer", help="local tokenizer/model folder (default: the demo model's)")
    stats.add_argument("--text-column", default="text")
    group = stats.add_mutually_exclusive_group()
    group.add_argument("--batch-size", type=int)
    group.add_argument("--max-tokens", type=int)
    stats.add_argument("--max-length", type=int, default=512)
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--plot", help="write a PNG chart here")
    stats.add_argument("--json", help="write the table as JSON here")

    sub.add_parser(
        "fit", help="train from a YAML config (LightningCLI); `txopt fit --help` lists every option", add_help=False
    )

    for name, helptext in (
        ("demo", "baseline vs optimised fine-tuning of MiniLM on the embedded corpus"),
        ("bench", "throughput/memory of strategy combinations on this device"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--limit", type=int, help="texts to use (default: all on a GPU, a few hundred on CPU)")
        p.add_argument("--max-length", type=int)
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--max-steps", type=int, default=-1)
        p.add_argument("--tokenizer", help="local tokenizer folder (default: the demo model's)")
        p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
        p.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM (smoke runs)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--output", default=f"txopt_{name}", help="folder for the JSON and chart")
        if name == "demo":
            p.add_argument("--epochs", type=int)
            p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``txopt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return _fit(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        handler = {"stats": _stats, "demo": _demo, "bench": _bench}[args.command]
        return handler(args)
    except _KNOWN_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"txopt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

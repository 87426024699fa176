"""Side by side on one GPU: the Hugging Face Trainer, a plain PyTorch loop, and lightning_txopt, in one process.

    python benchmarks/gpu_compare.py --json docs/results/gpu_compare_h200.json     # H200: about 5 minutes
    python benchmarks/gpu_compare.py --quick                                       # CPU smoke run
    python benchmarks/gpu_compare.py --list                                        # the rows, by name
    python benchmarks/gpu_compare.py --only plain,lightning --repeats 6            # rows (or groups) by name

All rows train a random-init BERT-base shape (12 layers, 768 hidden) sequence classifier (40 classes) on the
embedded corpus, for the same number of batches after a warm-up (an optimizer step each; every second one in the
accumulation row), and report real (non-pad) tokens/s, samples/s, padding efficiency and peak memory. The token ids
are random with each text's real BERT-uncased length (``tests/data/fortune_lengths.npy``) and its real label:
throughput depends on the lengths only. The ``issue15`` rows (not run by default) add a second length distribution,
a Llama-shape decoder, packed varlen attention, static shapes and compile, and record model FLOPs and MFU.

The rows are defined in ``gpu_rows.py``, run by ``gpu_runner.py`` and reported by ``gpu_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from _common import markdown_table, write_outputs
from api_check import ApiProbe
from gpu_report import chart, report
from gpu_rows import GROUPS, Row, Settings, define_rows, groups_of, select, window_error
from gpu_runner import default_peak_tflops, run_rows


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the plain-loop and main Lightning rows this many times, alternating"
    )
    parser.add_argument(
        "--repeat-all",
        action="store_true",
        help="with --repeats: repeat every selected row (ABBA order over all of them), not only the pair",
    )
    parser.add_argument(
        "--match-gib", type=float, default=None, help="peak memory to size a budget to (default: HF row)"
    )
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows (minutes of compilation)")
    parser.add_argument("--compile-warmup", type=int, default=50, help="untimed steps of compiled rows (> one epoch)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 512 texts: a smoke run on CPU")
    parser.add_argument(
        "--only", default="", help="comma-separated row or group names to run (default: the default rows; --list)"
    )
    parser.add_argument("--list", action="store_true", help="print the rows and groups by name, run nothing")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for MFU (default: known GPUs)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--chart", default=None, help="write a PNG chart of real tokens/s and peak memory here")
    parser.add_argument("--chart-from", default=None, help="only draw --chart from an earlier --json file")
    parser.add_argument("--report-from", default=None, help="only print the table of an earlier --json file")
    return parser, parser.parse_args(argv)


def listing(rows: list[Row], probe: ApiProbe) -> str:
    """``--list``: every row's name, title, groups, and what it still needs."""
    table = [
        [
            r.name,
            r.title,
            ", ".join(r.groups) or "-",
            "yes" if r.default else "no",
            "; ".join(probe.missing(r.requires)) or "-",
        ]
        for r in rows
    ]
    groups = [[g, GROUPS[g], ", ".join(names)] for g, names in groups_of(rows).items()]
    return "\n\n".join(
        [
            markdown_table(["name", "row", "groups", "default", "missing API"], table),
            markdown_table(["group", "what", "rows"], groups),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    if args.chart_from:
        chart(json.loads(Path(args.chart_from).read_text()), args.chart)
        return
    if args.report_from:
        print(report(json.loads(Path(args.report_from).read_text())))
        return
    settings = Settings.from_args(args)
    if settings.peak_tflops is None:
        settings = dataclasses.replace(settings, peak_tflops=default_peak_tflops())
    rows = define_rows(settings)
    probe = ApiProbe()
    if args.list:
        print(listing(rows, probe))
        return
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    try:
        chosen = select(rows, only, include=("compile",) if args.compile else ())
    except ValueError as bad:
        parser.error(str(bad))
    todo, skipped = probe.split(chosen)
    for message in skipped.values():
        print(message, file=sys.stderr, flush=True)
    if not todo:
        parser.error(f"none of the selected rows can run here: {'; '.join(skipped.values())}")
    for row in todo:  # fail before any GPU time is spent, not when the row's turn comes
        if error := window_error(row.warmup_steps(settings), settings.steps, row.accumulate):
            parser.error(f"row {row.name!r}: {error}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_rows(todo, settings, args.repeats, args.repeat_all, skipped)
    write_outputs(result, report(result), args.json, args.chart, chart)


if __name__ == "__main__":
    main()

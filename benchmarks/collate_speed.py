"""Host time per training batch of ``BucketDataModule``'s loader: samples read as columns against one by one.

    python benchmarks/collate_speed.py [--tokens 16384 65536] [--data corpus lognormal] [--repeats 5] [--quick]

The loader runs as Lightning runs it by default, in the training process (``num_workers=0``), so every millisecond
here is a millisecond the training loop's host thread does not spend launching the model's kernels. For each length
distribution, strategy and token budget, one epoch of training batches is iterated ``--repeats`` times with
``flat_samples=False`` (each batch's samples collated one by one: Python work per sample) and ``flat_samples=True``
(the default: :class:`~lightning_txopt.data.flat.FlatSamples` gathers each batch from columns built once); the table
gives the best epoch's milliseconds per batch. Before timing, both paths' first epochs are compared tensor by tensor:
the script exits 1 if any batch differs. ``--quick``: 512 texts, for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from _common import environment, markdown_table
from workloads import DATA, build_workload

from lightning_txopt import BucketDataModule

LAYOUTS: dict[str, dict[str, Any]] = {
    "bucketed": {"strategy": "bucket"},
    "packed, static shapes": {"strategy": "packed", "static_shapes": True},
}


def loader(samples: list[dict[str, Any]], tokens: int, flat: bool, layout: dict[str, Any]) -> Any:
    dm = BucketDataModule(samples, pad_token_id=0, max_tokens=tokens, seed=0, flat_samples=flat, **layout)
    dm.setup("fit")
    return dm.train_dataloader()


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if list(x) != list(y):
            return False
        for key in x:
            if isinstance(x[key], torch.Tensor):
                if x[key].dtype != y[key].dtype or not torch.equal(x[key], y[key]):
                    return False
            elif x[key] != y[key]:
                return False
    return True


def ms_per_batch(dl: Any, repeats: int) -> tuple[float, int]:
    """The best of ``repeats`` epochs, in milliseconds per batch (planning the epoch included), and the batch count."""
    best, n = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in dl)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=DATA)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="512 texts: a smoke run")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows, records, differ = [], [], []
    for data in args.data:
        samples = build_workload("bert", data, args.quick).samples
        for name, layout in LAYOUTS.items():
            for tokens in args.tokens:
                one_by_one, columns = (loader(samples, tokens, flat, layout) for flat in (False, True))
                if not same(list(one_by_one), list(columns)):
                    differ.append(f"{data}, {name}, {tokens}")
                slow, n = ms_per_batch(one_by_one, args.repeats)
                fast, _ = ms_per_batch(columns, args.repeats)
                title = f"{data}, {name}, max_tokens {tokens}"
                rows.append([title, n, f"{slow:.3f}", f"{fast:.3f}", f"{slow / fast:.2f}"])
                records.append({"row": title, "batches": n, "one_by_one_ms": slow, "columns_ms": fast})
    header = ["loader (num_workers=0)", "batches", "ms/batch, one by one", "ms/batch, columns", "x faster"]
    print(markdown_table(header, rows))
    print(f"\nbest of {args.repeats} epochs per row; {environment()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": records}, f, indent=1)
    if differ:
        print(f"batches differ between the two paths: {differ}", file=sys.stderr)
        return 1
    print("both paths gave the same batches, tensor for tensor, in every row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

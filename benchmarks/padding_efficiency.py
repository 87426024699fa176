"""Padding efficiency (real / processed tokens) of each batching strategy on the embedded corpus, in one run.

    python benchmarks/padding_efficiency.py

Lengths: BERT uncased WordPiece (the demo model's tokenizer), truncated at 512, no rounding of lengths.
The transformers row is the Trainer's ``group_by_length`` recipe (``get_length_grouped_indices``, megabatches of 50).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from _common import corpus_lengths, environment, markdown_table
from transformers.trainer_pt_utils import get_length_grouped_indices

from lightning_txopt.data.planning import plan_epoch
from lightning_txopt.data.report import padding_report


def hf_length_grouped(lengths: np.ndarray, batch_size: int, seed: int) -> tuple[int, int]:
    order = np.asarray(
        get_length_grouped_indices(lengths.tolist(), batch_size, generator=torch.Generator().manual_seed(seed))
    )
    batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    return len(batches), int(sum(len(b) * lengths[b].max() for b in batches))


def main() -> None:
    lengths = corpus_lengths()
    real = int(lengths.sum())
    print(
        f"Corpus: {lengths.size:,} samples, {real:,} real tokens, "
        f"median {int(np.median(lengths))}, max {lengths.max()}\n"
    )
    rows: list[list[object]] = []
    for r in padding_report(lengths, batch_size=32, max_length=512, strategies=("fixed", "dynamic")):
        rows.append([f"{r.strategy}, batch 32", r.batches, r.processed_tokens, r.efficiency])
    n, processed = hf_length_grouped(lengths, 32, seed=0)
    rows.append(["transformers group_by_length (megabatches), batch 32", n, processed, real / processed])
    for pool in (None, 4096):
        plan = plan_epoch(lengths, batch_size=32, seed=0, epoch=0, pool_size=pool)
        p = int(plan.padded_tokens(lengths).sum())
        rows.append([f"lightning_txopt bucket, batch 32, pool {pool or 'global'}", plan.num_batches, p, real / p])
    min_batches = math.ceil(real / 16384)
    for strategy in ("dynamic", "bucket", "packed"):
        r = padding_report(lengths, max_tokens=16384, max_length=512, strategies=(strategy,))[0]
        rows.append(
            [f"{strategy}, max_tokens 16384 (min {min_batches} batches)", r.batches, r.processed_tokens, r.efficiency]
        )
    for world in (2, 3):
        plan = plan_epoch(lengths, max_tokens=16384, seed=0, epoch=0, num_replicas=world)
        cost = plan.padded_tokens(lengths)[plan.schedule]
        imbalance = float((cost.max(1) / cost.min(1)).mean())
        p = int(cost.sum())
        rows.append(
            [
                f"bucket, max_tokens 16384, {world} ranks (max/min step cost {imbalance:.3f})",
                plan.num_batches,
                p,
                real / p,
            ]
        )
    for world in (2, 3):
        plan = plan_epoch(lengths, batch_size=32, seed=0, epoch=0, num_replicas=world)
        cost = plan.padded_tokens(lengths)[plan.schedule]
        imbalance = float((cost.max(1) / cost.min(1)).mean())
        p = int(cost.sum())
        rows.append(
            [f"bucket, batch 32, {world} ranks (max/min step cost {imbalance:.3f})", plan.num_batches, p, real / p]
        )
    print(markdown_table(["batching", "batches", "processed tokens", "efficiency"], rows))
    print(f"\n{environment()}")


if __name__ == "__main__":
    main()

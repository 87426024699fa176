"""Time to plan one shuffled epoch of length-grouped batches, against transformers' recipe, in one run.

    python benchmarks/plan_speed.py [--n 10000000] [--repeats 3]

Lengths are drawn (with replacement) from the embedded corpus's distribution. transformers'
``get_length_grouped_indices`` (the Trainer's ``group_by_length``) only supports a sample count per batch, so the
head-to-head row uses batch_size=32; the token-budget row is ours alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import corpus_lengths, environment, markdown_table
from transformers.trainer_pt_utils import get_length_grouped_indices

from lightning_txopt.data.planning import plan_epoch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = np.random.default_rng(0).choice(corpus_lengths(), args.n).astype(np.int64)
    lengths_list = lengths.tolist()  # the HF function indexes a Python sequence
    g = torch.Generator().manual_seed(0)

    t_hf = best_of(lambda: get_length_grouped_indices(lengths_list, 32, generator=g), args.repeats)
    t_ours = best_of(lambda: plan_epoch(lengths, batch_size=32, seed=0, epoch=1), args.repeats)
    t_budget = best_of(lambda: plan_epoch(lengths, max_tokens=16384, seed=0, epoch=1), args.repeats)
    t_ddp = best_of(lambda: plan_epoch(lengths, max_tokens=16384, seed=0, epoch=1, num_replicas=8), args.repeats)
    rows = [
        ["transformers get_length_grouped_indices, batch 32", t_hf, 1.0],
        ["lightning_txopt plan_epoch, batch 32", t_ours, t_hf / t_ours],
        ["lightning_txopt plan_epoch, max_tokens 16384", t_budget, t_hf / t_budget],
        ["lightning_txopt plan_epoch, max_tokens 16384, 8 ranks", t_ddp, t_hf / t_ddp],
    ]
    print(f"Planning one epoch of {args.n:,} lengths (best of {args.repeats})\n")
    print(markdown_table(["planner", "seconds", "speed-up vs transformers"], rows))
    print(f"\n{environment()}")


if __name__ == "__main__":
    main()

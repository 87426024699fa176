"""Time to plan one shuffled epoch of length-grouped batches, against transformers' recipe, in one run.

    python benchmarks/plan_speed.py [--n 10000000] [--repeats 3] [--pack-n 1000000 10000000]

Lengths are drawn (with replacement) from the embedded corpus's distribution. Three tables:

1. planning one epoch: transformers' ``get_length_grouped_indices`` (the Trainer's ``group_by_length``) only supports
   a sample count per batch, so the head-to-head row uses batch_size=32; the token-budget rows are ours alone;
2. packing (issue #15): ``best_fit_decreasing`` into rows of 512 tokens, and ``plan_epoch`` with ``pack_length=512``,
   against the bucket planner (``plan_epoch(max_tokens=16384)``) on the same lengths, at each ``--pack-n``
   (target: packing 10M lengths within 5x the bucket planner's time);
3. a sampler end to end (issue #15): constructing a ``BucketBatchSampler`` over ``--n`` lengths and iterating one
   epoch of batches, against ``plan_epoch`` alone and against transformers (``get_length_grouped_indices`` alone,
   and its ``LengthGroupedSampler`` batched by a ``BatchSampler``, as the Trainer iterates it) when importable
   (target: the sampler end to end >= 5x ``get_length_grouped_indices``).

The planners are imported from ``lightning_txopt.data.planning``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np
import torch
from _common import corpus_lengths, environment, markdown_table

from lightning_txopt.data import BucketBatchSampler
from lightning_txopt.data.planning import best_fit_decreasing, plan_epoch

BUDGET = 16384
PACK_LENGTH = 512
TARGET_PACKING = 5.0  # packing 10M lengths within 5x the bucket planner
TARGET_SAMPLER = 5.0  # the sampler end to end >= 5x transformers


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The shortest of ``repeats`` timed calls, and the first call's result."""
    times, first = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = out
    return min(times), first


def transformers_planner() -> tuple[Any, Any] | None:
    """``(get_length_grouped_indices, LengthGroupedSampler)``, or ``None`` where transformers does not have them."""
    try:
        from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
    except ImportError:
        return None
    return get_length_grouped_indices, LengthGroupedSampler


def count(batches: Iterable[Any]) -> int:
    """Consume an epoch of batches, as a training loop would, keeping none."""
    n = 0
    for _ in batches:
        n += 1
    return n


def planning_table(lengths: np.ndarray, repeats: int, hf: tuple[Any, Any] | None) -> list[list[Any]]:
    rows: list[list[Any]] = []
    t_hf: float | None = None
    if hf is not None:
        lengths_list = lengths.tolist()  # the HF function indexes a Python sequence
        g = torch.Generator().manual_seed(0)
        t_hf, _ = best_of(lambda: hf[0](lengths_list, 32, generator=g), repeats)
        rows.append(["transformers get_length_grouped_indices, batch 32", t_hf, 1.0])
    t_ours, _ = best_of(lambda: plan_epoch(lengths, batch_size=32, seed=0, epoch=1), repeats)
    ref = t_ours if t_hf is None else t_hf
    t_budget, _ = best_of(lambda: plan_epoch(lengths, max_tokens=BUDGET, seed=0, epoch=1), repeats)
    t_ddp, _ = best_of(lambda: plan_epoch(lengths, max_tokens=BUDGET, seed=0, epoch=1, num_replicas=8), repeats)
    rows += [
        ["lightning_txopt plan_epoch, batch 32", t_ours, ref / t_ours],
        [f"lightning_txopt plan_epoch, max_tokens {BUDGET}", t_budget, ref / t_budget],
        [f"lightning_txopt plan_epoch, max_tokens {BUDGET}, 8 ranks", t_ddp, ref / t_ddp],
    ]
    return rows


def packing_table(pool: np.ndarray, sizes: list[int], repeats: int) -> tuple[list[list[Any]], list[str]]:
    rows, verdicts = [], []
    for n in sizes:
        lengths = np.random.default_rng(1).choice(pool, n).astype(np.int64)
        ids = np.arange(n, dtype=np.int64)
        t_bucket, plan = best_of(partial(plan_epoch, lengths, max_tokens=BUDGET, seed=0, epoch=1), repeats)
        bfd = partial(best_fit_decreasing, lengths, ids, PACK_LENGTH, rng=np.random.default_rng(0))
        t_bfd, (order, offsets) = best_of(bfd, repeats)
        if order.size != n:
            raise RuntimeError(f"best_fit_decreasing returned {order.size} of {n} samples.")
        pack = partial(plan_epoch, lengths, max_tokens=BUDGET, pack_length=PACK_LENGTH, seed=0, epoch=1)
        t_packed, packed = best_of(pack, repeats)
        rows += [
            [f"plan_epoch, max_tokens {BUDGET} (bucket planner)", n, t_bucket, plan.num_batches, "batches", 1.0],
            [f"best_fit_decreasing, rows of {PACK_LENGTH}", n, t_bfd, offsets.size - 1, "rows", t_bfd / t_bucket],
            [
                f"plan_epoch, pack_length {PACK_LENGTH}, max_tokens {BUDGET}",
                n,
                t_packed,
                packed.num_batches,
                "batches",
                t_packed / t_bucket,
            ],
        ]
        ratio = t_packed / t_bucket
        met = "met" if ratio <= TARGET_PACKING else "not met"
        verdicts.append(
            f"packing {n:,} lengths: {ratio:.2f}x the bucket planner (target <= {TARGET_PACKING:g}x: {met})"
        )
    return rows, verdicts


def sampler_table(lengths: np.ndarray, repeats: int, hf: tuple[Any, Any] | None) -> tuple[list[list[Any]], str]:
    t_b32, n_b32 = best_of(lambda: count(BucketBatchSampler(lengths, batch_size=32, seed=0)), repeats)
    t_tokens, n_tokens = best_of(lambda: count(BucketBatchSampler(lengths, max_tokens=BUDGET, seed=0)), repeats)
    t_plan, plan = best_of(lambda: plan_epoch(lengths, batch_size=32, seed=0, epoch=0), repeats)
    rows: list[list[Any]] = []
    ref = t_b32
    if hf is not None:
        get_indices, grouped_sampler = hf
        lengths_list = lengths.tolist()
        g = torch.Generator().manual_seed(0)
        t_hf, indices = best_of(lambda: get_indices(lengths_list, 32, generator=g), repeats)

        def hf_end_to_end() -> int:
            sampler = grouped_sampler(32, lengths=lengths_list, generator=torch.Generator().manual_seed(0))
            return count(torch.utils.data.BatchSampler(sampler, 32, drop_last=False))

        t_hf_e2e, n_hf = best_of(hf_end_to_end, repeats)
        ref = t_hf
        rows += [
            ["transformers get_length_grouped_indices, batch 32 (planning only)", t_hf, -(-len(indices) // 32), 1.0],
            ["transformers LengthGroupedSampler + BatchSampler, batch 32, one epoch", t_hf_e2e, n_hf, t_hf / t_hf_e2e],
        ]
    rows += [
        ["lightning_txopt plan_epoch, batch 32 (planning only)", t_plan, plan.num_batches, ref / t_plan],
        ["lightning_txopt BucketBatchSampler, batch 32: construct + one epoch", t_b32, n_b32, ref / t_b32],
        [
            f"lightning_txopt BucketBatchSampler, max_tokens {BUDGET}: construct + one epoch",
            t_tokens,
            n_tokens,
            ref / t_tokens,
        ],
    ]
    if hf is None:
        return rows, "transformers' length-grouped sampler is not importable: no head-to-head"
    speedup = ref / t_b32
    met = "met" if speedup >= TARGET_SAMPLER else "not met"
    return rows, (
        f"BucketBatchSampler end to end (batch 32): {speedup:.2f}x transformers' get_length_grouped_indices "
        f"(target >= {TARGET_SAMPLER:g}x: {met})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000, help="lengths of tables 1 and 3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pack-n", type=int, nargs="*", default=[1_000_000, 10_000_000], help="lengths of table 2 (none: skip it)"
    )
    args = parser.parse_args()
    pool = corpus_lengths()
    lengths = np.random.default_rng(0).choice(pool, args.n).astype(np.int64)
    hf = transformers_planner()
    speed_of = "speed-up vs transformers" if hf else "speed-up vs plan_epoch, batch 32 (no transformers)"

    print(f"Planning one epoch of {args.n:,} lengths (best of {args.repeats})\n")
    print(markdown_table(["planner", "seconds", speed_of], planning_table(lengths, args.repeats, hf)))
    if args.pack_n:
        rows, verdicts = packing_table(pool, args.pack_n, args.repeats)
        print(
            f"\nPacking into rows of {PACK_LENGTH} against the bucket planner, same lengths (best of {args.repeats})\n"
        )
        print(markdown_table(["planner", "lengths", "seconds", "out", "unit", "x bucket planner time"], rows))
        print("\n" + "\n".join(verdicts))
    rows, verdict = sampler_table(lengths, args.repeats, hf)
    print(f"\nA sampler end to end over {args.n:,} lengths (best of {args.repeats})\n")
    head = "speed-up vs get_length_grouped_indices" if hf else "speed-up vs BucketBatchSampler, batch 32"
    print(markdown_table(["path", "seconds", "batches", head], rows))
    print(f"\n{verdict}")
    print(f"\n{environment()}")


if __name__ == "__main__":
    main()

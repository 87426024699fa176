"""What transformers' host read of the padding mask costs an eager bucketed BERT step (pre-collated batches).

    python benchmarks/mask_sync.py            # H200, BERT-base shape, bucketed batches of 16,384 tokens (~1 minute)
    python benchmarks/mask_sync.py --quick    # CPU smoke run (tiny BERT)

Transformers' SDPA mask builder checks ``padding_mask.all()`` in every forward pass, to drop the mask of a batch
without padding. On a GPU that read makes the host wait for the device once per step. Cases, each on the same 50
pre-collated bucketed batches (``packing_step.Case``), 4 windows in ABBA order:

* ``2d``: the 2-D padding mask, transformers builds the 4-D mask (and reads the mask on the host);
* ``4d``: the same mask given as a 4-D boolean key mask ``(batch, 1, 1, keys)``, which transformers passes to SDPA
  as it is (no host read; the same attention, checked in fp32 before timing);
* ``2d+spin1.5``, ``4d+spin1.5``: the same with 1.5 ms of busy host work after every step, about what Lightning's loop
  adds per step (``host_overhead.py``): where the host waits for the device every step, that work adds to the step.

Then the sync debug mode's warnings for one step of each, and 5 profiled steps (device-busy against wall time).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import packing_step as ps
import torch

SPIN_MS = 1.5


def _key_mask(mask: torch.Tensor) -> torch.Tensor:
    """The 2-D padding mask as the 4-D boolean key mask ``(batch, 1, 1, keys)`` transformers passes to SDPA as is."""
    return mask[:, None, None, :].bool()


def _case(samples: list[dict[str, Any]], tokens: int, config: dict[str, Any], name: str) -> ps.Case:
    case = ps.Case(name, samples, tokens, config, dict(strategy="bucket"), dict(attn_implementation="sdpa"))
    if name.startswith("4d"):
        for batch in case.batches:
            batch["attention_mask"] = _key_mask(batch["attention_mask"])
    if name.endswith(f"spin{SPIN_MS}"):
        inner = case.step

        def step() -> int:
            real = inner()
            until = time.perf_counter() + SPIN_MS / 1e3
            while time.perf_counter() < until:
                pass
            return real

        case.step = step  # type: ignore[method-assign]
    return case


def _sync_warnings(case: ps.Case) -> list[str]:
    torch.cuda.set_sync_debug_mode(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.step()
            case.sync()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0][:120] for w in caught if "synchronizing" in str(w.message)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.backends.cuda.enable_cudnn_sdp(False)
    rng = np.random.default_rng(0)
    lengths = np.load(ps.LENGTHS)[: 600 if args.quick else None]
    samples = [{"input_ids": rng.integers(1000, 30000, int(n)), "labels": int(rng.integers(40))} for n in lengths]
    config = ps.TINY if args.quick else ps.BERT_BASE
    tokens = 2048 if args.quick else 16384
    names = ["2d", "4d", f"2d+spin{SPIN_MS}", f"4d+spin{SPIN_MS}"]
    cases = [_case(samples, tokens, config, name) for name in names]

    module = cases[0].module.eval()  # the 4-D key mask attends as the 2-D mask does (fp32, no dropout)
    with torch.no_grad():
        batch = cases[0].batches[3]
        two = module.forward_logits(batch)
        four = module.forward_logits(dict(batch, attention_mask=_key_mask(batch["attention_mask"])))
    difference = float((two - four).abs().max())
    print(f"max |2d - 4d| logits, fp32: {difference:.3g} (largest logit {float(two.abs().max()):.3g})")
    module.train()

    for case in cases:
        for _ in range(3 if args.quick else 15):
            case.step()
        case.sync()
    syncs = {c.name: _sync_warnings(c) for c in cases[:2]} if torch.cuda.is_available() else {}
    for name, found in syncs.items():
        print(f"{name}: {len(found)} synchronizing call(s) in one step")
    steps = 3 if args.quick else args.steps
    for i in [0, 1, 2, 3, 3, 2, 1, 0] * (1 if args.quick else 2):
        cases[i].timed(steps)
    base = float(np.median(cases[0].rates))
    rows: list[dict[str, Any]] = []
    print("\n| case | real tokens/s (median) | x 2d | windows |\n| --- | --- | --- | --- |")
    for case in cases:
        median = float(np.median(case.rates))
        rows.append(dict(name=case.name, median=median, ratio=median / base, runs=[round(r) for r in case.rates]))
        print(f"| {case.name} | {median:,.0f} | {median / base:.3f} | {' '.join(f'{r:,.0f}' for r in case.rates)} |")
    profiles = [ps.profile(c) for c in cases[:2]] if torch.cuda.is_available() else []
    for p in profiles:
        print(f"{p['name']}: profiled wall {p['wall_ms']} ms, device busy {p['device_busy_ms']} ms per step")
    if args.json:
        result = dict(fp32_max_difference=difference, sync_warnings=syncs, rows=rows, profiles=profiles)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far one optimizer step is from the exact window gradient: Lightning's accumulation against ours, one run.

    python benchmarks/accumulation_error.py

The set-up of tests/callbacks/test_accumulation.py: a tiny BERT classifier, SGD(lr=1) so that a step's parameter
change is minus the applied gradient, token-budget micro-batches (uneven sample counts), a third of the labels
ignored (-100), factor 3 with an incomplete last window, 2 epochs on CPU. For each optimizer step the relative error
||applied - exact|| / ||exact|| is computed against an independent full-window gradient.

* "mean" target: the mean of the window's micro-batch mean losses (what accumulation is meant to compute);
* "tokens" target: the sum of item losses over the window divided by the window's item count (what one big batch
  with the same items computes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment, markdown_table

from lightning_txopt.callbacks import AccumulationScheduler
from tests.callbacks.test_accumulation import SumLossModule, _dm, _reference_grad
from tests.fsdp_helpers import windows
from tests.helpers import cpu_trainer


def errors(module: SumLossModule, target: str) -> list[float]:
    out = []
    for start, end, before, after in windows(module.snapshots):
        ref = _reference_grad(before, module.micro_batches[start:end], target)
        num = sum(float(((before[n] - after[n]) - g).pow(2).sum()) for n, g in ref.items()) ** 0.5
        den = sum(float(g.pow(2).sum()) for g in ref.values()) ** 0.5
        out.append(num / den)
    return out


def main() -> None:
    rows = []
    for target in ("mean", "tokens"):
        native = SumLossModule(reduction="mean")
        cpu_trainer(max_epochs=2, accumulate_grad_batches=3).fit(native, datamodule=_dm())
        ours = SumLossModule(reduction="sum" if target == "tokens" else "mean")
        cpu_trainer(max_epochs=2, callbacks=[AccumulationScheduler({0: 3}, normalize=target)]).fit(
            ours, datamodule=_dm()
        )
        for name, module in (
            ("Lightning accumulate_grad_batches=3 (mean loss)", native),
            (f"AccumulationScheduler({{0: 3}}, normalize='{target}')", ours),
        ):
            e = errors(module, target)
            sizes = [end - start for start, end, _, _ in windows(module.snapshots)]
            last = [err for err, size in zip(e, sizes, strict=True) if size < 3]
            worst_last = f"{max(last):.2e}" if last else "n/a"
            rows.append([target, name, len(e), f"{max(e):.2e}", f"{sum(e) / len(e):.2e}", worst_last])
    print("Relative error of each optimizer step's gradient against the exact window gradient\n")
    print(
        markdown_table(
            ["target", "accumulation", "steps", "max error", "mean error", "max error, incomplete last window"], rows
        )
    )
    print(f"\n{environment()}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()

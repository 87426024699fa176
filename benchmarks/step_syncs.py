"""Host syncs and host work in the compiled packed Lightning step: what a training step waits on besides the GPU.

    python step_syncs.py --data corpus --tokens 16384    # H200: about 2 minutes (one compile)
    python step_syncs.py --quick                          # CPU smoke run: tiny model, eager, no sync check

The row is ``gpu_compare.py``'s ``packed_static_compile.<data>.<tokens>``: ``BucketDataModule(strategy="packed",
static_shapes=True)``, ``TransformerModule(attn_implementation="auto", compile=True)``, ``Trainer.fit`` over the live
loader. After ``--warmup`` steps (compilation happens there) it runs ``--checked`` steps under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every operation that makes the host wait for the device
(``.item()``, a copy to the host, a blocking transfer); each warning is counted with the Python stack that made it.
Then ``--profiled`` steps under ``torch.profiler``: host time per step of the top operators, kernel launches per
step, and the copies and synchronize calls the profiler saw. The row's tokens/s include the checked and profiled steps
(both slow the host down): it is not a throughput figure; ``gpu_compare.py`` times the row.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import traceback
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from gpu_rows import Settings
from gpu_runner import lightning_row
from workloads import build_workload

#: (warning text, the Python stack that caused it) -> how many times
SyncStacks = collections.Counter[tuple[str, str]]


def _stack_of_warning() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames[-9:]))


class StepProbe(pl.Callback):
    """Checks steps ``warmup .. warmup + checked`` for host syncs, then profiles the next ``profiled`` steps."""

    def __init__(self, warmup: int, checked: int, profiled: int) -> None:
        self.warmup, self.checked, self.profiled = warmup, checked, profiled
        self.step = 0
        self.syncs: SyncStacks = collections.Counter()
        self.profile: dict[str, Any] = {}
        self._prof: Any = None
        self._show: Any = None
        self._t0 = 0.0

    def _record(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.syncs[(str(message)[:100], _stack_of_warning())] += 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        cuda = torch.cuda.is_available()
        start_profile = self.warmup + self.checked
        if self.step == self.warmup and cuda and self.checked:
            self._show = warnings.showwarning
            warnings.showwarning = self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if self.step == start_profile:
            if cuda and self.checked:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = self._show
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        if self.step == start_profile + self.profiled and self._prof is not None:
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self.profile = summarize(self._prof.key_averages(), self.profiled, wall)
            self._prof = None
        self.step += 1


LAUNCHES = ("cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernel", "cudaLaunchKernelExC")


def summarize(averages: Any, steps: int, wall: float) -> dict[str, Any]:
    """Per step: the wall time (profiler on), the 20 operators with most host time, launches, copies and syncs."""
    per_step = [{"name": e.key, "host_ms": e.cpu_time_total / 1e3 / steps, "calls": e.count / steps} for e in averages]
    top = sorted(per_step, key=lambda e: -e["host_ms"])[:20]
    launches = sum(e["calls"] for e in per_step if e["name"] in LAUNCHES)
    copies = [e for e in per_step if "memcpy" in e["name"].lower()]
    syncs = [e for e in per_step if "synchronize" in e["name"].lower()]
    return {
        "wall_ms_per_step": wall * 1e3 / steps,
        "kernel_launches_per_step": launches,
        "top_host_ops": top,
        "copies": copies,
        "synchronize_calls": syncs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("corpus", "lognormal"), default="corpus")
    parser.add_argument("--tokens", type=int, default=16384, help="max_tokens of the packed static batches")
    parser.add_argument("--warmup", type=int, default=52, help="steps before the checked ones (compile: 50)")
    parser.add_argument("--checked", type=int, default=3, help="steps under the sync check (CUDA only)")
    parser.add_argument("--profiled", type=int, default=10, help="steps under the profiler")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, eager, 2048 tokens")
    args = parser.parse_args()
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs a CUDA device (the sync check and the compiled row); use --quick for a CPU smoke run")
    tokens = 2048 if args.quick else args.tokens
    warmup = min(args.warmup, 2) if args.quick else args.warmup
    settings = Settings(steps=2, warmup=8, max_tokens=tokens, compile_warmup=50, quick=args.quick)
    workload = build_workload("bert", args.data, args.quick)
    probe = StepProbe(warmup, args.checked, args.profiled)
    row = lightning_row(
        "step_syncs",
        workload,
        settings,
        warmup=warmup + args.checked + args.profiled,
        callbacks=lambda: [probe],
        strategy="packed",
        max_length=512,
        max_tokens=tokens,
        static_shapes=True,
        attn_implementation="auto",
        module_compile=not args.quick,
    )
    p = probe.profile
    print(f"{args.data} lengths, packed static shapes, {tokens} tokens per batch, compile={not args.quick}:")
    print(f"graphs compiled: {row.get('graphs')}; padding efficiency {row['padding_efficiency']:.3f}")
    if torch.cuda.is_available():
        print(f"host syncs in {args.checked} checked steps: {sum(probe.syncs.values())}")
        for (message, where), n in probe.syncs.most_common(20):
            print(f"  x{n}: {message}\n      {where}")
    print(
        f"profiled {args.profiled} steps: {p['wall_ms_per_step']:.2f} ms per step (profiler on), "
        f"{p['kernel_launches_per_step']:.0f} kernel launches per step"
    )
    for e in p["top_host_ops"]:
        print(f"  host {e['host_ms']:8.3f} ms/step  calls/step {e['calls']:7.1f}  {e['name'][:90]}")
    for e in p["copies"] + p["synchronize_calls"]:
        print(f"  {e['name']}: {e['calls']:.1f} per step, host {e['host_ms']:.3f} ms")


if __name__ == "__main__":
    main()

"""Scaling of lightning_txopt's token-budget training over several devices with DDP (issue: multi-GPU run).

    python benchmarks/multi_gpu.py --devices 2 --json docs/results/multi_gpu_h200x2.json   # 2 GPUs, NCCL
    python benchmarks/multi_gpu.py --quick --devices 2                                      # CPU smoke run (gloo)

Rows: the BucketDataModule + bf16-mixed Lightning row of ``gpu_compare.py`` on 1 device and on N devices
(``strategy="ddp_spawn"``: each rank writes its counts to a temporary folder, the parent sums them). Reports real
tokens/s over all ranks, per device, scaling efficiency ``tokens/s(N) / (N * tokens/s(1))``, equal batch counts per
rank, and the sampler's per-step padded-cost imbalance (max over ranks / min over ranks, averaged over steps).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import environment, markdown_table
from gpu_runner import CountingCollator, CountingDataModule, Window
from workloads import bert_config, corpus_samples

from lightning_txopt.data.planning import plan_epoch
from lightning_txopt.module import TransformerModule


class _RankWindow(pl.Callback):
    """Counts this rank's timed steps (CPU-side, from the collator) and writes them to ``folder/rank{r}.json``."""

    def __init__(self, folder: str, warmup: int, steps: int, counter: CountingCollator) -> None:
        self.folder, self.warmup, self.steps, self.counter = folder, warmup, steps, counter
        self.window: Window | None = None
        self.step = 0
        self.batches = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.window = Window(self.warmup, self.steps)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        assert self.window is not None
        self.window.batch(self.step, *self.counter.pending.pop(0))
        self.step += 1
        self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.window is not None
        self.window.end()
        w = self.window
        out = {
            "real": w.real,
            "processed": w.processed,
            "samples": w.samples,
            "seconds": w.t1 - w.t0,
            "batches": self.batches,
            "batches_per_epoch": trainer.num_training_batches,
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


class _NoCudnnAttention(pl.Callback):
    """Turns PyTorch's cuDNN attention backend off in every process (ddp_spawn children too): it builds a plan for
    each new batch shape (123 ms each on the H200, ``shape_cost.py``), which would swamp a short timed window."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.backends.cuda.enable_cudnn_sdp(False)


def run(samples: list[dict], args: argparse.Namespace, devices: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    dm = CountingDataModule(samples, pad_token_id=0, max_tokens=args.max_tokens, seed=0)
    counter = dm.counter
    torch.manual_seed(0)
    module = TransformerModule(config=bert_config(args.quick), num_labels=40)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            accelerator="cuda" if cuda else "cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            precision="bf16-mixed" if cuda else "32-true",
            max_steps=args.warmup + args.steps,
            callbacks=[
                _RankWindow(folder, args.warmup, args.steps, counter),
                *([_NoCudnnAttention()] if args.no_cudnn_attention else []),
            ],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=dm)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(devices)]
    seconds = max(r["seconds"] for r in ranks)
    real = sum(r["real"] for r in ranks)
    return {
        "devices": devices,
        "real_tokens_per_s": real / seconds,
        "per_device": real / seconds / devices,
        "padding_efficiency": real / sum(r["processed"] for r in ranks),
        "batches_per_rank": [r["batches_per_epoch"] for r in ranks],
        "seconds": seconds,
    }


def imbalance(samples: list[dict], max_tokens: int, world: int) -> float:
    lengths = np.array([len(s["input_ids"]) for s in samples])
    plan = plan_epoch(lengths, max_tokens=max_tokens, num_replicas=world, seed=0)
    cost = plan.padded_tokens(lengths)[plan.schedule]
    return float((cost.max(1) / cost.min(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--no-cudnn-attention", action="store_true", help="SDPA without the cuDNN backend (no per-shape plan cost)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.max_tokens = min(args.steps, 3), min(args.warmup, 1), min(args.max_tokens, 2048)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    samples = corpus_samples(512 if args.quick else None)
    single = run(samples, args, 1)
    multi = run(samples, args, args.devices)
    efficiency = multi["real_tokens_per_s"] / (args.devices * single["real_tokens_per_s"])
    rows = [
        [
            f"{r['devices']} device(s)",
            r["real_tokens_per_s"],
            r["per_device"],
            r["padding_efficiency"],
            ", ".join(str(b) for b in r["batches_per_rank"]),
        ]
        for r in (single, multi)
    ]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\n{device}, BERT-base shape{' (quick: tiny)' if args.quick else ''}, max_tokens={args.max_tokens}, "
        f"{args.steps} timed steps per rank after {args.warmup}"
        f"{', cuDNN attention off' if args.no_cudnn_attention else ''}\n"
    )
    print(
        markdown_table(
            ["run", "real tokens/s (all ranks)", "per device", "padding efficiency", "batches per epoch, each rank"],
            rows,
        )
    )
    skew = imbalance(samples, args.max_tokens, args.devices)
    print(
        f"\nscaling efficiency at {args.devices} devices: {efficiency:.3f}; sampler per-step cost imbalance "
        f"(max/min over ranks, mean over steps): {skew:.3f}\n\n{environment()}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "single": single,
                    "multi": multi,
                    "scaling_efficiency": efficiency,
                    "imbalance": skew,
                    "settings": vars(args),
                    "environment": environment(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

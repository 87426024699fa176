"""The chunked LM loss on a whole model: ``Trainer.fit`` of a Llama-shape causal LM, unchunked vs chunked.

    python benchmarks/chunked_loss_model.py --json docs/results/chunked_loss_model_h200.json     # H200
    python benchmarks/chunked_loss_model.py --quick                                                # CPU smoke run

The model is ``token_budget.py``'s ``llama-350m`` (18 x 1024, GQA 16/8 heads, SwiGLU 2816, vocab 128,256, tied
embeddings: 343M parameters), random init, on the corpus's real lengths with random ids, bucketed batches of
``--tokens`` (16,384) tokens, bf16-mixed, TransformerModule's fused AdamW. Two settings of the same module:

* ``unchunked``: ``TransformerModule(task="causal-lm", loss_chunk_size=None)``: the full ``(tokens, vocab)`` logits
  and ``F.cross_entropy`` over them (the module before the chunked loss);
* ``chunked``: the default ``loss_chunk_size`` (:data:`~lightning_txopt.losses.DEFAULT_CHUNK_SIZE`).

Each run is a fresh ``Trainer.fit`` in this process (the allocator's cache emptied between runs) of ``--warmup``
steps then ``--steps`` timed ones, in ABBA order (``--repeats`` pairs). Memory: the peak allocated and reserved over
the run's training steps (CUDA's counters reset at train start); speed: real tokens per second over the timed steps
(the device synchronised at both ends); the first step's loss of each run (the same seed and batches: equal up to
bf16). ``--quick``: a tiny Llama on 256 samples on the CPU (the mechanics only; no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _common import environment, markdown_table, write_outputs
from lightning.pytorch.callbacks import Callback
from token_budget import _Peaks, _Timer, datamodule, model_kwargs, trainer

from lightning_txopt import TransformerModule
from lightning_txopt.losses import DEFAULT_CHUNK_SIZE
from lightning_txopt.memory import GiB

MODEL = "llama-350m"
SETTINGS = {"unchunked": None, "chunked": DEFAULT_CHUNK_SIZE}


class _FirstLoss(Callback):
    """The loss of the first training step."""

    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.loss = float(loss)


def one_run(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    gc.collect()
    if not args.quick:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    timer, first = _Timer(args.warmup), _FirstLoss()
    peaks = [] if args.quick else [_Peaks(False)]  # CUDA's counters, reset at train start
    module = TransformerModule(**model_kwargs(MODEL, args.quick), loss_chunk_size=SETTINGS[setting])
    fit = trainer(args.quick, max_steps=args.warmup + args.steps, callbacks=[*peaks, timer, first])
    fit.fit(module, datamodule=datamodule(MODEL, args.quick, args.tokens))
    row: dict[str, Any] = {
        "setting": setting,
        "loss_chunk_size": SETTINGS[setting],
        "real_tokens_per_s": timer.real / max(timer.t1 - timer.t0, 1e-9),
        "first_loss": first.loss,
    }
    if not args.quick:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    print(f"  {setting}: {row}", flush=True)
    return row


def report(result: dict[str, Any]) -> str:
    runs = result["runs"]
    by: dict[str, list[dict[str, Any]]] = {s: [r for r in runs if r["setting"] == s] for s in SETTINGS}
    quick = result["settings"]["quick"]

    def mean(setting: str, key: str) -> float:
        return statistics.mean(r[key] for r in by[setting])

    rows = []
    for s in SETTINGS:
        speeds = " / ".join(f"{r['real_tokens_per_s']:,.0f}" for r in by[s])
        peaks = "n/a (CPU)" if quick else f"{mean(s, 'peak_allocated_gib'):.2f} / {mean(s, 'peak_reserved_gib'):.2f}"
        loss = ", ".join(f"{r['first_loss']:.4f}" for r in by[s])
        rows.append([s, SETTINGS[s] or "full logits", peaks, speeds, loss])
    lines = [result["header"], ""]
    lines.append(
        markdown_table(["setting", "chunk", "peak GiB alloc / reserved", "real tokens/s (runs)", "first loss"], rows)
    )
    speed = mean("chunked", "real_tokens_per_s") / mean("unchunked", "real_tokens_per_s")
    if quick:
        lines.append(f"\nchunked / unchunked: speed {speed:.2f}x (CPU smoke run: not a GPU figure)")
    else:
        memory = mean("chunked", "peak_allocated_gib") / mean("unchunked", "peak_allocated_gib")
        lines.append(
            f"\nchunked / unchunked: peak allocated {memory:.2f}x ({1 - memory:.0%} lower; target >= 40% lower: "
            f"{'met' if memory <= 0.6 else 'not met'}), speed {speed:.2f}x (target >= 0.95x: "
            f"{'met' if speed >= 0.95 else 'not met'})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="max_tokens of the bucketed batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each run")
    parser.add_argument("--repeats", type=int, default=1, help="ABBA pairs")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny Llama")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.warmup, args.steps = min(args.tokens, 512), 1, 2
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (it measures GPU memory); use --quick for a CPU smoke run")
    order = ["unchunked", "chunked", "chunked", "unchunked"] * args.repeats
    runs = [one_run(s, args) for s in order]
    device = "CPU" if args.quick else torch.cuda.get_device_name()
    header = (
        f"Chunked LM loss, whole model: {MODEL} Trainer.fit on {device}, bucketed max_tokens={args.tokens:,}, "
        f"{'32-true' if args.quick else 'bf16-mixed'}, {args.warmup} warm-up + {args.steps} timed steps per run, "
        f"ABBA x{args.repeats}; "
        f"{environment()}"
    )
    result = {"header": header, "settings": vars(args), "runs": runs}
    write_outputs(result, report(result), args.json, None, lambda *a: None)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

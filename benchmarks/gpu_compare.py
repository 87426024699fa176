"""Side by side on one GPU: the Hugging Face Trainer, a plain PyTorch loop, and lightning_txopt, in one process.

    python benchmarks/gpu_compare.py --json docs/results/gpu_compare_h200.json     # H200: about 5 minutes
    python benchmarks/gpu_compare.py --quick                                       # CPU smoke run

All rows train a random-init BERT-base shape (12 layers, 768 hidden) sequence classifier (40 classes) on the
embedded corpus, for the same number of batches after a warm-up (an optimizer step each; every second one in the
accumulation row), and report real (non-pad) tokens/s, samples/s, padding efficiency and peak memory. The token ids
are random with each text's real BERT-uncased length (``tests/data/fortune_lengths.npy``) and its real label:
throughput depends on the lengths only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import (
    RECORDED_LENGTHS,
    environment,
    hf_sampling_kwargs,
    hf_training_arguments,
    markdown_table,
    synced_time,
    write_outputs,
)
from transformers import AutoModelForSequenceClassification, BertConfig

from lightning_txopt import load_fortunes
from lightning_txopt.callbacks import (
    AccumulationScheduler,
    FreezeEmbeddings,
    GradientCheckpointing,
    ParameterSharing,
    TokenThroughputMonitor,
)
from lightning_txopt.data import BucketBatchSampler, BucketDataModule, PaddingCollator
from lightning_txopt.module import TransformerModule


def corpus_samples(limit: int | None) -> list[dict[str, Any]]:
    lengths = np.load(RECORDED_LENGTHS)
    labels = sorted({r["label"] for r in load_fortunes()})
    label_id = {name: i for i, name in enumerate(labels)}
    records = load_fortunes()
    rng = np.random.default_rng(0)
    samples = []
    for n, r in zip(lengths.tolist(), records):
        ids = rng.integers(1000, 30000, n)
        ids[0], ids[-1] = 101, 102  # [CLS] ... [SEP]
        samples.append({"input_ids": ids.astype(np.int64), "labels": label_id[r["label"]]})
    if limit:
        samples = [samples[i] for i in rng.permutation(len(samples))[:limit]]
    return samples


def bert_config(args: argparse.Namespace) -> BertConfig:
    if args.quick:
        return BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=40
        )
    return BertConfig(num_labels=40)  # BERT-base: 12 x 768, 110M parameters


class _Window:
    """Times steps warmup+1 .. warmup+steps and counts their tokens."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = 0.0
        self.real = self.processed = self.samples = 0

    def batch(self, step: int, batch: dict[str, torch.Tensor]) -> None:
        """Call before step ``step`` (0-based) runs on ``batch``."""
        if step == self.warmup:
            self.t0 = synced_time()
        if self.warmup <= step < self.warmup + self.steps:
            mask = batch["attention_mask"]
            self.real += int(mask.sum()) if mask.dim() == 2 else int(batch["cu_seq_lens"][-1])
            self.processed += int(batch["input_ids"].numel())
            self.samples += int(batch["labels"].shape[0])

    def end(self) -> None:
        self.t1 = synced_time()

    def row(self, name: str, peak: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        seconds = max(self.t1 - self.t0, 1e-9)
        return {
            "row": name,
            "real_tokens_per_s": self.real / seconds,
            "samples_per_s": self.samples / seconds,
            "padding_efficiency": self.real / max(self.processed, 1),
            "peak_memory_gib": peak,
            "seconds": seconds,
            "real_tokens": self.real,
            **(extra or {}),
        }


def _reset_memory(cuda: bool) -> None:
    gc.collect()  # the previous row's model, optimizer and Trainer must not survive into this row's measurement
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


# ------------------------------------------------------------------------------------------ Hugging Face Trainer
def hf_trainer_row(
    name: str,
    samples: list[dict],
    args: argparse.Namespace,
    *,
    fixed: bool,
    bf16: bool,
    group_by_length: bool = False,
    multiple_of: int | None = None,
    checkpointing: bool = False,
    extra_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    window = _Window(args.warmup, args.steps)
    collate = PaddingCollator(
        0, padding="max_length" if fixed else "longest", max_length=512, pad_to_multiple_of=multiple_of
    )
    calls = {"n": 0}

    def collator(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        window.batch(calls["n"], batch)  # num_workers=0: the k-th collation feeds the k-th step
        calls["n"] += 1
        return batch

    class End(TrainerCallback):
        def on_train_end(self, *a: Any, **k: Any) -> None:
            window.end()

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bert_config(args), attn_implementation="sdpa")
    sampling = dict(extra_args or {})
    if group_by_length and not sampling:
        sampling = hf_sampling_kwargs("group_by_length")
    with tempfile.TemporaryDirectory() as out:
        targs = hf_training_arguments(
            out,
            per_device_train_batch_size=32,
            max_steps=args.warmup + args.steps,
            learning_rate=5e-5,
            bf16=bf16,
            gradient_checkpointing=checkpointing,
            **sampling,
        )
        _reset_memory(cuda)
        Trainer(model=model, args=targs, train_dataset=samples, data_collator=collator, callbacks=[End()]).train()
    return window.row(name, _peak(cuda))


# ------------------------------------------------------------------------------------------ plain PyTorch loop
class _TrainerGroupedBatches:
    """The HF Trainer's length-grouped batches of 32 (its own ``LengthGroupedSampler``), one epoch per pass."""

    def __init__(self, lengths: np.ndarray, batch_size: int = 32) -> None:
        self.lengths, self.batch_size, self.epoch = lengths.tolist(), batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        g = torch.Generator().manual_seed(self.epoch)
        order = list(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))
        return iter([order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)])


def plain_loop_row(
    name: str,
    samples: list[dict],
    args: argparse.Namespace,
    *,
    hf_loss: bool = False,
    trainer_batches: bool = False,
) -> dict[str, Any]:
    """``trainer_batches``: iterate the HF Trainer's length-grouped batches of 32 (multiple of 8) instead of ours."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    window = _Window(args.warmup, args.steps)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    sampler: Any = (
        _TrainerGroupedBatches(lengths)
        if trainer_batches
        else BucketBatchSampler(lengths, max_tokens=args.max_tokens, seed=0)
    )
    collate = PaddingCollator(0, pad_to_multiple_of=8 if trainer_batches else None)
    torch.manual_seed(0)
    model = (
        AutoModelForSequenceClassification.from_config(bert_config(args), attn_implementation="sdpa").to(device).train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=cuda or None)
    _reset_memory(cuda)
    step = 0
    while step < args.warmup + args.steps:
        for indices in sampler:
            if step >= args.warmup + args.steps:
                break
            batch = collate([samples[i] for i in indices])
            window.batch(step, batch)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                if hf_loss:  # labels into the model: its own loss function
                    loss = model(**batch).loss
                else:  # the loss computed as TransformerModule does
                    labels = batch.pop("labels")
                    loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        sampler.set_epoch(sampler.epoch + 1)
    window.end()
    del model, opt
    return window.row(name, _peak(cuda))


def warm_up(samples: list[dict], args: argparse.Namespace, budget: int | None = None) -> None:
    """One untimed pass over the batch shapes the rows will use, so that no row pays the first-use cost of a shape
    (kernel selection and attention plans, allocator growth): the token-budget shapes of three epochs, batch-32
    shapes with dynamic padding, fixed 512, in fp32 and bf16. Without it the first row to meet a shape measured up to
    4.6x slower. ``budget``: only the shapes of that token budget (a row with another budget warms up its own)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bert_config(args), attn_implementation="sdpa")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda or None)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    sampler = BucketBatchSampler(lengths, max_tokens=budget or args.max_tokens, seed=0)
    plans: list[tuple[list[int], PaddingCollator, bool]] = []
    for epoch in range(3):  # the timed rows run into later epochs: new shuffles, a few new shapes
        sampler.set_epoch(epoch)
        plans += [(list(b), PaddingCollator(0), True) for b in sampler]
    if budget is None:
        rng = np.random.default_rng(1)
        dynamic = [rng.permutation(len(samples))[:32].tolist() for _ in range(2 if args.quick else 120)]
        plans += [(b, PaddingCollator(0), True) for b in dynamic]
        plans += [(b, PaddingCollator(0, pad_to_multiple_of=8), True) for b in dynamic]
        plans += [(dynamic[0], PaddingCollator(0, padding="max_length", max_length=512), False)] * 3
    seen = set()
    for indices, collate, bf16 in plans:
        batch = {k: v.to(device) for k, v in collate([samples[i] for i in indices]).items()}
        key = (tuple(batch["input_ids"].shape), bf16)
        if key in seen:
            continue
        seen.add(key)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and bf16):
            model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del model, opt
    _reset_memory(cuda)


# ------------------------------------------------------------------------------------------ lightning_txopt
class _CountingCollator:
    """Wraps the DataModule's collator: counts each batch on the CPU (no device sync in the timed loop)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.pending: list[dict[str, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:  # padded_lengths & co.: the DataModule plans batches with them
        if name.startswith("__") or name == "collate":  # unpickling (ddp_spawn) looks these up before __init__
            raise AttributeError(name)
        return getattr(self.collate, name)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(samples)
        self.pending.append(
            {k: batch[k] for k in ("attention_mask", "input_ids", "labels", "cu_seq_lens") if k in batch}
        )
        return batch


class _LightningWindow(pl.Callback):
    def __init__(self, window: _Window, counter: _CountingCollator) -> None:
        self.window = window
        self.counter = counter
        self.step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.window.batch(self.step, self.counter.pending.pop(0))  # batches arrive in collation order
        self.step += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.window.end()


class _DynamicBatchDim(pl.Callback):
    """Marks the batch dimension dynamic for ``torch.compile``: with a ladder of widths the only static shape left is
    the sequence length, so each rung compiles once whatever its row count."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def window_error(warm: int, steps: int, accumulate: int) -> str | None:
    """Why a row's window of batches cannot end on an optimizer step, or ``None`` when it can."""
    if (warm + steps) % accumulate:
        return f"warm-up + steps ({warm} + {steps}) must be a multiple of accumulate={accumulate}."
    return None


def lightning_row(
    name: str,
    samples: list[dict],
    args: argparse.Namespace,
    *,
    callbacks: list[Any] | None = None,
    strategy: str = "bucket",
    max_length: int | None = None,
    pin_memory: bool = True,
    max_tokens: int | None = None,
    pad_to_lengths: list[int] | None = None,
    compile: str | None = None,
    warmup: int | None = None,
    accumulate: int = 1,
) -> dict[str, Any]:
    """One Lightning run. ``compile``: ``None`` (eager), ``"default"`` (``model.compile()``: dynamo specialises on the
    first shape, then recompiles with dynamic shapes) or ``"ladder"`` (static widths from ``pad_to_lengths``, dynamic
    batch dimension). ``warmup`` overrides ``--warmup`` (compiled rows warm up over a whole epoch of shapes).
    ``accumulate``: batches per optimizer step (an ``AccumulationScheduler`` among ``callbacks`` must say the same):
    the row still times ``--steps`` batches, so its tokens/s compare with the other rows'."""
    cuda = torch.cuda.is_available()
    warm = args.warmup if warmup is None else warmup
    if error := window_error(warm, args.steps, accumulate):
        raise ValueError(error)
    window = _Window(warm, args.steps)
    budget = max_tokens or args.max_tokens
    dm = BucketDataModule(
        samples,
        pad_token_id=0,
        strategy=strategy,
        max_tokens=budget,  # type: ignore[arg-type]
        max_length=max_length,
        pad_to_lengths=pad_to_lengths,
        seed=0,
        pin_memory=pin_memory,
    )
    counter = _CountingCollator(dm.collator)
    dm.collator = counter  # type: ignore[assignment]
    torch.manual_seed(0)
    module = TransformerModule(config=bert_config(args), num_labels=40)
    extra: list[Any] = []
    if compile is not None:
        torch._dynamo.reset()
        module.model.compile()  # in place: parameter names and checkpoints unchanged
        if compile == "ladder":
            extra.append(_DynamicBatchDim())
    graphs0 = _compiled_graphs()
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=(warm + args.steps) // accumulate,
        callbacks=[*(callbacks or []), *extra, _LightningWindow(window, counter)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    _reset_memory(cuda)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    info: dict[str, Any] = {"max_tokens": budget}
    if compile is not None:
        info.update(graphs=_compiled_graphs() - graphs0, warmup_seconds=window.t0 - start, warmup_steps=warm)
    result = window.row(name, _peak(cuda), info)
    del trainer, module, dm
    return result


def probe_peak_gib(samples: list[dict], args: argparse.Namespace, max_tokens: int) -> float:
    """Peak memory of TransformerModule training steps (bf16 autocast, fused AdamW, gradients freed after each step as
    TransformerModule does) on the largest batches of a ``max_tokens`` plan: most padded tokens, and longest rows."""
    device = torch.device("cuda")
    lengths = np.array([len(s["input_ids"]) for s in samples])
    plan = [list(b) for b in BucketBatchSampler(lengths, max_tokens=max_tokens, seed=0)]
    cost = [len(b) * int(lengths[b].max()) for b in plan]
    order = [*np.argsort(cost)[::-1][:3].tolist(), int(np.argmax([lengths[b].max() for b in plan]))]
    torch.manual_seed(0)
    module = TransformerModule(config=bert_config(args), num_labels=40).to(device)
    opt = torch.optim.AdamW(module.optimizer_groups(), lr=1e-6, fused=True)
    collate = PaddingCollator(0)
    _reset_memory(True)
    for i in order:
        batch = {k: v.to(device) for k, v in collate([samples[j] for j in plan[i]]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.loss_and_items(batch, "mean")[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak(True)
    del module, opt
    _reset_memory(True)
    return peak


def budget_for_peak(samples: list[dict], args: argparse.Namespace, target_gib: float) -> tuple[int, list[Any]]:
    """The token budget whose peak memory is ``target_gib``: a line through two probes, then a check probe."""
    lo, hi = args.max_tokens // 2, args.max_tokens
    p_lo, p_hi = probe_peak_gib(samples, args, lo), probe_peak_gib(samples, args, hi)
    budget = int(lo + (target_gib - p_lo) * (hi - lo) / (p_hi - p_lo)) // 64 * 64
    budget = max(budget, 512)
    return budget, [(lo, p_lo), (hi, p_hi), (budget, probe_peak_gib(samples, args, budget))]


def chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["row"].replace("lightning_txopt: ", "txopt: ").replace("HF Trainer: ", "HF: ") for r in rows]
    colors = [
        "#8c8c8c" if r["row"].startswith("HF") else "#dd8452" if r["row"].startswith("plain") else "#4c72b0"
        for r in rows
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    left.barh(y, [r["real_tokens_per_s"] for r in rows], color=colors)
    left.set_xscale("log")
    left.set_xlabel("real (non-pad) tokens / s, log scale")
    right.barh(y, [r["peak_memory_gib"] for r in rows], color=colors)
    right.set_xlabel("peak memory, GiB")
    left.set_yticks(list(y), names, fontsize=8)
    left.invert_yaxis()
    for i, r in enumerate(rows):
        left.text(r["real_tokens_per_s"], i, f" {r['real_tokens_per_s'] / 1000:,.0f}k", va="center", fontsize=8)
    fig.suptitle(result["header"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LADDER = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]  # steps of about sqrt(2)
PLAIN = "plain PyTorch loop: our token-budget batches"
LIGHTNING = "lightning_txopt: BucketDataModule max_tokens="
GROUPED = "HF Trainer: group_by_length, bf16"


def matched_memory_row(name: str, samples: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Lightning row with a token budget sized to the peak memory of the HF length-grouped row (run before it)."""
    if not torch.cuda.is_available() or args.match_gib is None:
        row = lightning_row(name, samples, args)
        row["calibration"] = "none: no CUDA device or no reference peak"
        return row
    budget, probes = budget_for_peak(samples, args, args.match_gib)
    warm_up(samples, args, budget)  # its own shapes, as every other row had
    row = lightning_row(f"{name} = {budget}", samples, args, max_tokens=budget)
    row["calibration"] = {"target_gib": args.match_gib, "probes_max_tokens_gib": probes}
    return row


def build_rows(args: argparse.Namespace, samples: list[dict]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(row name, row function, its keyword arguments): each row is named once."""
    T = args.max_tokens
    unique = max(1, bert_config(args).num_hidden_layers // 3)  # ALBERT-like sharing: 4 unique layers of BERT-base's 12
    hf = dict(fixed=False, bf16=True)
    grouped = dict(hf, group_by_length=True, multiple_of=8)
    rows: list[tuple[str, Any, dict[str, Any]]] = [
        ("HF Trainer: fixed padding 512, fp32, batch 32", hf_trainer_row, dict(fixed=True, bf16=False)),
        ("HF Trainer: dynamic padding, bf16, batch 32", hf_trainer_row, hf),
        (f"{GROUPED}, multiple of 8, batch 32", hf_trainer_row, grouped),
        ("HF Trainer: group_by_length + gradient checkpointing", hf_trainer_row, dict(grouped, checkpointing=True)),
    ]
    rebalance = hf_sampling_kwargs("batch_rebalance")
    if rebalance:  # only recent transformers releases have it
        rows.append(
            (
                "HF Trainer: batch_rebalance, bf16, multiple of 8, batch 32",
                hf_trainer_row,
                dict(grouped, extra_args=rebalance),
            )
        )
    rows += [
        (
            "plain PyTorch loop over the HF Trainer's length-grouped batches of 32 (multiple of 8), bf16, AdamW fused",
            plain_loop_row,
            dict(hf_loss=True, trainer_batches=True),
        ),
        (f"{PLAIN} ({T}), bf16, AdamW fused", plain_loop_row, {}),
        (
            "plain PyTorch loop, same batches, labels passed to the model (its own loss)",
            plain_loop_row,
            dict(hf_loss=True),
        ),
        (f"{LIGHTNING}{T}, bf16-mixed", lightning_row, {}),
        ("lightning_txopt: max_tokens sized to the HF length-grouped row's peak memory", matched_memory_row, {}),
        ("lightning_txopt: same, pin_memory=False", lightning_row, dict(pin_memory=False)),
        ("lightning_txopt: + FreezeEmbeddings", lightning_row, dict(callbacks=[FreezeEmbeddings()])),
        (
            "lightning_txopt: + FreezeEmbeddings + GradientCheckpointing",
            lightning_row,
            dict(callbacks=[FreezeEmbeddings(), GradientCheckpointing()]),
        ),
        ("lightning_txopt: + TokenThroughputMonitor", lightning_row, dict(callbacks=[TokenThroughputMonitor()])),
        (
            'lightning_txopt: + AccumulationScheduler({0: 2}, normalize="tokens"), tokens/s per batch',
            lightning_row,
            dict(callbacks=[AccumulationScheduler({0: 2}, normalize="tokens")], accumulate=2),
        ),
        (
            f'lightning_txopt: + ParameterSharing({unique}, strategy="cycle_rev")',
            lightning_row,
            dict(callbacks=[ParameterSharing(unique, strategy="cycle_rev")]),
        ),
        (
            f"lightning_txopt: packed rows of 512, max_tokens={T}, bf16-mixed",
            lightning_row,
            dict(strategy="packed", max_length=512),
        ),
    ]
    if args.compile:
        warm = args.compile_warmup
        rows += [
            (
                f"lightning_txopt: pad_to_lengths={LADDER}, eager",
                lightning_row,
                dict(pad_to_lengths=LADDER, warmup=warm),
            ),
            ("lightning_txopt: torch.compile, no ladder", lightning_row, dict(compile="default", warmup=warm)),
            (
                f"lightning_txopt: torch.compile + pad_to_lengths={LADDER}",
                lightning_row,
                dict(compile="ladder", pad_to_lengths=LADDER, warmup=warm),
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the plain-loop and main Lightning rows this many times, alternating"
    )
    parser.add_argument(
        "--repeat-all",
        action="store_true",
        help="with --repeats: repeat every selected row (ABBA order over all of them), not only the pair",
    )
    parser.add_argument(
        "--match-gib", type=float, default=None, help="peak memory to size a budget to (default: HF row)"
    )
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows (minutes of compilation)")
    parser.add_argument("--compile-warmup", type=int, default=50, help="untimed steps of compiled rows (> one epoch)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 512 texts: a smoke run on CPU")
    parser.add_argument("--only", default="", help="comma-separated row prefixes to run (default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--chart", default=None, help="write a PNG chart of real tokens/s and peak memory here")
    parser.add_argument("--chart-from", default=None, help="only draw --chart from an earlier --json file")
    parser.add_argument("--report-from", default=None, help="only print the table of an earlier --json file")
    args = parser.parse_args()
    if args.chart_from:
        chart(json.loads(Path(args.chart_from).read_text()), args.chart)
        return
    if args.report_from:
        print(report(json.loads(Path(args.report_from).read_text())))
        return
    if args.quick:
        args.steps, args.warmup, args.max_tokens = min(args.steps, 3), min(args.warmup, 1), min(args.max_tokens, 2048)
        args.compile_warmup = min(args.compile_warmup, 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    samples = corpus_samples(512 if args.quick else None)
    cuda = torch.cuda.is_available()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    todo = [r for r in build_rows(args, samples) if not only or any(r[0].startswith(p) for p in only)]
    if not todo:
        parser.error(f"--only {args.only!r} matches no row; rows: {[r[0] for r in build_rows(args, samples)]}")
    for name, _, kwargs in todo:  # fail before any GPU time is spent, not when the row's turn comes
        if error := window_error(kwargs.get("warmup", args.warmup), args.steps, kwargs.get("accumulate", 1)):
            parser.error(f"row {name!r}: {error}")
    warm_up(samples, args)
    runs: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []

    def run(name: str, fn: Any, kwargs: dict[str, Any]) -> None:
        row = fn(name, samples, args, **kwargs)
        if name not in runs:
            order.append(name)
        runs.setdefault(name, []).append(row)
        if name.startswith(GROUPED) and args.match_gib is None and cuda:
            args.match_gib = row["peak_memory_gib"]
        print(f"done: {row['row']}: {row['real_tokens_per_s']:,.0f} real tokens/s", flush=True)

    # The plain loop and Lightning first, alternating in ABBA order (neither always runs first), before any other row
    # can leave state behind in the process; then every other row in table order.
    pair = todo if args.repeat_all else [r for r in todo if r[0].startswith((PLAIN, LIGHTNING))]
    for repeat in range(args.repeats):
        for name, fn, kwargs in pair if repeat % 2 == 0 else pair[::-1]:
            run(name, fn, kwargs)
    for name, fn, kwargs in todo:
        if (name, fn, kwargs) not in pair:
            run(name, fn, kwargs)
    order.sort(key=[r[0] for r in todo].index)
    rows = []
    for name in order:  # each row: the run with the median throughput, every run's figure kept
        ranked = sorted(runs[name], key=lambda r: r["real_tokens_per_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        if len(ranked) > 1:
            row["runs_real_tokens_per_s"] = [r["real_tokens_per_s"] for r in runs[name]]
        rows.append(row)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    header = (
        f"{device}, BERT-base shape{' (quick: tiny)' if args.quick else ''}, {args.steps} timed optimizer steps "
        f"per row after {args.warmup} warm-up steps (every model: attn_implementation='sdpa')"
    )
    if args.repeats > 1:
        repeated = "every row" if args.repeat_all else "plain loop and Lightning rows"
        header += f"; {repeated}: median of {args.repeats} runs in ABBA order"
    result: dict[str, Any] = {"header": header, "environment": environment(), "rows": rows}
    plain_runs = next((v for k, v in runs.items() if k.startswith(PLAIN)), [])
    lightning_runs = next((v for k, v in runs.items() if k.startswith(LIGHTNING)), [])
    if plain_runs and lightning_runs:
        ratios = [a["real_tokens_per_s"] / b["real_tokens_per_s"] for a, b in zip(lightning_runs, plain_runs)]
        result["lightning_over_plain_loop"] = {"pairs": ratios, "median": statistics.median(ratios)}
    write_outputs(result, report(result), args.json, args.chart, chart)


def report(result: dict[str, Any]) -> str:
    """The markdown table and summary lines of a result (also from a saved ``--json`` file: ``--report-from``)."""
    rows = result["rows"]
    ref = next((r for r in rows if r["row"].startswith(GROUPED)), rows[0])
    loop = next((r for r in rows if r["row"].startswith(PLAIN)), rows[0])
    # without those rows (--only), ratios are to the first row, and the headers say so
    loop_name = "plain loop" if loop["row"].startswith(PLAIN) else "first row"
    ref_name = "HF length-grouped" if ref["row"].startswith(GROUPED) else loop_name if ref is loop else "first row"
    both = loop is not ref  # one ratio column where both fall back to the first row
    table = [
        [
            r["row"],
            r["real_tokens_per_s"],
            r["real_tokens_per_s"] / ref["real_tokens_per_s"],
            *([r["real_tokens_per_s"] / loop["real_tokens_per_s"]] if both else []),
            r["samples_per_s"],
            r["padding_efficiency"],
            r["peak_memory_gib"],
            r["peak_memory_gib"] / ref["peak_memory_gib"],
        ]
        for r in rows
    ]
    lines = [
        f"{result['header']}\n",
        markdown_table(
            [
                "row",
                "real tokens/s",
                f"x {ref_name}",
                *([f"x {loop_name}"] if both else []),
                "samples/s",
                "padding efficiency",
                "peak GiB",
                f"peak x {ref_name}",
            ],
            table,
        ),
        "",
    ]
    pair = result.get("lightning_over_plain_loop")
    if pair:
        runs = ", ".join(f"{x:.3f}" for x in pair["pairs"])
        lines.append(f"Lightning / plain loop, run by run: {runs}; median {pair['median']:.3f}")
    for r in rows:
        if "calibration" in r and isinstance(r["calibration"], dict):
            probes = "; ".join(f"{t} tokens: {g:.3f} GiB" for t, g in r["calibration"]["probes_max_tokens_gib"])
            lines.append(
                f"{r['row']}: sized to {r['calibration']['target_gib']:.3f} GiB by probes ({probes}); "
                f"measured peak {r['peak_memory_gib']:.3f} GiB"
            )
        if "graphs" in r:
            lines.append(
                f"{r['row']}: {r['graphs']} compiled graphs, {r['warmup_seconds']:.0f} s for the first "
                f"{r['warmup_steps']} steps (compilation included)"
            )
    for r in rows:
        if "runs_real_tokens_per_s" in r:
            runs = ", ".join(f"{x:,.0f}" for x in r["runs_real_tokens_per_s"])
            lines.append(f"{r['row']}: real tokens/s of each run: {runs}")
    lines.append(f"\n{result['environment']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

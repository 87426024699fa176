"""Inference over a whole corpus (issue #20): token-budget batches against the common recipe, bf16, one process.

    python benchmarks/predict_compare.py --repeats 4 --json docs/results/predict_h200.json   # H200
    python benchmarks/predict_compare.py --quick                                             # CPU smoke run
    python benchmarks/predict_compare.py --list

Every row predicts every sample of the corpus once with the same random-init BERT-base-shape classifier
(``workloads.py``; ``--data lognormal`` for the second length distribution) in eval mode, under
``torch.inference_mode`` and bf16 autocast on CUDA (fp32 on CPU), and reports real (non-pad) tokens/s and the time
for the whole corpus (from the first batch's collation to the last output on the device, synced):

* ``recipe``: the common recipe: batches of 32 in dataset order, each padded to its longest sample (a
  ``DataLoader(batch_size=32)`` with a padding collator);
* ``hf_trainer``: the Hugging Face ``Trainer.predict`` with ``per_device_eval_batch_size=32`` (the same batches);
* ``plain_bucketed``: a plain loop over our token-budget batches (``BucketBatchSampler(shuffle=False)``): the
  batching alone, without Lightning;
* ``lightning_bucketed``: ``trainer.predict`` with ``BucketDataModule(predict_dataset=..., max_tokens=...)`` and
  ``TransformerModule.predict_step``;
* ``lightning_packed``: the same with ``strategy="packed"``, rows of 512 and ``attn_implementation="auto"`` (varlen).

The Lightning rows need issue #20's API (and #15's for ``"auto"``): until it exists they are skipped with a message
naming the missing piece, and a run of only those rows stops with that message. Each run of a row builds the model,
makes one untimed pass over the corpus (first-use cost of shapes), then one timed pass; ``--repeats`` runs of every
row go in ABBA order and the median is reported. Plain rows keep outputs on the device until the pass ends (no sync
per batch) and are checked against the recipe's logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from _common import environment, hf_training_arguments, markdown_table, synced_time
from api_check import ApiProbe
from gpu_runner import CountingDataModule, peak_gib, reset_memory, schedule
from workloads import DATA, Workload, build_workload

from lightning_txopt.data import BucketBatchSampler, PaddingCollator
from lightning_txopt.module import TransformerModule

__all__ = ["ROWS", "PredictRow", "report"]

PREDICT_API = ("predict_dataset", "predict_dataloader", "predict_step")


@dataclasses.dataclass(frozen=True)
class PredictRow:
    """A way to predict the corpus: ``kind`` of loop, its ``options``, the API pieces it ``requires``."""

    name: str
    title: str
    kind: str  # "plain", "hf" or "lightning"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    requires: tuple[str, ...] = ()


ROWS = [
    PredictRow("recipe", "recipe: batches of 32 in dataset order, padded to the longest", "plain", {"batch_size": 32}),
    PredictRow(
        "hf_trainer",
        "HF Trainer.predict, eval batches of 32 in dataset order",
        "hf",
        requires=("accelerate",),
    ),
    PredictRow("plain_bucketed", "plain loop over BucketBatchSampler token-budget batches", "plain"),
    PredictRow(
        "lightning_bucketed",
        "lightning_txopt: trainer.predict, BucketDataModule token-budget batches",
        "lightning",
        requires=PREDICT_API,
    ),
    PredictRow(
        "lightning_packed",
        'lightning_txopt: trainer.predict, packed rows of 512, attn "auto" (varlen)',
        "lightning",
        {"strategy": "packed", "max_length": 512, "attn_implementation": "auto"},
        requires=(*PREDICT_API, "auto_attention"),
    ),
]


@dataclasses.dataclass
class Pass:
    """What one timed pass over the corpus measured."""

    seconds: float
    batches: int
    real: int
    processed: int
    logits: torch.Tensor | None = None  # (samples, classes) in dataset order, float32 on the CPU


def _model(workload: Workload, attn_implementation: str = "sdpa") -> TransformerModule:
    torch.manual_seed(0)
    module = TransformerModule(**workload.module_kwargs(), attn_implementation=attn_implementation)
    return module.eval()


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def plain_pass(workload: Workload, model: torch.nn.Module, batches: list[list[int]], device: torch.device) -> Pass:
    """Predict ``batches`` (lists of sample indices) with a plain loop; logits back in dataset order."""
    samples = workload.samples
    collate = PaddingCollator(0)
    loader: Any = torch.utils.data.DataLoader(
        cast(Any, batches),  # a list of index lists: one batch per item
        batch_size=None,
        collate_fn=lambda indices: (indices, collate([samples[i] for i in indices])),
        pin_memory=device.type == "cuda",
    )
    outputs, order = [], []
    real = processed = 0
    t0 = synced_time()
    with torch.inference_mode(), _autocast(device):
        for indices, batch in loader:
            real += int(sum(len(samples[i]["input_ids"]) for i in indices))
            processed += int(batch["input_ids"].numel())
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
            outputs.append(model(**inputs).logits)
            order += list(indices)
    t1 = synced_time()
    logits = torch.empty(len(samples), outputs[0].shape[-1])
    logits[torch.tensor(order)] = torch.cat(outputs).float().cpu()
    return Pass(t1 - t0, len(batches), real, processed, logits)


def hf_pass(workload: Workload, model: torch.nn.Module, device: torch.device) -> Pass:
    from transformers import Trainer

    collate = PaddingCollator(0)
    counts = {"batches": 0, "real": 0, "processed": 0}

    def collator(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([{k: v for k, v in f.items() if k != "labels"} for f in features])
        counts["batches"] += 1
        counts["real"] += sum(len(f["input_ids"]) for f in features)
        counts["processed"] += int(batch["input_ids"].numel())
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = hf_training_arguments(out, per_device_eval_batch_size=32, bf16=True)
        trainer = Trainer(model=model, args=args, data_collator=collator)
        t0 = synced_time()
        predictions = trainer.predict(workload.samples).predictions  # type: ignore[arg-type]
        t1 = synced_time()
    logits = torch.as_tensor(np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)).float()
    return Pass(t1 - t0, counts["batches"], counts["real"], counts["processed"], logits)


def lightning_pass(workload: Workload, module: TransformerModule, budget: int, options: Mapping[str, Any]) -> Pass:
    import lightning.pytorch as pl

    cuda = torch.cuda.is_available()
    dm_options = {k: v for k, v in options.items() if k != "attn_implementation"}
    dm = CountingDataModule(
        predict_dataset=workload.samples, pad_token_id=0, max_tokens=budget, count_split="predict", **dm_options
    )
    counter = dm.counter
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = synced_time()
    trainer.predict(module, datamodule=dm, return_predictions=False)
    t1 = synced_time()
    return Pass(
        t1 - t0,
        len(counter.pending),
        sum(sum(lengths) for lengths, _ in counter.pending),
        sum(processed for _, processed in counter.pending),
    )


def run_row(row: PredictRow, workload: Workload, budget: int) -> Pass:
    """One run of a row: build the model, one untimed pass over the corpus, one timed pass."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module = _model(workload, row.options.get("attn_implementation", "sdpa")).to(device)
    lengths = workload.lengths
    if row.kind == "plain":
        size = row.options.get("batch_size")
        batches = (
            [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
            if size
            else [list(b) for b in BucketBatchSampler(lengths, max_tokens=budget, shuffle=False, seed=0)]
        )
        plain_pass(workload, module.model, batches, device)
        reset_memory(cuda)
        measured = plain_pass(workload, module.model, batches, device)
    elif row.kind == "hf":
        hf_pass(workload, module.model, device)
        reset_memory(cuda)
        measured = hf_pass(workload, module.model, device)
    else:
        lightning_pass(workload, module, budget, row.options)
        reset_memory(cuda)
        measured = lightning_pass(workload, module, budget, row.options)
    total = int(lengths.sum())
    if measured.real != total:
        raise RuntimeError(
            f"Row {row.name!r} predicted {measured.real:,} real tokens in {measured.batches} batches; the corpus has "
            f"{total:,}: a sample was missed or repeated (or its loader did not use the DataModule's collator)."
        )
    del module
    return measured


def summarize(row: PredictRow, passes: list[Pass], peak: float, reference: Pass | None) -> dict[str, Any]:
    ranked = sorted(passes, key=lambda p: p.real / max(p.seconds, 1e-9))  # as gpu_compare: the lower of an even count
    median = ranked[(len(ranked) - 1) // 2]
    out: dict[str, Any] = {
        "name": row.name,
        "row": row.title,
        "seconds": median.seconds,
        "real_tokens_per_s": median.real / max(median.seconds, 1e-9),
        "real_tokens": median.real,
        "batches": median.batches,
        "padding_efficiency": median.real / max(median.processed, 1),
        "peak_memory_gib": peak,
        "runs_seconds": [p.seconds for p in passes],
    }
    if reference is not None and reference.logits is not None and median.logits is not None:
        out["max_abs_logit_diff_vs_recipe"] = float((median.logits - reference.logits).abs().max())
    return out


def report(result: dict[str, Any]) -> str:
    """The markdown table of a result (also from a saved ``--json`` file: ``--report-from``)."""
    rows = result["rows"]
    ref = next((r for r in rows if r["name"] == "recipe"), rows[0])
    ref_name = "recipe" if ref["name"] == "recipe" else "first row"
    table = [
        [
            r["row"],
            r["real_tokens_per_s"],
            r["real_tokens_per_s"] / ref["real_tokens_per_s"],
            r["seconds"],
            r["batches"],
            r["padding_efficiency"],
            r["peak_memory_gib"],
            r.get("max_abs_logit_diff_vs_recipe", "-"),
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
                "seconds for the corpus",
                "batches",
                "padding efficiency",
                "peak GiB",
                "max |logit - recipe's|",
            ],
            table,
        ),
        "",
    ]
    for r in rows:
        if len(r["runs_seconds"]) > 1:
            lines.append(f"{r['row']}: seconds of each run: {', '.join(f'{s:.3f}' for s in r['runs_seconds'])}")
    lines += list(result.get("skipped", {}).values())
    lines.append(f"\n{result['environment']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=65536, help="token budget of the bucketed/packed rows")
    parser.add_argument("--data", choices=DATA, default="corpus")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every row, in ABBA order (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 512 texts: a smoke run on CPU")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all; --list)")
    parser.add_argument("--list", action="store_true", help="print the rows by name, run nothing")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report-from", default=None, help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    if args.report_from:
        print(report(json.loads(Path(args.report_from).read_text())))
        return
    probe = ApiProbe()
    if args.list:
        table = [[r.name, r.title, "; ".join(probe.missing(r.requires)) or "-"] for r in ROWS]
        print(markdown_table(["name", "row", "missing API"], table))
        return
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [n for n in only if n not in {r.name for r in ROWS}]
    if unknown:
        parser.error(f"--only {unknown[0]!r} matches no row; rows: {', '.join(r.name for r in ROWS)}")
    chosen = [r for r in ROWS if not only or r.name in only]
    todo, skipped = probe.split(chosen)
    for message in skipped.values():
        print(message, file=sys.stderr, flush=True)
    if not todo:
        parser.error(f"none of the selected rows can run here: {'; '.join(skipped.values())}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = min(args.max_tokens, 4096) if args.quick else args.max_tokens
    workload = build_workload("bert", args.data, args.quick)
    cuda = torch.cuda.is_available()
    passes: dict[str, list[Pass]] = {}
    peaks: dict[str, float] = {}
    by_name = {r.name: r for r in todo}
    for name in schedule(list(by_name), args.repeats, repeat_all=True):
        reset_memory(cuda)
        measured = run_row(by_name[name], workload, budget)
        passes.setdefault(name, []).append(measured)
        peaks[name] = max(peaks.get(name, 0.0), peak_gib(cuda)) if cuda else float("nan")
        print(
            f"done: {name}: {measured.seconds:.3f} s, {measured.real / measured.seconds:,.0f} real tokens/s", flush=True
        )
    reference = passes["recipe"][0] if "recipe" in passes else None
    rows = [summarize(r, passes[r.name], peaks[r.name], reference) for r in todo]
    device = torch.cuda.get_device_name() if cuda else "CPU"
    n = len(workload.samples)
    header = (
        f"{device}, BERT-base shape{' (quick: tiny)' if args.quick else ''}, predicting {n:,} {args.data} samples "
        f"({int(workload.lengths.sum()):,} real tokens), {'bf16 autocast' if cuda else 'fp32'}, token budget {budget}"
    )
    if args.repeats > 1:
        header += f"; every row: median of {args.repeats} runs in ABBA order"
    result: dict[str, Any] = {"header": header, "environment": environment(), "rows": rows}
    if skipped:
        result["skipped"] = skipped
    text = report(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""TokenBudgetFinder on one GPU: the budget it finds, how long it takes, and the largest budget found by hand.

    python benchmarks/token_budget.py --json docs/results/token_budget_h200.json      # H200, the three models
    python benchmarks/token_budget.py --only bert-bucket --verify-epochs 3             # one model
    python benchmarks/token_budget.py --quick                                          # CPU smoke run (an estimate)

Models (random init; the corpus's real BERT-uncased lengths, ``tests/data/fortune_lengths.npy``, with random ids):

* ``bert-bucket``: BERT-base (12 x 768) sequence classifier, 40 classes, bucketed batches (``strategy="bucket"``);
* ``bert-packed``: the same, packed rows of 512 tokens (``strategy="packed"``, static shapes);
* ``llama-350m``: a Llama-shape causal LM (18 x 1024, GQA 16/8 heads, vocab 128,256, tied embeddings: 343M
  parameters), bucketed.

For each model:

1. **finder**: ``Trainer.fit`` with ``TokenBudgetFinder()`` (defaults: 0.9 of the device) and one training step;
   the found ``max_tokens``, the finder's time and its probes;
2. **by hand**: bisection by full runs, each a fresh process training ``--reference-epochs`` epochs of the corpus at
   a candidate budget (out of memory or not), from the finder's budget up by x1.25 until a run fails, then halving
   the gap to 1% (what a user would do by hand, automated). Each run trains on a device of the finder's limit:
   its allocator capped at the finder's limit in bytes (``torch.cuda.set_per_process_memory_fraction``; with
   ``--hand-fraction``, at that share of the memory the process can use), so that both searches aim at the same
   memory and the ratio measures the finder, not the margin; ``--hand-fraction 1`` bisects on the whole device;
3. **verify**: a fresh process training ``--verify-epochs`` epochs at the found budget on the whole device (no
   cap): it must not run out of memory; its peak allocated and reserved memory.
4. **user run** (``--user-run``; ``--only-user-run`` alone): what a user runs, in a fresh process with the
   environment's allocator settings: one ``fit`` with ``TokenBudgetFinder()`` that then trains ``--verify-epochs``
   epochs at its budget; each step's batch shape and peak memory against the probes' peak, and whether the finder
   turned on expandable segments. GPU only.

With ``--checkpointing`` (BERT-base bucketed only): at a budget ``--checkpoint-factor`` times the finder's (too
large to fit without checkpointing), :func:`~lightning_txopt.callbacks.fit_checkpointing` picks the fewest
checkpointed blocks that fit (what ``GradientCheckpointing(every_n_layers="auto")`` does); its timed steps
(real tokens/s) and peak against ``GradientCheckpointing()`` (every block); and the finder's budget with every block
checkpointed (the finder with checkpointing allowed finds a larger budget).

The finder's memory reader is ``CudaMemory()`` (allocated peak, probes on an allocator capped at the limit);
``--peak reserved --no-cap`` is the previous default, ``--peak allocated --no-cap`` the plain allocated counter.
bf16 autocast, fused AdamW (TransformerModule), SDPA / the varlen backend (TransformerModule's default). ``--quick``
runs tiny models on a corpus subset on the CPU with :class:`~lightning_txopt.memory.SavedTensorsMemory` (activation
bytes, a simulated out-of-memory error at a pretend capacity) in the finder and in the full runs: it checks the
mechanics, its figures are not GPU figures. Without ``--quick`` and without a CUDA device it refuses.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import RECORDED_LENGTHS, ROOT, environment, markdown_table, write_outputs
from lightning.pytorch.callbacks import Callback

from lightning_txopt import BucketDataModule, GradientCheckpointing, TokenBudgetFinder, TransformerModule, load_fortunes
from lightning_txopt.callbacks import disable_gradient_checkpointing, enable_gradient_checkpointing, fit_checkpointing
from lightning_txopt.memory import CudaMemory, DeviceMemory, GiB, SavedTensorsMemory, is_out_of_memory

MODELS = ("bert-bucket", "bert-packed", "llama-350m")
QUICK_CAPACITY = 3_000_000  # activation bytes of the pretend device in --quick
QUICK_LENGTH = 64  # --quick truncates the corpus's samples to this length


def model_kwargs(name: str, quick: bool) -> dict[str, Any]:
    """``TransformerModule`` arguments of a model."""
    if name.startswith("bert"):
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if quick else {}
        return dict(config={"model_type": "bert", **size}, num_labels=40)
    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if quick
        else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18, num_attention_heads=16)
    )
    config = {
        "model_type": "llama",
        "vocab_size": 4096 if quick else 128_256,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        **size,
    }
    return dict(config=config, task="causal-lm")


def corpus(name: str, quick: bool) -> list[dict[str, Any]]:
    """The corpus's samples with their real lengths and random ids (and labels: classes or the ids)."""
    lengths = np.load(RECORDED_LENGTHS)
    records = load_fortunes()
    classes = {c: i for i, c in enumerate(sorted({r["label"] for r in records}))}
    rng = np.random.default_rng(0)
    vocab = int(model_kwargs(name, quick)["config"].get("vocab_size", 30522))
    order = rng.permutation(len(lengths))[:256] if quick else np.arange(len(lengths))
    samples = []
    for i in order.tolist():
        n = min(int(lengths[i]), QUICK_LENGTH) if quick else int(lengths[i])
        ids = rng.integers(1000 if vocab > 2000 else 5, vocab, n).astype(np.int64)
        label: Any = ids if name.startswith("llama") else classes[records[i]["label"]]
        samples.append({"input_ids": ids, "labels": label})
    return samples


def datamodule(name: str, quick: bool, max_tokens: int | str) -> BucketDataModule:
    packed = name.endswith("packed")
    return BucketDataModule(
        corpus(name, quick),
        pad_token_id=0,
        strategy="packed" if packed else "bucket",
        max_tokens=max_tokens,  # type: ignore[arg-type]
        max_length=(QUICK_LENGTH if quick else 512) if packed else None,
        seed=0,
    )


def min_tokens(name: str, quick: bool) -> int:
    """The smallest budget the plan accepts: the longest sample (bucketed) or one row (packed)."""
    return QUICK_LENGTH if quick else 512


PEAK, CAP = "allocated", True  # CudaMemory(peak=..., enforce_limit=...): --peak, --no-cap


def memory(quick: bool) -> DeviceMemory | None:
    if quick:
        return SavedTensorsMemory(QUICK_CAPACITY)
    return CudaMemory(peak=PEAK, enforce_limit=CAP)  # type: ignore[arg-type]


def trainer(quick: bool, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu" if quick else "cuda",
        devices=1,
        precision="32-true" if quick else "bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class _Peaks(Callback):
    """Peak memory of the training steps: CUDA's counters from train start, or (quick) the estimate per step,
    which raises a simulated out-of-memory error past its capacity like the finder's."""

    def __init__(self, quick: bool, fraction: float = 1.0) -> None:
        self.quick = quick
        self.estimate = SavedTensorsMemory(max(1, int(fraction * QUICK_CAPACITY)))
        self.steps = 0
        self.peak = 0
        self._ctx: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.quick:
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.quick:
            self._ctx = self.estimate.tracking(torch.device("cpu"))
            self._ctx.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps += 1
        if self.quick:
            self._ctx.__exit__(None, None, None)
            self.peak = max(self.peak, self.estimate.peak(torch.device("cpu")))


def full_run(
    name: str, quick: bool, budget: int, epochs: int, fraction: float = 1.0, limit_bytes: float | None = None
) -> dict[str, Any]:
    """Train ``epochs`` epochs at ``budget`` (this process) on ``fraction`` of the device (or on ``limit_bytes``):
    out of memory or not, the peaks, the time. The device is capped as the finder's probes are
    (``CudaMemory().limited``)."""
    torch.manual_seed(0)
    limit: float | None = None
    capped: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if not quick:
        cuda = torch.device("cuda", torch.cuda.current_device())
        limit = limit_bytes if limit_bytes else fraction * CudaMemory().capacity(cuda)
        capped = CudaMemory(enforce_limit=fraction < 1 or bool(limit_bytes)).limited(cuda, limit)
    peaks = _Peaks(quick, fraction)
    start = time.perf_counter()
    error = None
    try:
        with capped:
            trainer(quick, max_epochs=epochs, callbacks=[peaks]).fit(
                TransformerModule(**model_kwargs(name, quick)), datamodule=datamodule(name, quick, budget)
            )
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        error = str(exc).strip().splitlines()[0][:200]
    result: dict[str, Any] = {
        "max_tokens": budget,
        "epochs": epochs,
        "fraction": fraction,
        "ok": error is None,
        "error": error,
        "steps": peaks.steps,
        "seconds": time.perf_counter() - start,
    }
    if quick:
        result["peak_bytes"] = peaks.peak
    else:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        result["limit_gib"] = limit / GiB if limit is not None else None
    return result


class _StepPeaks(Callback):
    """Each training step's peak allocated and reserved memory and its batch's shape (CUDA)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.shape: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        torch.cuda.reset_peak_memory_stats()
        self.shape = list(batch["input_ids"].shape)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append(
            {
                "shape": self.shape,
                "allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                "reserved_gib": torch.cuda.max_memory_reserved() / GiB,
            }
        )


def user_run(name: str, epochs: int, fraction: float) -> dict[str, Any]:
    """What a user runs: one ``fit`` with ``TokenBudgetFinder()`` that then trains ``epochs`` epochs at the found
    budget on the whole device (this process); out of memory or not, each step's peak, the allocator's settings."""
    from lightning_txopt.memory import expandable_segments_enabled

    torch.manual_seed(0)
    before = expandable_segments_enabled()
    finder = TokenBudgetFinder(max_memory_fraction=fraction, min_tokens=min_tokens(name, False))
    peaks = _StepPeaks()
    error = None
    start = time.perf_counter()
    try:
        trainer(False, max_epochs=epochs, callbacks=[finder, peaks]).fit(
            TransformerModule(**model_kwargs(name, False)), datamodule=datamodule(name, False, "auto")
        )
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        error = str(exc).strip().splitlines()[0][:300]
    segments = torch.cuda.memory_snapshot()
    search = finder.search
    probe_peak = search.peak_of(finder.budget) if search is not None and finder.budget is not None else None
    worst = max(peaks.steps, key=lambda x: x["allocated_gib"], default=None)
    return {
        "max_tokens": finder.budget,
        "epochs": epochs,
        "ok": error is None,
        "error": error,
        "steps": len(peaks.steps),
        "seconds": time.perf_counter() - start,
        "finder_seconds": finder.seconds,
        "probes": None if search is None else [[b, p] for b, p in search.probes],
        "probe_seconds": None if search is None else list(search.seconds),
        "expandable_before": before,
        "expandable_after": expandable_segments_enabled(),
        "expandable_segments": sum(bool(seg.get("is_expandable")) for seg in segments),
        "segments": len(segments),
        "probe_peak_gib": None if probe_peak is None else probe_peak / GiB,
        "limit_gib": None if search is None else search.limit / GiB,
        "peak_allocated_gib": max((x["allocated_gib"] for x in peaks.steps), default=None),
        "peak_reserved_gib": max((x["reserved_gib"] for x in peaks.steps), default=None),
        "worst_step": worst,
        "per_step": peaks.steps,
    }


def _child(flag: str, args: list[str], what: str) -> dict[str, Any]:
    """This script with ``flag args`` in a fresh process; the JSON it prints after ``RESULT``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def run_isolated(
    name: str, quick: bool, budget: int, epochs: int, fraction: float = 1.0, limit_bytes: float | None = None
) -> dict[str, Any]:
    """:func:`full_run` in a fresh process on the GPU (an out-of-memory run leaves nothing behind); in-process with
    ``--quick``."""
    if quick:
        return full_run(name, quick, budget, epochs, fraction)
    args = [name, str(budget), str(epochs), str(fraction), str(limit_bytes or 0)]
    return _child("--child-run", args, f"full run at {budget}")


def child_user_run(name: str, epochs: int, fraction: float) -> dict[str, Any]:
    """:func:`user_run` in a fresh process (the allocator as the environment starts it)."""
    return _child("--child-user-run", [name, str(epochs), str(fraction)], "user run")


def find(name: str, args: argparse.Namespace, extra: list[Callback] | None = None) -> dict[str, Any]:
    """A fit with TokenBudgetFinder (after the ``extra`` callbacks) and one training step after it."""
    torch.manual_seed(0)
    finder = TokenBudgetFinder(
        max_memory_fraction=args.fraction, min_tokens=min_tokens(name, args.quick), memory=memory(args.quick)
    )
    dm = datamodule(name, args.quick, "auto")
    module = TransformerModule(**model_kwargs(name, args.quick))
    trainer(args.quick, max_steps=1, callbacks=[*(extra or []), finder]).fit(module, dm)
    search = finder.search
    assert search is not None and finder.budget is not None and finder.seconds is not None
    return {
        "max_tokens": finder.budget,
        "seconds": finder.seconds,
        "stopped": search.stopped,
        "limit": search.limit,
        "probes": [[b, p] for b, p in search.probes],
        "probe_seconds": list(search.seconds),
        "multiple": dm.token_budget_multiple,
    }


def by_hand(
    name: str, args: argparse.Namespace, start: int, multiple: int, limit: float | None = None
) -> dict[str, Any]:
    """Bisection by full runs: up by x1.25 from ``start`` until a run fails (down by x0.8 if ``start`` fails), then
    halve the gap down to 1% (at least one ``multiple``); on ``limit`` bytes (the finder's) where given."""
    runs: list[dict[str, Any]] = []

    def ok(budget: int) -> bool:
        # on the finder's own limit in bytes where it aims at the same share: this process's CUDA context takes
        # memory from the child's (0.7 GiB on an H200), so the same fraction would be a smaller device there
        same = args.hand_fraction == args.fraction and not args.quick and limit is not None
        result = run_isolated(
            name, args.quick, budget, args.reference_epochs, args.hand_fraction, limit if same else None
        )
        runs.append(result)
        print(f"  {name} by hand: {budget} tokens -> {'ok' if result['ok'] else 'out of memory'}", flush=True)
        return bool(result["ok"])

    def snap(x: float) -> int:
        return max(multiple, int(x) // multiple * multiple)

    good: int | None = None
    bad: int | None = None
    budget = snap(start)
    while len(runs) < args.max_runs:  # bracket: the first failure above a success, or success below a failure
        if ok(budget):
            good = budget
            if bad is not None:
                break
            budget = max(snap(budget * 1.25), budget + multiple)
        else:
            bad = budget
            if good is not None:
                break
            if budget <= multiple:
                break
            budget = min(snap(budget * 0.8), budget - multiple)
    while good is not None and bad is not None and bad - good > max(multiple, 0.01 * good):
        mid = snap((good + bad) / 2)
        if mid <= good or len(runs) >= args.max_runs:
            break
        if ok(mid):
            good = mid
        else:
            bad = mid
    return {"max_tokens": good, "first_failing": bad, "runs": runs}


class _AutoCheckpointing(Callback):
    """``GradientCheckpointing(every_n_layers="auto")``: the fewest checkpointed blocks that fit, at fit start."""

    def __init__(self, quick: bool, fraction: float) -> None:
        self.quick, self.fraction = quick, fraction
        self.choice: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, TransformerModule), f"expected a TransformerModule, got {type(pl_module).__name__}"
        model = pl_module.model

        def apply(every_n_layers: int | None) -> None:
            disable_gradient_checkpointing(model)
            if every_n_layers is not None:
                enable_gradient_checkpointing(model, every_n_layers=every_n_layers)

        blocks = int(model.config.num_hidden_layers)
        self.choice = fit_checkpointing(
            trainer, pl_module, apply, blocks, max_memory_fraction=self.fraction, memory=memory(self.quick)
        )


class _Timer(Callback):
    """Real tokens and seconds of the training steps after ``warmup`` (the device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.real, self.t0, self.t1 = warmup, 0, 0.0, 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.warmup:
            self.t0 = self._now()
        if trainer.global_step >= self.warmup:
            mask = batch.get("attention_mask")
            self.real += int(mask.sum()) if mask is not None and mask.dim() == 2 else int(batch["input_ids"].numel())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t1 = self._now()


def timed_run(name: str, args: argparse.Namespace, budget: int, callbacks: list[Callback]) -> dict[str, Any]:
    """``--timed-steps`` training steps after 3 warm-up steps at ``budget``: real tokens/s and peak memory."""
    gc.collect()
    if not args.quick:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    timer, peaks = _Timer(3), _Peaks(args.quick)
    trainer(args.quick, max_steps=3 + args.timed_steps, callbacks=[*callbacks, peaks, timer]).fit(
        TransformerModule(**model_kwargs(name, args.quick)), datamodule=datamodule(name, args.quick, budget)
    )
    result: dict[str, Any] = {"max_tokens": budget, "real_tokens_per_s": timer.real / max(timer.t1 - timer.t0, 1e-9)}
    if args.quick:
        result["peak_bytes"] = peaks.peak
    else:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
    return result


def checkpointing(name: str, args: argparse.Namespace, found: dict[str, Any]) -> dict[str, Any]:
    multiple = found["multiple"]
    budget = max(multiple, int(found["max_tokens"] * args.checkpoint_factor) // multiple * multiple)
    print(f"{name}: checkpointing to fit {budget} tokens...", flush=True)
    auto = _AutoCheckpointing(args.quick, args.fraction)
    chosen = timed_run(name, args, budget, [auto])
    choice = auto.choice
    chosen.update(every_n_layers=choice.every_n_layers, checkpointed=choice.checkpointed, probes=choice.probes)
    full = timed_run(name, args, budget, [GradientCheckpointing()])
    print(f"{name}: finder with every block checkpointed...", flush=True)
    larger = find(name, args, [GradientCheckpointing()])
    return {"max_tokens": budget, "auto": chosen, "full": full, "finder_with_checkpointing": larger}


def _user_run_logged(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`child_user_run` for ``--user-run``/``--only-user-run``, printed without its per-step list."""
    user = child_user_run(name, args.verify_epochs or 3, args.fraction)
    print(f"  {name} user run: {json.dumps({k: v for k, v in user.items() if k != 'per_step'})}", flush=True)
    return user


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.only_user_run:
        return {"model": name, "user_run": _user_run_logged(name, args)}
    print(f"{name}: finder...", flush=True)
    found = find(name, args)
    print(f"  {name} finder: max_tokens={found['max_tokens']} in {found['seconds']:.1f} s", flush=True)
    row: dict[str, Any] = {"model": name, "finder": found}
    if args.verify_epochs:
        verify = row["verify"] = run_isolated(name, args.quick, found["max_tokens"], args.verify_epochs)
        print(f"  {name} verify: {json.dumps(verify)}", flush=True)
    if args.user_run:
        row["user_run"] = _user_run_logged(name, args)
    if not args.no_reference:
        row["by_hand"] = by_hand(name, args, found["max_tokens"], found["multiple"], found["limit"])
    if args.checkpointing and name == "bert-bucket":
        row["checkpointing"] = checkpointing(name, args, found)
    return row


def report(result: dict[str, Any]) -> str:
    lines = [result["header"], ""]
    rows = []
    for r in result["rows"]:
        if "finder" not in r:
            continue
        found, hand, verify = r["finder"], r.get("by_hand"), r.get("verify")
        best = hand["max_tokens"] if hand else None
        ratio = found["max_tokens"] / best if best else float("nan")
        if verify is None:
            checked = "not run"
        elif not verify["ok"]:
            checked = f"OUT OF MEMORY ({verify['epochs']} epochs)"
        elif "peak_reserved_gib" in verify:
            checked = (
                f"ok, {verify['epochs']} epochs, {verify['steps']} steps, peak {verify['peak_allocated_gib']:.1f} "
                f"GiB allocated / {verify['peak_reserved_gib']:.1f} GiB reserved"
            )
        else:
            checked = f"ok, {verify['epochs']} epochs, {verify['steps']} steps, peak {verify['peak_bytes']:,} B"
        rows.append(
            [
                r["model"],
                found["max_tokens"],
                found["seconds"],
                len(found["probes"]),
                best if best is not None else "not run",
                ratio,
                len(hand["runs"]) if hand else 0,
                checked,
            ]
        )
    header = ["model", "finder max_tokens", "finder s", "probes", "by hand", "finder / hand", "full runs", "verify"]
    lines.append(markdown_table(header, rows))
    for r in result["rows"]:
        c = r.get("checkpointing")
        if c is None:
            continue
        auto, full, larger = c["auto"], c["full"], c["finder_with_checkpointing"]
        lines.append(
            f"\n{r['model']}, checkpointing to fit max_tokens={c['max_tokens']}: every_n_layers="
            f"{auto['every_n_layers']} ({auto['checkpointed']} blocks) at {auto['real_tokens_per_s']:,.0f} real "
            f"tokens/s, peak {_peak(auto, result)}; every block: {full['real_tokens_per_s']:,.0f} real tokens/s, "
            f"peak {_peak(full, result)} (auto / full: {auto['real_tokens_per_s'] / full['real_tokens_per_s']:.2f}x); "
            f"the finder with every block checkpointed: max_tokens={larger['max_tokens']} "
            f"({larger['max_tokens'] / r['finder']['max_tokens']:.2f}x the finder's without)"
        )
    for r in result["rows"]:
        if "finder" in r:
            probes = ", ".join(f"{b}: {'OOM' if p is None else _fmt(p, result)}" for b, p in r["finder"]["probes"])
            lines.append(f"\n{r['model']} probes (limit {_fmt(r['finder']['limit'], result)}): {probes}")
    users = [(r["model"], r["user_run"]) for r in result["rows"] if "user_run" in r]
    if users:
        lines.append("\nThe user's run: one fit, TokenBudgetFinder() then training at its budget (fresh process):\n")
        table = []
        for model, u in users:
            worst = u["worst_step"] or {}
            table.append(
                [
                    model,
                    u["max_tokens"],
                    "ok" if u["ok"] else f"OUT OF MEMORY: {u['error']}",
                    f"{u['steps']} steps, {u['epochs']} epochs",
                    f"{u['expandable_before']} -> {u['expandable_after']} ({u['expandable_segments']}/{u['segments']})",
                    u["limit_gib"],
                    u["probe_peak_gib"],
                    u["peak_allocated_gib"],
                    u["peak_reserved_gib"],
                    f"{worst.get('shape')}",
                ]
            )
        header = [
            "model",
            "max_tokens",
            "result",
            "trained",
            "expandable segments before -> after (segments)",
            "limit GiB",
            "probe peak GiB",
            "training peak allocated GiB",
            "reserved GiB",
            "worst step's batch",
        ]
        lines.append(markdown_table(header, table))
    return "\n".join(lines)


def _peak(run: dict[str, Any], result: dict[str, Any]) -> str:
    return _fmt(run["peak_bytes"] if "peak_bytes" in run else run["peak_allocated_gib"] * GiB, result)


def _fmt(value: float, result: dict[str, Any]) -> str:
    return f"{value:,.0f} B" if result["settings"]["quick"] else f"{value / GiB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny models, estimated memory")
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--fraction", type=float, default=0.9, help="TokenBudgetFinder(max_memory_fraction=...)")
    parser.add_argument("--peak", choices=["reserved", "allocated"], default="allocated", help="CudaMemory(peak=...)")
    parser.add_argument("--no-cap", action="store_true", help="CudaMemory(enforce_limit=False): probes uncapped")
    parser.add_argument("--hand-fraction", type=float, default=None, help="device share of the by-hand runs")
    parser.add_argument("--reference-epochs", type=int, default=1, help="epochs of each full run of the bisection")
    parser.add_argument("--verify-epochs", type=int, default=3, help="epochs at the found budget (0: skip)")
    parser.add_argument("--max-runs", type=int, default=12, help="most full runs of the bisection")
    parser.add_argument("--no-reference", action="store_true", help="skip the bisection by full runs")
    parser.add_argument("--checkpointing", action="store_true", help="checkpointing to a memory target (bert-bucket)")
    parser.add_argument("--checkpoint-factor", type=float, default=1.6, help="its budget, times the finder's")
    parser.add_argument("--timed-steps", type=int, default=10, help="timed steps of each checkpointing run")
    parser.add_argument(
        "--user-run",
        action="store_true",
        help="also one fit with the finder that trains --verify-epochs epochs (fresh process, the user's way)",
    )
    parser.add_argument("--only-user-run", action="store_true", help="the user run alone (no finder row, no bisection)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--report-from", default=None, help="print the report of a saved JSON and exit")
    parser.add_argument(
        "--child-run", nargs=5, metavar=("MODEL", "MAX_TOKENS", "EPOCHS", "FRACTION", "LIMIT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--child-user-run", nargs=3, metavar=("MODEL", "EPOCHS", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report_from:
        print(report(json.loads(Path(args.report_from).read_text())))
        return
    if args.child_run:
        name, budget, epochs, fraction, limit = args.child_run
        run = full_run(name, False, int(budget), int(epochs), float(fraction), float(limit) or None)
        print("RESULT " + json.dumps(run), flush=True)
        return
    if args.child_user_run:
        name, epochs, fraction = args.child_user_run
        print("RESULT " + json.dumps(user_run(name, int(epochs), float(fraction))), flush=True)
        return
    global PEAK, CAP
    PEAK, CAP = args.peak, not args.no_cap
    if args.hand_fraction is None:
        args.hand_fraction = args.fraction
    if not 0 < args.hand_fraction <= 1:
        parser.error(f"--hand-fraction must be in (0, 1], got {args.hand_fraction}")
    if args.quick and (args.user_run or args.only_user_run):
        parser.error("--user-run measures CUDA's allocator step by step: it has no --quick (CPU) form")
    if not args.quick and not torch.cuda.is_available():
        parser.error("needs a CUDA device (it measures GPU memory); use --quick for a CPU smoke run")
    device = "CPU (quick: tiny models, SavedTensorsMemory estimate)" if args.quick else torch.cuda.get_device_name()
    capacity = "" if args.quick else f", {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB"
    result: dict[str, Any] = {
        "header": (
            f"TokenBudgetFinder on {device}{capacity}; max_memory_fraction={args.fraction}, peak {args.peak}, "
            f"{'uncapped' if args.no_cap else 'probes capped at the limit'}; by hand: bisection by full runs of "
            f"{args.reference_epochs} epoch(s) to 1% on {args.hand_fraction} of the device; verify: "
            f"{args.verify_epochs} epochs at the found budget on the whole device; {environment()}; "
            f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}"
        ),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child_")},
        "rows": [measure(name, args) for name in args.only],
    }
    write_outputs(result, report(result), args.json, None, lambda *a: None)


if __name__ == "__main__":
    main()

"""Runs the rows of ``gpu_rows.py``: one function per kind of row, the shape warm-up, and the schedule (ABBA repeats,
the median run of each row).

Every kind counts the same way: a :class:`Window` times batches ``warmup + 1 .. warmup + steps`` (0-based
``warmup .. warmup + steps - 1``) and counts their real tokens and samples from the samples handed to the collator
(on the CPU: no device sync in the timed loop) and their processed tokens from the collated ``input_ids``.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _common import environment, hf_sampling_kwargs, hf_training_arguments, synced_time
from gpu_rows import PAIR, Row, Settings, window_error
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from workloads import FLOPS_FORMULA, Workload, build_workload, model_flops, peak_tflops

from lightning_txopt.data import BucketBatchSampler, BucketDataModule, PaddingCollator
from lightning_txopt.data.flat import SampleBatch
from lightning_txopt.models import use_varlen_attention
from lightning_txopt.module import TransformerModule

__all__ = [
    "CountingCollator",
    "Runner",
    "Window",
    "schedule",
    "summarize",
]


class Window:
    """Times steps ``warmup + 1 .. warmup + steps`` and counts their tokens."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = 0.0
        self.real = self.processed = self.samples = 0
        self.square_lengths = 0  # sum of each sample's length squared: the attention term of model FLOPs

    def batch(self, step: int, lengths: Sequence[int], processed: int) -> None:
        """Call before step ``step`` (0-based) runs on a batch of samples of ``lengths`` (``processed`` tokens)."""
        if step == self.warmup:
            self.t0 = synced_time()
        if self.warmup <= step < self.warmup + self.steps:
            self.real += int(sum(lengths))
            self.square_lengths += int(sum(n * n for n in lengths))
            self.processed += int(processed)
            self.samples += len(lengths)

    def end(self) -> None:
        self.t1 = synced_time()

    def row(self, title: str, peak: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        seconds = max(self.t1 - self.t0, 1e-9)
        return {
            "row": title,
            "real_tokens_per_s": self.real / seconds,
            "samples_per_s": self.samples / seconds,
            "padding_efficiency": self.real / max(self.processed, 1),
            "peak_memory_gib": peak,
            "seconds": seconds,
            "real_tokens": self.real,
            **(extra or {}),
        }


def _lengths(samples: Sequence[dict[str, Any]] | SampleBatch) -> list[int]:
    if isinstance(samples, SampleBatch):  # the DataModule's loader reads lists of samples as columns
        return samples.lengths.tolist()
    return [len(s["input_ids"]) for s in samples]


def reset_memory(cuda: bool) -> None:
    gc.collect()  # the previous row's model, optimizer and Trainer must not survive into this row's measurement
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def _hf_model(workload: Workload) -> torch.nn.Module:
    auto = AutoModelForCausalLM if workload.task == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_config(workload.config, attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------ Hugging Face Trainer
def hf_trainer_row(
    title: str,
    workload: Workload,
    settings: Settings,
    *,
    fixed: bool,
    bf16: bool,
    sampling: str | None = None,
    multiple_of: int | None = None,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """The HF Trainer, batches of 32; ``sampling``: its ``group_by_length`` or ``batch_rebalance`` strategy."""
    from transformers import Trainer, TrainerCallback

    cuda = torch.cuda.is_available()
    window = Window(settings.warmup, settings.steps)
    collate = PaddingCollator(
        0, padding="max_length" if fixed else "longest", max_length=512, pad_to_multiple_of=multiple_of
    )
    collations = 0

    def collator(features: list[dict]) -> dict[str, torch.Tensor]:
        nonlocal collations
        batch = collate(features)
        window.batch(collations, _lengths(features), batch["input_ids"].numel())  # num_workers=0: k-th collation
        collations += 1  # feeds the k-th step
        return batch

    class End(TrainerCallback):
        def on_train_end(self, *a: Any, **k: Any) -> None:
            window.end()

    torch.manual_seed(0)
    model = _hf_model(workload)
    with tempfile.TemporaryDirectory() as out:
        targs = hf_training_arguments(
            out,
            per_device_train_batch_size=32,
            max_steps=settings.warmup + settings.steps,
            learning_rate=5e-5,
            bf16=bf16,
            gradient_checkpointing=checkpointing,
            **(hf_sampling_kwargs(sampling) if sampling else {}),
        )
        reset_memory(cuda)
        Trainer(
            model=model, args=targs, train_dataset=workload.samples, data_collator=collator, callbacks=[End()]
        ).train()
    return window.row(title, peak_gib(cuda))


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
    title: str,
    workload: Workload,
    settings: Settings,
    *,
    hf_loss: bool = False,
    trainer_batches: bool = False,
    precollated: bool = False,
    attention: str = "sdpa",
) -> dict[str, Any]:
    """``trainer_batches``: iterate the HF Trainer's length-grouped batches of 32 (multiple of 8) instead of ours.

    ``precollated``: collate every batch and move it to the device before the loop (no data path in the timing).
    ``attention``: ``"sdpa"`` (transformers' SDPA) or ``"auto"`` (the model switched to the library's backend with
    ``use_varlen_attention``, as ``TransformerModule(attn_implementation="auto")`` builds it).
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    window = Window(settings.warmup, settings.steps)
    samples = workload.samples
    lengths = workload.lengths
    sampler: Any = (
        _TrainerGroupedBatches(lengths)
        if trainer_batches
        else BucketBatchSampler(lengths, max_tokens=settings.max_tokens, seed=0)
    )
    collate = PaddingCollator(0, pad_to_multiple_of=8 if trainer_batches else None)
    torch.manual_seed(0)
    model = _hf_model(workload)
    if attention == "auto":
        use_varlen_attention(model)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=cuda or None)
    reset_memory(cuda)
    step = 0
    total = settings.warmup + settings.steps

    def batches() -> Any:
        while True:
            for indices in sampler:
                chosen = [samples[i] for i in indices]
                yield chosen, collate(chosen)
            sampler.set_epoch(sampler.epoch + 1)

    source: Any = batches()
    if precollated:
        ready = []
        # strict=False: the first `total` batches of an endless source (it cycles over epochs)
        for _, (chosen, batch) in zip(range(total), source, strict=False):
            ready.append((chosen, {k: v.to(device) for k, v in batch.items()}))
        source = iter(ready)
    while step < total:
        for chosen, batch in source:
            if step >= total:
                break
            window.batch(step, _lengths(chosen), batch["input_ids"].numel())
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
    window.end()
    del model, opt
    return window.row(title, peak_gib(cuda))


def warm_up(workload: Workload, settings: Settings, budget: int | None = None) -> None:
    """One untimed pass over the batch shapes the rows will use, so that no row pays the first-use cost of a shape
    (kernel selection and attention plans, allocator growth): the token-budget shapes of three epochs, batch-32
    shapes with dynamic padding, fixed 512, in fp32 and bf16. Without it the first row to meet a shape measured up to
    4.6x slower. ``budget``: only the shapes of that token budget (a row with another budget warms up its own)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    samples = workload.samples
    torch.manual_seed(0)
    model = _hf_model(workload).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda or None)
    sampler = BucketBatchSampler(workload.lengths, max_tokens=budget or settings.max_tokens, seed=0)
    plans: list[tuple[list[int], PaddingCollator, bool]] = []
    for epoch in range(3):  # the timed rows run into later epochs: new shuffles, a few new shapes
        sampler.set_epoch(epoch)
        plans += [(list(b), PaddingCollator(0), True) for b in sampler]
    if budget is None:
        rng = np.random.default_rng(1)
        dynamic = [rng.permutation(len(samples))[:32].tolist() for _ in range(2 if settings.quick else 120)]
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
    reset_memory(cuda)


# ------------------------------------------------------------------------------------------ lightning_txopt
class CountingCollator:
    """Wraps the DataModule's collator: counts each batch on the CPU (no device sync in the timed loop)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.pending: list[tuple[list[int], int]] = []  # (sample lengths, processed tokens) per collated batch

    def __getattr__(self, name: str) -> Any:  # padded_lengths & co.: the DataModule plans batches with them
        if name.startswith("__") or name == "collate":  # unpickling (ddp_spawn) looks these up before __init__
            raise AttributeError(name)
        return getattr(self.collate, name)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(samples)
        self.pending.append((_lengths(samples), int(batch["input_ids"].numel())))
        return batch


class CountingDataModule(BucketDataModule):
    """A BucketDataModule whose ``count_split`` batches pass through a :class:`CountingCollator` (picklable)."""

    def __init__(self, *args: Any, count_split: str = "train", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_split = count_split
        self.counter = CountingCollator(None)

    def collator_for(self, split: str, max_tokens: int | None = None) -> Any:
        collate = super().collator_for(split, max_tokens)
        if split != self.count_split:
            return collate
        self.counter.collate = collate
        return self.counter


class _LightningWindow(pl.Callback):
    def __init__(self, window: Window, counter: CountingCollator) -> None:
        self.window = window
        self.counter = counter
        self.step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.window.batch(self.step, *self.counter.pending.pop(0))  # batches arrive in collation order
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


def flops_info(model: Any, tokens: int, squared_lengths: int, seconds: float, peak_tf: float | None) -> dict[str, Any]:
    """Model FLOPs of a timed window and the MFU they give (``workloads.FLOPS_FORMULA``)."""
    config = model.config
    params = int(model.num_parameters(exclude_embeddings=True))
    flops = model_flops(params, int(config.num_hidden_layers), int(config.hidden_size), tokens, squared_lengths)
    tflops = flops / max(seconds, 1e-9) / 1e12
    return {
        "non_embedding_params": params,
        "sum_squared_lengths": squared_lengths,
        "model_flops": flops,
        "model_tflops_per_s": tflops,
        "peak_tflops": peak_tf,
        "mfu": tflops / peak_tf if peak_tf else None,
    }


def lightning_row(
    title: str,
    workload: Workload,
    settings: Settings,
    *,
    warmup: int | None = None,
    accumulate: int = 1,
    callbacks: Callable[[], list[Any]] | None = None,
    strategy: str = "bucket",
    max_length: int | None = None,
    pin_memory: bool = True,
    max_tokens: int | None = None,
    pad_to_lengths: list[int] | None = None,
    model_compile: str | None = None,
    static_shapes: bool | None = None,
    causal: bool = False,
    attn_implementation: str = "sdpa",
    module_compile: bool | None = None,
    compile_mode: str | None = None,
    flops: bool = False,
) -> dict[str, Any]:
    """One Lightning run. ``model_compile``: ``None`` (eager), ``"default"`` (``model.compile()``: dynamo specialises
    on the first shape, then recompiles with dynamic shapes) or ``"ladder"`` (static widths from ``pad_to_lengths``,
    dynamic batch dimension). ``warmup`` overrides ``--warmup`` (compiled rows warm up over a whole epoch of shapes).
    ``accumulate``: batches per optimizer step (an ``AccumulationScheduler`` among ``callbacks`` must say the same):
    the row still times ``--steps`` batches, so its tokens/s compare with the other rows'. ``static_shapes``,
    ``attn_implementation`` and ``module_compile`` (``TransformerModule(compile=...)``) are issue #15's API; the first
    and last are passed only when set, so rows that do not use them run on a library without them (``compile_mode``
    too: ``"reduce-overhead"`` replays the compiled graphs as CUDA graphs)."""
    cuda = torch.cuda.is_available()
    warm = settings.warmup if warmup is None else warmup
    if error := window_error(warm, settings.steps, accumulate):
        raise ValueError(error)
    window = Window(warm, settings.steps)
    budget = max_tokens or settings.max_tokens
    new_dm: dict[str, Any] = {} if static_shapes is None else {"static_shapes": static_shapes}
    dm = CountingDataModule(
        workload.samples,
        pad_token_id=0,
        strategy=strategy,
        max_tokens=budget,
        max_length=max_length,
        pad_to_lengths=pad_to_lengths,
        seed=0,
        pin_memory=pin_memory,
        causal=causal,
        **new_dm,
    )
    counter = dm.counter
    torch.manual_seed(0)
    new_module: dict[str, Any] = {} if module_compile is None else {"compile": module_compile}
    if compile_mode is not None:  # TransformerModule(compile_mode=...): passed only when set, like the two above
        new_module["compile_mode"] = compile_mode
    if module_compile:
        torch._dynamo.reset()
    module = TransformerModule(**workload.module_kwargs(), attn_implementation=attn_implementation, **new_module)
    extra: list[Any] = []
    if model_compile is not None:
        torch._dynamo.reset()
        module.model.compile()  # in place: parameter names and checkpoints unchanged
        if model_compile == "ladder":
            extra.append(_DynamicBatchDim())
    graphs0 = _compiled_graphs()
    trainer = pl.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=(warm + settings.steps) // accumulate,
        callbacks=[*(callbacks() if callbacks else []), *extra, _LightningWindow(window, counter)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    reset_memory(cuda)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    info: dict[str, Any] = {"max_tokens": budget}
    if model_compile is not None or module_compile:
        info.update(graphs=_compiled_graphs() - graphs0, warmup_seconds=window.t0 - start, warmup_steps=warm)
    if flops:
        seconds = window.t1 - window.t0
        info.update(flops_info(module.model, window.real, window.square_lengths, seconds, settings.peak_tflops))
    result = window.row(title, peak_gib(cuda), info)
    del trainer, module, dm
    return result


def probe_peak_gib(workload: Workload, settings: Settings, max_tokens: int) -> float:
    """Peak memory of TransformerModule training steps (bf16 autocast, fused AdamW, gradients freed after each step as
    TransformerModule does) on the largest batches of a ``max_tokens`` plan: most padded tokens, and longest rows."""
    device = torch.device("cuda")
    samples, lengths = workload.samples, workload.lengths
    plan = [list(b) for b in BucketBatchSampler(lengths, max_tokens=max_tokens, seed=0)]
    cost = [len(b) * int(lengths[b].max()) for b in plan]
    order = [*np.argsort(cost)[::-1][:3].tolist(), int(np.argmax([lengths[b].max() for b in plan]))]
    torch.manual_seed(0)
    module = TransformerModule(**workload.module_kwargs()).to(device)
    opt = torch.optim.AdamW(module.optimizer_groups(), lr=1e-6, fused=True)
    collate = PaddingCollator(0)
    reset_memory(True)
    for i in order:
        batch = {k: v.to(device) for k, v in collate([samples[j] for j in plan[i]]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.loss_and_items(batch, "mean")[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_gib(True)
    del module, opt
    reset_memory(True)
    return peak


def budget_for_peak(workload: Workload, settings: Settings, target_gib: float) -> tuple[int, list[Any]]:
    """The token budget whose peak memory is ``target_gib``: a line through two probes, then a check probe."""
    lo, hi = settings.max_tokens // 2, settings.max_tokens
    p_lo, p_hi = probe_peak_gib(workload, settings, lo), probe_peak_gib(workload, settings, hi)
    budget = int(lo + (target_gib - p_lo) * (hi - lo) / (p_hi - p_lo)) // 64 * 64
    budget = max(budget, 512)
    return budget, [(lo, p_lo), (hi, p_hi), (budget, probe_peak_gib(workload, settings, budget))]


def matched_memory_row(
    title: str, workload: Workload, settings: Settings, *, target_gib: float | None
) -> dict[str, Any]:
    """Lightning row with a token budget sized to ``target_gib`` (the HF length-grouped row's peak, or --match-gib)."""
    if not torch.cuda.is_available() or target_gib is None:
        row = lightning_row(title, workload, settings)
        row["calibration"] = "none: no CUDA device or no reference peak"
        return row
    budget, probes = budget_for_peak(workload, settings, target_gib)
    warm_up(workload, settings, budget)  # its own shapes, as every other row had
    row = lightning_row(f"{title} = {budget}", workload, settings, max_tokens=budget)
    row["calibration"] = {"target_gib": target_gib, "probes_max_tokens_gib": probes}
    return row


# ------------------------------------------------------------------------------------------ schedule
def schedule(selected: Sequence[str], repeats: int, repeat_all: bool, pair: Sequence[str] = PAIR) -> list[str]:
    """The order rows run in: the pair (plain loop and Lightning; with ``repeat_all`` every selected row) ``repeats``
    times in ABBA order (neither always first), before any other row can leave state behind in the process; then
    every other row once, in table order.

    Example:
        >>> schedule(["hf", "plain", "lightning", "packed"], 3, False)
        ['plain', 'lightning', 'lightning', 'plain', 'plain', 'lightning', 'hf', 'packed']
    """
    first = list(selected) if repeat_all else [n for n in selected if n in pair]
    order: list[str] = []
    for repeat in range(repeats):
        order += first if repeat % 2 == 0 else first[::-1]
    return order + [n for n in selected if n not in first]


def summarize(runs: dict[str, list[dict[str, Any]]], table_order: Sequence[str]) -> list[dict[str, Any]]:
    """One row per name that ran, in table order: its run with the median throughput (the lower one of an even
    count), every run's figure kept in ``runs_real_tokens_per_s`` when there are several."""
    rows = []
    for name in (n for n in table_order if n in runs):
        ranked = sorted(runs[name], key=lambda r: r["real_tokens_per_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        if len(ranked) > 1:
            row["runs_real_tokens_per_s"] = [r["real_tokens_per_s"] for r in runs[name]]
        rows.append(row)
    return rows


class Runner:
    """Runs selected rows with one :class:`Settings`: builds each workload once, warms up each (workload, budget)'s
    shapes once, and keeps every run of every row."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.warmed: set[tuple[str, str, int | None]] = set()
        self.runs: dict[str, list[dict[str, Any]]] = {}

    def workload(self, row: Row) -> Workload:
        key = (row.model, row.data)
        if key not in self.workloads:
            self.workloads[key] = build_workload(row.model, row.data, self.settings.quick)
        return self.workloads[key]

    def warm(self, row: Row) -> None:
        """The shape pass of a row's workload: once for the main workload (every shape of the classic rows), once
        for each other (workload, budget)."""
        budget = row.options.get("max_tokens")
        main = (row.model, row.data) == ("bert", "corpus") and budget in (None, self.settings.max_tokens)
        key = ("bert", "corpus", None) if main else (row.model, row.data, budget)
        if key not in self.warmed:
            self.warmed.add(key)
            warm_up(self.workload(row), self.settings, None if main else budget)

    def run(self, row: Row) -> dict[str, Any]:
        self.warm(row)  # (a no-op when run_rows warmed it up before any row)
        workload, settings = self.workload(row), self.settings
        if row.kind == "hf":
            result = hf_trainer_row(row.title, workload, settings, **row.options)
        elif row.kind == "plain":
            result = plain_loop_row(row.title, workload, settings, **row.options)
        elif row.kind == "matched":
            result = matched_memory_row(row.title, workload, settings, target_gib=self.target_gib(row))
        else:
            options = dict(row.options, warmup=row.warmup, accumulate=row.accumulate, flops=row.flops)
            result = lightning_row(row.title, workload, settings, **options)
        result = {"name": row.name, **result}
        self.runs.setdefault(row.name, []).append(result)
        self.log(f"done: {result['row']}: {result['real_tokens_per_s']:,.0f} real tokens/s")
        return result

    def target_gib(self, row: Row) -> float | None:
        """The peak memory a matched row sizes its budget to: ``--match-gib``, else the first measured run (CUDA
        only) of the row it matches."""
        if self.settings.match_gib is not None:
            return self.settings.match_gib
        reference = self.runs.get(row.options["match_peak_of"])
        return reference[0]["peak_memory_gib"] if reference and torch.cuda.is_available() else None


def header(rows: Sequence[Row], settings: Settings, repeats: int, repeat_all: bool) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    models = "BERT-base shape"
    if any(r.model == "llama" for r in rows):
        models = "BERT-base shape and a Llama-shape decoder" if any(r.model == "bert" for r in rows) else "Llama shape"
    sdpa = all(r.options.get("attn_implementation", "sdpa") == "sdpa" for r in rows)
    attention = "every model: attn_implementation='sdpa'" if sdpa else "attention: sdpa unless the row says otherwise"
    text = (
        f"{device}, {models}{' (quick: tiny)' if settings.quick else ''}, {settings.steps} timed optimizer steps "
        f"per row after {settings.warmup} warm-up steps ({attention})"
    )
    if repeats > 1:
        repeated = "every row" if repeat_all else "plain loop and Lightning rows"
        text += f"; {repeated}: median of {repeats} runs in ABBA order"
    return text


def run_rows(
    rows: Sequence[Row], settings: Settings, repeats: int, repeat_all: bool, skipped: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``rows`` (all runnable) as :func:`schedule` says and return the result (what ``--json`` writes)."""
    runner = Runner(settings, log=lambda line: print(line, flush=True))
    by_name = {r.name: r for r in rows}
    for row in rows:  # every shape pass before the first timed row
        runner.warm(row)
    for name in schedule([r.name for r in rows], repeats, repeat_all):
        runner.run(by_name[name])
    result: dict[str, Any] = {
        "header": header(rows, settings, repeats, repeat_all),
        "environment": environment(),
        "rows": summarize(runner.runs, [r.name for r in rows]),
    }
    plain_runs, lightning_runs = runner.runs.get(PAIR[0], []), runner.runs.get(PAIR[1], [])
    if plain_runs and lightning_runs:
        ratios = [
            a["real_tokens_per_s"] / b["real_tokens_per_s"] for a, b in zip(lightning_runs, plain_runs, strict=True)
        ]
        result["lightning_over_plain_loop"] = {"pairs": ratios, "median": statistics.median(ratios)}
    if any(r.flops for r in rows):
        result["flops_formula"] = FLOPS_FORMULA
    if skipped:
        result["skipped"] = dict(skipped)
    return result


def default_peak_tflops() -> float | None:
    """The dense bf16 peak of this process's GPU, when known (``None`` on CPU)."""
    return peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None

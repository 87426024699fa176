"""The rows of ``gpu_compare.py``: each row is named once, with its title, its kind of run and its options.

A row is data: ``gpu_runner.py`` runs it, ``gpu_report.py`` prints it. ``--only`` takes row names (and the group
names below); ``--list`` prints them. The JSON keeps both: ``"name"`` (what ``--only`` takes) and ``"row"`` (the
title shown in the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "GROUPS",
    "LADDER",
    "PAIR",
    "Row",
    "Settings",
    "define_rows",
    "groups_of",
    "select",
    "window_error",
]

Kind = Literal["hf", "plain", "lightning", "matched"]
LADDER = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]  # steps of about sqrt(2)
PAIR = ("plain", "lightning")  # the plain loop and the main Lightning row: run first, repeated by --repeats
# issue #15: token budgets and the data of the new rows (``--quick`` divides the budgets by 8)
ISSUE15_BUDGETS = (16_384, 65_536)
GROUPS = {
    "pair": "the plain loop and the main Lightning row",
    "hf": "the Hugging Face Trainer rows",
    "compile": "the torch.compile and ladder rows of --compile",
    "issue15": "issue #15: bucketed vs packed varlen, static shapes and compile, at 16k and 64k tokens, two length "
    "distributions, and a decoder",
    "decoder": "the Llama-shape causal LM rows (part of issue15)",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row of a run shares (the command line, with ``--quick``'s limits applied once, here)."""

    steps: int = 40
    warmup: int = 8
    max_tokens: int = 16384
    compile_warmup: int = 50
    quick: bool = False
    match_gib: float | None = None
    peak_tflops: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        steps, warmup, max_tokens, compile_warmup = args.steps, args.warmup, args.max_tokens, args.compile_warmup
        if args.quick:
            steps, warmup, max_tokens = min(steps, 3), min(warmup, 1), min(max_tokens, 2048)
            compile_warmup = min(compile_warmup, 2)
        return cls(
            steps=steps,
            warmup=warmup,
            max_tokens=max_tokens,
            compile_warmup=compile_warmup,
            quick=args.quick,
            match_gib=args.match_gib,
            peak_tflops=getattr(args, "peak_tflops", None),
        )

    def budget(self, tokens: int) -> int:
        """A fixed token budget of a row (issue #15's 16,384 and 65,536), scaled down for ``--quick``."""
        return tokens // 8 if self.quick else tokens


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: ``name`` for ``--only``, ``title`` for the table, ``kind`` of run with its ``options``.

    ``warmup``: untimed steps (``None``: ``--warmup``); ``accumulate``: batches per optimizer step; ``requires``: API
    pieces (keys of ``api_check.PIECES``) without which the row is skipped; ``model``/``data``: the workload
    (``workloads.py``); ``flops``: also record model FLOPs and MFU; ``default``: run without ``--only``.
    """

    name: str
    title: str
    kind: Kind
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    groups: tuple[str, ...] = ()
    default: bool = True
    warmup: int | None = None
    accumulate: int = 1
    requires: tuple[str, ...] = ()
    model: str = "bert"
    data: str = "corpus"
    flops: bool = False

    def warmup_steps(self, settings: Settings) -> int:
        return settings.warmup if self.warmup is None else self.warmup


def window_error(warm: int, steps: int, accumulate: int) -> str | None:
    """Why a row's window of batches cannot end on an optimizer step, or ``None`` when it can."""
    if (warm + steps) % accumulate:
        return f"warm-up + steps ({warm} + {steps}) must be a multiple of accumulate={accumulate}."
    return None


def _callbacks(*factories: Callable[[], Any]) -> Callable[[], list[Any]]:
    """A fresh set of callbacks for each run of a row (a repeated row must not inherit a callback's state)."""
    return lambda: [make() for make in factories]


def define_rows(settings: Settings) -> list[Row]:
    """Every row, in table order (the order they are reported in)."""
    from workloads import bert_config

    from lightning_txopt.callbacks import (
        AccumulationScheduler,
        FreezeEmbeddings,
        GradientCheckpointing,
        ParameterSharing,
        TokenThroughputMonitor,
    )

    T = settings.max_tokens
    unique = max(1, bert_config(settings.quick).num_hidden_layers // 3)  # ALBERT-like: 4 unique of BERT-base's 12
    hf: dict[str, Any] = dict(fixed=False, bf16=True)
    grouped = dict(hf, sampling="group_by_length", multiple_of=8)
    cw = settings.compile_warmup

    def hf_row(name: str, title: str, options: dict[str, Any], *also: str) -> Row:
        return Row(name, title, "hf", options=options, groups=("hf",), requires=("accelerate", *also))

    rows = [
        hf_row("hf_fixed_fp32", "HF Trainer: fixed padding 512, fp32, batch 32", dict(fixed=True, bf16=False)),
        hf_row("hf_dynamic", "HF Trainer: dynamic padding, bf16, batch 32", hf),
        hf_row("hf_grouped", "HF Trainer: group_by_length, bf16, multiple of 8, batch 32", grouped),
        hf_row(
            "hf_grouped_checkpointing",
            "HF Trainer: group_by_length + gradient checkpointing",
            dict(grouped, checkpointing=True),
        ),
        hf_row(  # only recent transformers releases have it
            "hf_rebalance",
            "HF Trainer: batch_rebalance, bf16, multiple of 8, batch 32",
            dict(grouped, sampling="batch_rebalance"),
            "batch_rebalance",
        ),
        Row(
            "plain_hf_batches",
            "plain PyTorch loop over the HF Trainer's length-grouped batches of 32 (multiple of 8), bf16, AdamW fused",
            "plain",
            options=dict(hf_loss=True, trainer_batches=True),
        ),
        Row(
            "plain", f"plain PyTorch loop: our token-budget batches ({T}), bf16, AdamW fused", "plain", groups=("pair",)
        ),
        Row(
            "plain_precollated",
            f"plain PyTorch loop: the same batches ({T}) collated and on the GPU before timing, bf16, AdamW fused",
            "plain",
            options=dict(precollated=True),
        ),
        Row(
            "plain_precollated_auto",
            f"plain PyTorch loop: the same batches ({T}) pre-collated, the model on the library's default attention "
            "(use_varlen_attention: SDPA, no host read of the mask), bf16, AdamW fused",
            "plain",
            options=dict(precollated=True, attention="auto"),
            default=False,
        ),
        Row(
            "plain_hf_loss",
            "plain PyTorch loop, same batches, labels passed to the model (its own loss)",
            "plain",
            options=dict(hf_loss=True),
        ),
        Row(
            "lightning", f"lightning_txopt: BucketDataModule max_tokens={T}, bf16-mixed", "lightning", groups=("pair",)
        ),
        Row(
            "lightning_matched_memory",
            "lightning_txopt: max_tokens sized to the HF length-grouped row's peak memory",
            "matched",
            options=dict(match_peak_of="hf_grouped"),
        ),
        Row("lightning_no_pin", "lightning_txopt: same, pin_memory=False", "lightning", options=dict(pin_memory=False)),
        Row(
            "freeze",
            "lightning_txopt: + FreezeEmbeddings",
            "lightning",
            options=dict(callbacks=_callbacks(FreezeEmbeddings)),
        ),
        Row(
            "freeze_checkpointing",
            "lightning_txopt: + FreezeEmbeddings + GradientCheckpointing",
            "lightning",
            options=dict(callbacks=_callbacks(FreezeEmbeddings, GradientCheckpointing)),
        ),
        Row(
            "throughput_monitor",
            "lightning_txopt: + TokenThroughputMonitor",
            "lightning",
            options=dict(callbacks=_callbacks(TokenThroughputMonitor)),
        ),
        Row(
            "accumulation",
            'lightning_txopt: + AccumulationScheduler({0: 2}, normalize="tokens"), tokens/s per batch',
            "lightning",
            options=dict(callbacks=_callbacks(lambda: AccumulationScheduler({0: 2}, normalize="tokens"))),
            accumulate=2,
        ),
        Row(
            "sharing",
            f'lightning_txopt: + ParameterSharing({unique}, strategy="cycle_rev")',
            "lightning",
            options=dict(callbacks=_callbacks(lambda: ParameterSharing(unique, strategy="cycle_rev"))),
        ),
        Row(
            "packed",
            f"lightning_txopt: packed rows of 512, max_tokens={T}, bf16-mixed",
            "lightning",
            options=dict(strategy="packed", max_length=512),
        ),
        # --compile: the HF model compiled in place, timed after --compile-warmup untimed steps
        Row(
            "ladder_eager",
            f"lightning_txopt: pad_to_lengths={LADDER}, eager",
            "lightning",
            options=dict(pad_to_lengths=LADDER),
            groups=("compile",),
            default=False,
            warmup=cw,
        ),
        Row(
            "compile",
            "lightning_txopt: torch.compile, no ladder",
            "lightning",
            options=dict(model_compile="default"),
            groups=("compile",),
            default=False,
            warmup=cw,
        ),
        Row(
            "compile_ladder",
            f"lightning_txopt: torch.compile + pad_to_lengths={LADDER}",
            "lightning",
            options=dict(model_compile="ladder", pad_to_lengths=LADDER),
            groups=("compile",),
            default=False,
            warmup=cw,
        ),
    ]
    return rows + issue15_rows(settings)


def issue15_rows(settings: Settings) -> list[Row]:
    """Issue #15's rows: written against the API it asks for (``BucketDataModule(static_shapes=...)``,
    ``TransformerModule(attn_implementation="auto", compile=...)``); each is skipped, with the missing piece named,
    until that API exists. Every one records model FLOPs and MFU."""
    rows: list[Row] = []
    cw = settings.compile_warmup
    common: dict[str, Any] = dict(kind="lightning", groups=("issue15",), default=False, flops=True)
    auto = "auto_attention"
    for tokens in ISSUE15_BUDGETS:
        b = settings.budget(tokens)
        varlen = dict(strategy="packed", max_length=512, max_tokens=b, static_shapes=False, attn_implementation="auto")
        static = dict(varlen, static_shapes=True, module_compile=True)
        for data in ("corpus", "lognormal"):
            key = f"{data}.{tokens // 1024}k"
            rows += [
                Row(
                    f"bucket_eager.{key}",
                    f"{data} lengths: BucketDataModule max_tokens={b}, sdpa, eager",
                    options=dict(max_tokens=b),
                    data=data,
                    **common,
                ),
                Row(
                    f"bucket_auto.{key}",
                    f'{data} lengths: BucketDataModule max_tokens={b}, attn "auto" (the default: SDPA for padded '
                    "batches, the mask built without a host sync), eager",
                    options=dict(max_tokens=b, attn_implementation="auto"),
                    requires=(auto,),
                    data=data,
                    **common,
                ),
                Row(
                    f"packed_varlen.{key}",
                    f'{data} lengths: packed rows of 512, max_tokens={b}, attn "auto" (varlen), eager',
                    options=varlen,
                    requires=(auto, "static_shapes"),
                    data=data,
                    **common,
                ),
                Row(
                    f"packed_static_compile.{key}",
                    f'{data} lengths: packed rows of 512, max_tokens={b}, static shapes, attn "auto" (varlen), '
                    "compile=True",
                    options=static,
                    requires=(auto, "static_shapes", "module_compile"),
                    warmup=cw,
                    data=data,
                    **common,
                ),
                Row(
                    f"packed_static_cudagraphs.{key}",
                    f'{data} lengths: packed rows of 512, max_tokens={b}, static shapes, attn "auto" (varlen), '
                    'compile=True, compile_mode="reduce-overhead" (CUDA graphs)',
                    options=dict(static, compile_mode="reduce-overhead"),
                    requires=(auto, "static_shapes", "module_compile", "compile_mode"),
                    warmup=cw,
                    data=data,
                    **common,
                ),
                Row(
                    f"bucket_compile_ladder.{key}",
                    f"{data} lengths: BucketDataModule max_tokens={b}, pad_to_lengths ladder, sdpa, compile=True",
                    options=dict(max_tokens=b, pad_to_lengths=LADDER, module_compile=True),
                    requires=("module_compile",),
                    warmup=cw,
                    data=data,
                    **common,
                ),
            ]
        decoder = dict(common, groups=("issue15", "decoder"), model="llama", data="corpus")
        rows += [
            Row(
                f"llama_bucket.corpus.{tokens // 1024}k",
                f"Llama causal LM, corpus lengths: BucketDataModule max_tokens={b}, sdpa, eager",
                options=dict(max_tokens=b),
                **decoder,
            ),
            Row(
                f"llama_packed_varlen.corpus.{tokens // 1024}k",
                f'Llama causal LM, corpus lengths: packed rows of 512, max_tokens={b}, attn "auto" (varlen), eager',
                options=dict(varlen, causal=True),
                requires=(auto, "static_shapes"),
                **decoder,
            ),
            Row(
                f"llama_packed_static_compile.corpus.{tokens // 1024}k",
                f'Llama causal LM, corpus lengths: packed rows of 512, max_tokens={b}, static shapes, attn "auto" '
                "(varlen), compile=True",
                options=dict(static, causal=True),
                requires=(auto, "static_shapes", "module_compile"),
                warmup=cw,
                **decoder,
            ),
        ]
    return rows


def groups_of(rows: Sequence[Row]) -> dict[str, list[str]]:
    """Group name -> the names of its rows, in table order."""
    return {g: [r.name for r in rows if g in r.groups] for g in GROUPS}


def select(rows: Sequence[Row], only: Sequence[str], include: Collection[str] = ()) -> list[Row]:
    """The rows that ``--only`` names (row or group names), in table order; with no names, the default rows and the
    groups in ``include`` (``--compile``).

    Raises:
        ValueError: If a name is neither a row nor a group; the message lists the names, and, for a name that is the
            start of some titles (``--only`` took title prefixes before rows had names), the rows it meant.
    """
    names = {r.name for r in rows}
    groups = groups_of(rows)
    if not only:
        return [r for r in rows if r.default or any(g in include for g in r.groups)]
    wanted: set[str] = set()
    for item in only:
        if item in names:
            wanted.add(item)
        elif item in groups:
            wanted.update(groups[item])
        else:
            meant = [r.name for r in rows if r.title.startswith(item)]
            hint = (
                f" It is the start of the title of {', '.join(meant)}: rows are chosen by name now, e.g. --only "
                f"{','.join(meant)}."
                if meant
                else ""
            )
            raise ValueError(
                f"--only {item!r} matches no row.{hint} Rows: {', '.join(r.name for r in rows)}; groups: "
                f"{', '.join(groups)} (see --list)."
            )
    return [r for r in rows if r.name in wanted]

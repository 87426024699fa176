"""Training-step rate of bucketed vs packed varlen vs packed static shapes + compile, on pre-collated batches.

    python benchmarks/packing_step.py                # H200, BERT-base shape, 16,384 tokens per batch (~2 minutes)
    python benchmarks/packing_step.py --quick        # CPU smoke run (tiny BERT)
    python benchmarks/packing_step.py --profile      # + where each case's step time goes (kernels, host gaps)
    python benchmarks/packing_step.py --cases "bucket sdpa eager" "packed static compile reduce-overhead"

Isolates the model step from the data path: 50 batches of each layout are collated and moved to the GPU first, then
every case trains 15 untimed steps (compilation included) and 4 timed windows of 30 steps in ABBA order, with
``TransformerModule.loss_and_items`` under bf16 autocast, fused AdamW. Token ids are random with the embedded corpus's
real lengths (``tests/data/fortune_lengths.npy``); cuDNN attention is off (its per-shape plan cost would dominate
bucketed batches). Reported: real tokens/s per case (median of the 4 windows) and the ratio to the bucketed case.

``--profile`` then runs 5 more steps of each case under ``torch.profiler`` and reports, per case, the wall time per
step, the device-busy time per step (the union of its kernels' intervals: wall minus busy is time the GPU waited on
the host), the compiled case's graphs and graph breaks (dynamo's counters), the kernels' time per category (GEMMs,
attention, optimizer, Inductor's fused kernels, ...: ``kernel_category``) and the kernels that took most time.
``bucket eager`` is the bucketed case on the library's default attention (``"auto"``, no host read of the mask).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_txopt import BucketDataModule, TransformerModule

LENGTHS = Path(__file__).parents[1] / "tests" / "data" / "fortune_lengths.npy"
BERT_BASE = dict(
    model_type="bert",
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    attention_probs_dropout_prob=0.0,
)
TINY = dict(BERT_BASE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_PACKED = dict(strategy="packed", max_length=512)
_STATIC = dict(_PACKED, static_shapes=True)
#: case -> (BucketDataModule arguments, TransformerModule arguments). The ``compile_mode`` cases are
#: ``TransformerModule(compile=True, compile_mode=...)``: CUDA graphs, and Inductor's autotuned kernel choices.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "bucket sdpa eager": (dict(strategy="bucket"), dict(attn_implementation="sdpa")),
    "bucket eager": (dict(strategy="bucket"), {}),
    "packed varlen eager": (_PACKED, {}),
    "packed static compile": (_STATIC, dict(compile=True)),
    "packed static compile reduce-overhead": (_STATIC, dict(compile=True, compile_mode="reduce-overhead")),
    "packed static compile max-autotune-no-cudagraphs": (
        _STATIC,
        dict(compile=True, compile_mode="max-autotune-no-cudagraphs"),
    ),
}
DEFAULT_CASES = ("bucket sdpa eager", "packed varlen eager", "packed static compile")


class Case:
    """One layout: its pre-collated batches, a fresh model and optimizer, and its timed windows."""

    def __init__(self, name: str, samples: list[dict], tokens: int, config: dict, dm: dict, module: dict) -> None:
        self.name = name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = BucketDataModule(samples, pad_token_id=0, max_tokens=tokens, **dm)
        data.setup("fit")
        self.batches: list[dict[str, Any]] = []
        for batch in data.train_dataloader():
            self.batches.append({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()})
            if len(self.batches) == 50:
                break
        self.real = [
            int(b["cu_seq_lens"][-1]) if "cu_seq_lens" in b else int(b["attention_mask"].sum()) for b in self.batches
        ]
        torch.manual_seed(0)
        self.module = TransformerModule(config=config, num_labels=40, **module).to(self.device)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-5, fused=self.device.type == "cuda")
        self.step_count = 0
        self.rates: list[float] = []

    def step(self) -> int:
        i = self.step_count % len(self.batches)
        self.step_count += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, _, _ = self.module.loss_and_items(self.batches[i], "mean")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.real[i]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, steps: int) -> None:
        self.sync()
        start = time.perf_counter()
        tokens = sum(self.step() for _ in range(steps))
        self.sync()
        self.rates.append(tokens / (time.perf_counter() - start))


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


#: (category, substrings of a kernel's name, lowercased): the first category with a match is the kernel's.
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("fused (triton)", ("triton_",)),
    ("embedding", ("embedding", "index", "scatter", "gather")),
    ("norm", ("layer_norm", "layernorm", "gammabeta", "welford")),
    ("copy / cast", ("copy", "fill", "memset", "cat")),
    ("elementwise / reduce", ("elementwise", "reduce", "dropout", "softmax", "gelu")),
)


def kernel_category(name: str) -> str:
    """The :data:`KERNEL_CATEGORIES` entry of a CUDA kernel's name, ``"other"`` when none matches.

    Example:
        >>> kernel_category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"), kernel_category("void foo")
        ('gemm', 'other')
    """
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile(case: Case, steps: int = 5, top: int = 8) -> dict[str, Any]:
    """Where one case's step time goes: wall and device-busy time per step, its kernels' time per category
    (:func:`kernel_category`, summed, so overlapping kernels count twice) and its costliest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.type == "cuda" else [])
    case.sync()
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            case.step()
        case.sync()
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps / 1e6
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / steps / 1e3
    costly = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    categories: dict[str, float] = {}
    for name, ms in by_name.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + ms
    return dict(
        name=case.name,
        wall_ms=round(wall * 1e3, 2),
        device_busy_ms=round(busy * 1e3, 2),
        host_gap_fraction=round(1 - busy / wall, 3) if wall else None,
        categories_ms={cat: round(ms, 2) for cat, ms in sorted(categories.items(), key=lambda kv: -kv[1])},
        top_kernels_ms=[(name[:90], round(ms, 2)) for name, ms in costly],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="max_tokens of every layout")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed window")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU smoke run)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--profile", action="store_true", help="also profile 5 steps of each case (see above)")
    parser.add_argument(
        "--cases", nargs="+", choices=tuple(CASES), default=list(DEFAULT_CASES), help="the first is the ratios' base"
    )
    args = parser.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    rng = np.random.default_rng(0)
    lengths = np.load(LENGTHS)[: 600 if args.quick else None]
    samples = [{"input_ids": rng.integers(1000, 30000, int(n)), "labels": int(rng.integers(40))} for n in lengths]
    config = TINY if args.quick else BERT_BASE
    tokens, steps = (2048, 3) if args.quick else (args.tokens, args.steps)
    cases = [Case(name, samples, tokens, config, *CASES[name]) for name in args.cases]
    for case in cases:
        start = time.perf_counter()
        for _ in range(3 if args.quick else 15):
            case.step()
        case.sync()
        print(f"{case.name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    for repeat in range(4):
        for case in cases if repeat % 2 == 0 else cases[::-1]:
            case.timed(steps)
    base = float(np.median(cases[0].rates))
    rows = [
        dict(
            name=c.name,
            median=round(float(np.median(c.rates))),
            runs=[round(r) for r in c.rates],
            x_bucket=round(float(np.median(c.rates)) / base, 3),
        )
        for c in cases
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    profiles = []
    if args.profile:
        from torch._dynamo.utils import counters

        breaks = {str(reason)[:200]: n for reason, n in counters["graph_break"].items()}
        print(json.dumps(dict(unique_graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=breaks)))
        for case in cases:
            profiles.append(profile(case))
            print(json.dumps(profiles[-1]), flush=True)
    if args.json:
        out = {"tokens": tokens, "steps": steps, "rows": rows, "profiles": profiles}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

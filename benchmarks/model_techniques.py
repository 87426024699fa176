"""Memory and throughput of the model-side techniques, side by side in one run.

    python benchmarks/model_techniques.py                       # GPU: BERT-base shape, seq 512, bf16 autocast
    python benchmarks/model_techniques.py --tiny --steps 3      # CPU smoke run

Each row builds a fresh random-init BertForSequenceClassification (BERT-base shape from config), applies one
technique through the library function, and trains ``--steps`` steps (after ``--warmup``) on full-length random
batches with AdamW (fused on CUDA). Columns: real tokens/s, peak memory, and peak *activation* memory (peak during the
step minus memory held at the start of the step: weights, gradients, optimizer state), with ratios to the plain row.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import environment, markdown_table
from transformers import AutoModelForSequenceClassification, BertConfig

from lightning_txopt.callbacks import enable_gradient_checkpointing, freeze_embeddings, share_layers
from lightning_txopt.callbacks.gradient_checkpointing import hf_checkpointing_enable, selective_checkpointing_available


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.tiny:
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=8,  # 8, so that sharing 4 unique layers shares some
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
        )
    else:
        config = BertConfig(max_position_embeddings=max(512, args.seq_len))
    config.num_labels = 40
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


def run(args: argparse.Namespace, name: str, apply: Callable[[torch.nn.Module], Any]) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build(args)
    apply(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 40, (args.batch,), generator=g).to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    row = {
        "variant": name,
        "tokens_per_s": args.batch * args.seq_len * args.steps / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
        "activation_mib": (torch.cuda.max_memory_allocated() - held) / 2**20 if cuda else float("nan"),
        "held_mib": held / 2**20 if cuda else float("nan"),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "optimizer_state_mib": sum(
            t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        )
        / 2**20,
        "checkpoint_mib": buf.getbuffer().nbytes / 2**20,
    }
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len = min(args.seq_len, 128)
        args.batch = min(args.batch, 8)

    variants: list[tuple[str, Callable[[torch.nn.Module], Any]]] = [
        ("plain", lambda m: None),
        ("checkpointing full (HF mechanism)", lambda m: enable_gradient_checkpointing(m)),
        ("checkpointing full (wrapper)", lambda m: enable_gradient_checkpointing(m, prefer_native=False)),
        ("checkpointing every 2nd layer", lambda m: enable_gradient_checkpointing(m, every_n_layers=2)),
        ("(reference) HF checkpointing, reentrant", lambda m: hf_checkpointing_enable(m, use_reentrant=True)),
    ]
    if selective_checkpointing_available():
        variants.append(("checkpointing selective", lambda m: enable_gradient_checkpointing(m, mode="selective")))
    variants += [
        ("freeze embeddings", lambda m: freeze_embeddings(m)),
        ("share layers: 4 unique, cycle_rev", lambda m: share_layers(m, num_unique_layers=4, strategy="cycle_rev")),
        (
            "all three (share 4, freeze, full ckpt)",
            lambda m: (share_layers(m, num_unique_layers=4), freeze_embeddings(m), enable_gradient_checkpointing(m)),
        ),
    ]
    rows = [run(args, name, fn) for name, fn in variants]
    base = rows[0]
    table = [
        [
            r["variant"],
            r["tokens_per_s"],
            r["tokens_per_s"] / base["tokens_per_s"],
            r["peak_mib"],
            r["activation_mib"],
            r["activation_mib"] / base["activation_mib"] if base["activation_mib"] == base["activation_mib"] else 1.0,
            r["trainable"],
            r["optimizer_state_mib"],
            r["checkpoint_mib"],
        ]
        for r in rows
    ]
    print(
        f"BERT-base shape{' (tiny)' if args.tiny else ''}, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.precision}, {args.steps} timed steps after {args.warmup} warm-up, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
        + "\n"
    )
    print(
        markdown_table(
            [
                "variant",
                "tokens/s",
                "x plain",
                "peak MiB",
                "activation MiB",
                "x plain",
                "trainable params",
                "AdamW state MiB",
                "checkpoint MiB",
            ],
            table,
        )
    )
    print(f"\n{environment()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "environment": environment()}, fh, indent=2)


if __name__ == "__main__":
    main()

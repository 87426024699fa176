"""What a batch shape costs the first time a model meets it, per attention backend (eager PyTorch, no compile).

    python benchmarks/shape_cost.py --json docs/results/shape_cost_h200.json     # GPU: under a minute

A BERT-base classifier (bf16 autocast, SDPA with a padding mask) runs forward + backward on ``--shapes`` new
``(rows, width)`` shapes, twice each: the first call pays whatever is built per shape (kernel selection, attention
plans, allocator growth), the second is the steady cost. Run once with PyTorch's default SDPA backend choice and once
with the cuDNN attention backend disabled. Token-budget batches have many shapes (``rows = budget // width``), which
is why ``pad_to_lengths`` bounds them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import environment, markdown_table
from transformers import AutoModelForSequenceClassification, BertConfig


def measure(model: torch.nn.Module, shapes: list[tuple[int, int]], device: torch.device) -> list[tuple[float, float]]:
    out = []
    for rows, width in shapes:
        ids = torch.randint(1000, 30000, (rows, width), device=device)
        mask = torch.ones_like(ids)
        mask[:, width - width // 4 :] = 0  # a padding mask, as every padded batch has
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1).mean()
            loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        out.append((times[0], times[1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=int, default=12)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = BertConfig()
    config.num_labels = 40
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    model = model.to(device).train()
    rng = np.random.default_rng(0)
    results = {}
    for name, cudnn in (("default SDPA backends", True), ("cuDNN attention disabled", False)):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        widths = rng.choice(np.arange(40, 512, 8), size=args.shapes, replace=False)  # new widths for each setting
        shapes = [(max(1, args.budget // int(w)), int(w)) for w in widths]
        results[name] = measure(model, shapes, device)
    torch.backends.cuda.enable_cudnn_sdp(True)
    rows = []
    for name, pairs in results.items():
        first = statistics.median(p[0] for p in pairs) * 1000
        steady = statistics.median(p[1] for p in pairs) * 1000
        rows.append([name, first, steady, first - steady])
    print(
        f"\n{torch.cuda.get_device_name()}, BERT-base, fwd+bwd bf16, "
        f"{args.shapes} new shapes of ~{args.budget} tokens\n"
    )
    print(markdown_table(["SDPA", "first call, ms (median)", "second call, ms", "cost of a new shape, ms"], rows))
    print(f"\n{environment()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(), "results": results}, indent=2))


if __name__ == "__main__":
    main()

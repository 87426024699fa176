"""Smoke runs of the benchmark scripts on CPU (their ``--quick``/``--tiny`` modes), so that they cannot rot between GPU
sessions: each must run to the end, print its table and write JSON whose figures the report reproduces. The figures
themselves are GPU results in ``docs/results/``; nothing here times anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_compare_quick_repeat_all_and_report(tmp_path):
    out = tmp_path / "gc.json"
    only = "lightning_txopt: BucketDataModule,lightning_txopt: + Accum"
    stdout = _ok(
        _run("gpu_compare.py", "--quick", "--repeats", "2", "--repeat-all", "--only", only, "--json", str(out))
    )
    result = json.loads(out.read_text())
    assert [r["row"].split(":")[1].strip()[:6] for r in result["rows"]] == ["Bucket", "+ Accu"]
    for row in result["rows"]:  # every selected row ran twice; the row shown is one of its runs (the lower median)
        assert len(row["runs_real_tokens_per_s"]) == 2
        assert row["real_tokens_per_s"] == min(row["runs_real_tokens_per_s"])
        assert 0 < row["padding_efficiency"] <= 1
    assert "every row: median of 2 runs" in result["header"]
    assert "x first row" in stdout and "x plain loop" not in stdout  # no HF or plain-loop row to compare with
    report = _ok(_run("gpu_compare.py", "--report-from", str(out)))
    assert f"{result['rows'][0]['real_tokens_per_s']:,.0f}" in report


def test_gpu_compare_rejects_bad_arguments_before_running():
    bad_window = _run("gpu_compare.py", "--quick", "--steps", "2", "--only", "lightning_txopt: + Accum", timeout=120)
    assert bad_window.returncode == 2 and "multiple of accumulate=2" in bad_window.stderr
    assert "done:" not in bad_window.stdout  # nothing ran
    nothing = _run("gpu_compare.py", "--quick", "--only", "no such row", timeout=120)
    assert nothing.returncode == 2 and "matches no row" in nothing.stderr


def test_model_techniques_tiny(tmp_path):
    out = tmp_path / "mt.json"
    _ok(_run("model_techniques.py", "--tiny", "--steps", "1", "--warmup", "1", "--json", str(out)))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 4 and all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.ddp
def test_multi_gpu_quick_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "mg.json"
    _ok(_run("multi_gpu.py", "--quick", "--devices", "2", "--steps", "2", "--warmup", "1", "--json", str(out)))
    result = json.loads(out.read_text())
    assert result["scaling_efficiency"] > 0 and result["settings"]["devices"] == 2


def test_padding_efficiency_against_the_corpus_readme():
    stdout = _ok(_run("padding_efficiency.py"))
    assert "Corpus: 14,396 samples" in stdout  # the embedded corpus, whole
    # fixed padding to 512: ceil(14,396 / 32) = 450 batches, 14,396 x 512 = 7,370,752 processed tokens
    assert "| fixed, batch 32 | 450 | 7,370,752 | 0.085 |" in stdout


def test_token_budget_quick_and_report(tmp_path):
    out = tmp_path / "tb.json"
    stdout = _ok(
        _run("token_budget.py", "--quick", "--only", "bert-bucket", "--verify-epochs", "1", "--json", str(out))
    )
    row = json.loads(out.read_text())["rows"][0]
    found, hand = row["finder"], row["by_hand"]
    assert row["verify"]["ok"] and found["max_tokens"] % found["multiple"] == 0
    assert hand["max_tokens"] >= found["max_tokens"]  # the finder keeps a margin; a full run at its budget fits
    assert hand["first_failing"] > hand["max_tokens"]  # bracketed: a larger budget ran out of memory
    assert f"| bert-bucket | {found['max_tokens']} |" in stdout
    assert f"| bert-bucket | {found['max_tokens']} |" in _ok(_run("token_budget.py", "--report-from", str(out)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_token_budget_refuses_the_cpu_without_quick():
    proc = _run("token_budget.py", "--no-reference", timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr

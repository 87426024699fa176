"""Expandable segments turned on at run time really change CUDA's allocator (skipped without a CUDA device).

Each case runs in a fresh process started without ``PYTORCH_CUDA_ALLOC_CONF``: the setting is process-wide.
Results of the last GPU run are recorded in docs/results/gpu_tests.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, torch
from lightning_txopt.memory import CudaMemory, expandable_segments_enabled
before = expandable_segments_enabled()
message = CudaMemory(expandable_segments={flag}).prepare(torch.device("cuda", 0))
x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # a new segment of 256 MiB
segments = [s for s in torch.cuda.memory_snapshot() if s["total_size"] >= 256 * 2**20]
print("RESULT " + json.dumps({{
    "before": before, "after": expandable_segments_enabled(), "changed": message is not None,
    "expandable": [bool(s.get("is_expandable")) for s in segments],
}}))
"""


def _run(flag: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(flag=flag)], capture_output=True, text=True, env=env, check=False
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


def test_prepare_makes_the_next_segments_expandable():
    result = _run(True)
    assert result["before"] is False and result["after"] is True and result["changed"] is True
    assert result["expandable"] and all(result["expandable"]), result


def test_prepare_leaves_the_allocator_when_asked_to():
    result = _run(False)
    assert result["before"] is False and result["after"] is False and result["changed"] is False
    assert result["expandable"] and not any(result["expandable"]), result

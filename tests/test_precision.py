from __future__ import annotations

import pytest
import torch

from lightning_txopt.precision import resolve_precision


@pytest.mark.parametrize(
    ("cuda", "bf16", "accelerator", "expected"),
    [
        (True, True, "auto", "bf16-mixed"),
        (True, False, "auto", "16-mixed"),
        (True, True, "gpu", "bf16-mixed"),
        (True, True, "cpu", "32-true"),
        (False, False, "auto", "32-true"),
    ],
)
def test_auto_per_device(monkeypatch, cuda, bf16, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", accelerator=accelerator) == expected


def test_explicit_values_pass_and_bad_values_fail():
    assert resolve_precision("bf16-mixed") == "bf16-mixed"
    with pytest.raises(ValueError, match="'fp8'"):
        resolve_precision("fp8")

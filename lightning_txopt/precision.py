"""``resolve_precision``: pick Lightning's mixed-precision setting for the device at hand.

Mixed precision itself is Lightning's (``Trainer(precision=...)`` and its plugins); this only chooses the value.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "resolve_precision"]

PRECISIONS = ("auto", "bf16-mixed", "16-mixed", "32-true", "bf16-true", "16-true", "64-true")


def resolve_precision(precision: str = "auto", accelerator: str = "auto") -> str:
    """Resolve ``"auto"`` for the device: bf16 or fp16 mixed precision on CUDA GPUs, full precision elsewhere.

    ``"bf16-mixed"`` where the GPU supports bf16, ``"16-mixed"`` on older CUDA GPUs, ``"32-true"`` on CPU. Other
    values are checked and returned unchanged.

    Args:
        precision: ``"auto"`` or a Lightning precision string.
        accelerator: ``"auto"``, ``"cuda"``/``"gpu"`` or ``"cpu"``: which device the Trainer will use.

    Raises:
        ValueError: On a precision Lightning does not know.

    Example:
        >>> resolve_precision("16-mixed")
        '16-mixed'
        >>> resolve_precision("auto", accelerator="cpu")
        '32-true'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "auto":
        return precision
    cuda = accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"

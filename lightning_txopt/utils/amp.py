"""Setting the loss scale of PyTorch's ``GradScaler`` through its public state dict.

``GradScaler`` has no public setter for its scale: ``update(new_scale=...)`` fails until the first ``scale()`` call
has created the scale tensor, and the initial value lives in a private attribute. Its documented
``state_dict()``/``load_state_dict()`` pair does work at any time (``"scale"`` is one of the five documented
entries), so :func:`set_loss_scale` round-trips it, and checks the result with ``get_scale()``:
if torch ever changes how the pair behaves, it raises instead of training with the wrong scale.
"""

from __future__ import annotations

import torch

__all__ = ["set_loss_scale"]


def set_loss_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    """Set an enabled ``GradScaler``'s current loss scale, before or after its first use.

    Only public methods are used: ``state_dict()``, ``load_state_dict()`` with a new ``"scale"``, then
    ``get_scale()`` to check (one host-device sync when the scale lives on a GPU).

    Args:
        scaler: An enabled ``torch.amp.GradScaler`` (or a subclass such as FSDP's ``ShardedGradScaler``).
        scale: The new scale, a positive finite number.

    Raises:
        ValueError: If ``scale`` is not a positive finite number, or the scaler is disabled (it has no scale).
        RuntimeError: If the scaler's state dict has no ``"scale"`` entry, or the scale read back differs: torch's
            ``GradScaler`` changed; this function must be updated.

    Example:
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        >>> set_loss_scale(scaler, 256.0)
        >>> scaler.get_scale()
        256.0
    """
    scale = float(scale)
    if not (0 < scale < float("inf")):
        raise ValueError(f"The loss scale must be a positive finite number, got {scale!r}.")
    if not scaler.is_enabled():
        raise ValueError(f"{type(scaler).__name__} is disabled: it has no loss scale to set; enable it or skip this.")
    state = scaler.state_dict()
    if "scale" not in state:
        raise RuntimeError(
            f"{type(scaler).__name__}.state_dict() has no 'scale' entry (keys: {sorted(state)}): torch's GradScaler "
            "changed; update lightning_txopt.utils.amp.set_loss_scale."
        )
    state["scale"] = scale
    scaler.load_state_dict(state)
    got = scaler.get_scale()
    if got != scale:
        raise RuntimeError(
            f"{type(scaler).__name__}.load_state_dict() did not set the scale: asked for {scale!r}, get_scale() reads "
            f"{got!r}. torch's GradScaler changed; update lightning_txopt.utils.amp.set_loss_scale."
        )

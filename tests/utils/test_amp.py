"""``set_loss_scale`` against a real ``torch.amp.GradScaler``: these fail if torch changes how its public state dict
sets the scale (before the first ``scale()`` call, when the scale tensor does not exist yet, and after)."""

from __future__ import annotations

import pytest
import torch

from lightning_txopt.utils.amp import set_loss_scale


def _loss() -> torch.Tensor:
    x = torch.ones(3, requires_grad=True)
    return (x * 2.0).sum()  # 6


def test_sets_the_scale_before_first_use():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    set_loss_scale(scaler, 64.0)
    assert scaler.get_scale() == 64.0
    assert float(scaler.scale(_loss()).detach()) == 6.0 * 64.0  # the scale tensor is created from the new value


def test_sets_the_scale_after_use_and_keeps_the_other_settings():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    loss = _loss()
    scaler.scale(loss)
    set_loss_scale(scaler, 8.0)
    assert float(scaler.scale(loss).detach()) == 6.0 * 8.0
    state = scaler.state_dict()
    assert state == {
        "scale": 8.0,
        "growth_factor": 3.0,
        "backoff_factor": 0.25,
        "growth_interval": 7,
        "_growth_tracker": 0,
    }


def test_a_step_after_setting_unscales_by_the_new_scale():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    set_loss_scale(scaler, 4.0)
    scaler.scale((param * 3.0).sum()).backward()
    assert param.grad is not None and param.grad.tolist() == [12.0, 12.0]  # scaled by 4
    scaler.step(optimizer)
    scaler.update()
    assert param.detach().tolist() == [-2.0, -2.0]  # unscaled by 4: 1 - 3
    assert scaler.get_scale() == 4.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_scale(bad):
    with pytest.raises(ValueError, match="positive finite number, got"):
        set_loss_scale(torch.amp.GradScaler("cpu"), bad)


def test_disabled_scaler():
    with pytest.raises(ValueError, match="GradScaler is disabled"):
        set_loss_scale(torch.amp.GradScaler("cpu", enabled=False), 8.0)


class _NoScaleEntry(torch.amp.GradScaler):
    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "scale"}


class _IgnoresLoad(torch.amp.GradScaler):
    def load_state_dict(self, state_dict):
        pass


def test_changed_internals_fail_loudly():
    with pytest.raises(RuntimeError, match="no 'scale' entry"):
        set_loss_scale(_NoScaleEntry("cpu"), 8.0)
    with pytest.raises(RuntimeError, match=r"did not set the scale: asked for 8.0, get_scale\(\) reads 65536.0"):
        set_loss_scale(_IgnoresLoad("cpu"), 8.0)

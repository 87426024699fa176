"""Every component under Lightning's mixed-precision plugins on a CUDA GPU (skipped without one).

Results of the last GPU run are recorded in docs/results/gpu_tests.md.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_txopt.callbacks import AccumulationScheduler, FreezeEmbeddings, GradientCheckpointing, ParameterSharing
from lightning_txopt.data import BucketDataModule
from tests.callbacks.test_accumulation import SumLossModule, _dm
from tests.fsdp_helpers import windows
from tests.helpers import ModelModule, PlainTransformer, cpu_trainer, make_samples, tensor_sum, tiny_bert

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def gpu_trainer(**kwargs):
    return cpu_trainer(accelerator="cuda", **kwargs)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("factory", [tiny_bert, PlainTransformer])
def test_all_callbacks_and_datamodule_train(precision, factory):
    dm = BucketDataModule(make_samples(96, seed=3), pad_token_id=0, max_tokens=256, pad_to_multiple_of=8)
    module = ModelModule(factory(), optimizer="adamw", lr=1e-3)
    before = copy.deepcopy(module.model.state_dict())
    callbacks = [
        ParameterSharing(2),
        FreezeEmbeddings(unfreeze_at_epoch=1),
        GradientCheckpointing(),
        AccumulationScheduler({0: 2}, normalize="mean"),
    ]
    trainer = gpu_trainer(max_epochs=2, precision=precision, callbacks=callbacks, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=dm)
    after = module.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = sum(not torch.equal(before[k].cpu(), v.cpu()) for k, v in after.items())
    assert changed > len(after) // 2


def _relative_errors(module: SumLossModule, normalize: str) -> list[tuple[int, float]]:
    """(window size, relative error) of each step against an fp32 reference of the exact window gradient."""
    out = []
    for start, end, before, after in windows(module.snapshots):
        ref_module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean").cuda()
        ref_module.model.load_state_dict({k: v.cuda() for k, v in before.items()}, strict=False)
        micro = [{k: v.cuda() for k, v in b.items()} for b in module.micro_batches[start:end]]
        if normalize == "tokens":
            items = sum(int((b["labels"] != -100).sum()) for b in micro)
            total = tensor_sum(ref_module.loss(b) for b in micro) / items
        else:
            total = tensor_sum(ref_module.loss(b) for b in micro) / len(micro)
        total.backward()
        num = den = 0.0
        for n, p in ref_module.model.named_parameters():
            if p.grad is None:
                continue
            delta = (before[n] - after[n]).cuda()
            num += float((delta - p.grad).pow(2).sum())
            den += float(p.grad.pow(2).sum())
        out.append((end - start, (num / den) ** 0.5 if den else 0.0))
    return out


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
@pytest.mark.parametrize("normalize", ["tokens", "mean"])
def test_accumulation_exact_under_amp(precision, normalize):
    module = SumLossModule(reduction="sum" if normalize == "tokens" else "mean")
    trainer = gpu_trainer(
        max_epochs=1, precision=precision, callbacks=[AccumulationScheduler({0: 3}, normalize=normalize)]
    )
    trainer.fit(module, datamodule=_dm())
    errors = _relative_errors(module, normalize)
    tolerance = {"16-mixed": 2e-2, "bf16-mixed": 6e-2, "32-true": 1e-4}[precision]
    skipped = _skipped(module)
    taken = [e for i, (_, e) in enumerate(errors) if i not in skipped]
    assert len(taken) >= len(errors) - 1 and max(taken) < tolerance, errors


def _skipped(module: SumLossModule) -> set[int]:
    """Windows whose step left every parameter unchanged (GradScaler found inf/nan and skipped it)."""
    return {i for i, w in enumerate(windows(module.snapshots)) if all(torch.equal(w[2][k], w[3][k]) for k in w[2])}


class _InfOnce(SumLossModule):
    """Returns an infinite loss on one micro-batch, so that GradScaler must skip that window's step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == 1 and batch_idx == 2 else loss


def test_skipped_fp16_steps_do_not_corrupt_counts():
    """A step GradScaler skips (inf gradients) leaves the next windows' counts and gradients exact."""
    module = _InfOnce(reduction="sum")
    trainer = gpu_trainer(
        max_epochs=2, precision="16-mixed", callbacks=[AccumulationScheduler({0: 2}, normalize="tokens")]
    )
    trainer.fit(module, datamodule=_dm())
    skipped = _skipped(module)
    assert 1 in skipped, "the window with the infinite loss must be skipped"
    errors = _relative_errors(module, "tokens")
    taken = [e for i, (_, e) in enumerate(errors) if i not in skipped]
    assert len(taken) >= len(errors) - 2 and max(taken) < 2e-2, errors

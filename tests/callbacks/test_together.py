"""The three model-side callbacks together: one process, 2 DDP processes (gloo), and bf16 autocast on CPU."""

from __future__ import annotations

import pytest
import torch

from lightning_txopt.callbacks import FreezeEmbeddings, GradientCheckpointing, ParameterSharing
from lightning_txopt.data import BucketDataModule
from tests.helpers import ModelModule, PlainTransformer, cpu_trainer, make_samples, tiny_bert


def _callbacks():
    return [
        ParameterSharing(2, strategy="cycle_rev"),
        FreezeEmbeddings(unfreeze_at_epoch=1),
        GradientCheckpointing(every_n_layers=1),
    ]


def _dm():
    return BucketDataModule(make_samples(64, seed=11), pad_token_id=0, max_tokens=128, seed=5)


@pytest.mark.ddp
@pytest.mark.parametrize("factory", [tiny_bert, PlainTransformer])
def test_ddp_two_processes_all_three(tmp_path, factory):
    module = ModelModule(factory(), optimizer="adamw", lr=1e-2, record_dir=str(tmp_path))
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = cpu_trainer(max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=_callbacks())
    trainer.fit(module, datamodule=_dm())
    rank0 = torch.load(tmp_path / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "params_rank1.pt")
    for k in rank0:  # the ranks stayed in sync, the unfrozen embeddings included
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0, msg=k)
    emb = next(k for k in rank0 if k.endswith(("word_embeddings.weight", "tok.weight")))
    assert not torch.equal(rank0[emb], initial[emb])  # trained in epoch 1


@pytest.mark.parametrize("factory", [tiny_bert, PlainTransformer])
def test_bf16_mixed_on_cpu_all_three(factory):
    module = ModelModule(factory(), optimizer="adamw", lr=1e-2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    cpu_trainer(max_epochs=2, precision="bf16-mixed", callbacks=_callbacks()).fit(module, datamodule=_dm())
    after = module.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_txopt.callbacks.freeze_embeddings import (
    FreezeEmbeddings,
    find_input_embeddings,
    freeze_embeddings,
    unfreeze_embeddings,
)
from lightning_txopt.callbacks.gradient_checkpointing import hf_checkpointing_enable
from lightning_txopt.data import BucketDataModule
from tests.helpers import (
    ModelModule,
    PlainTransformer,
    batch_for,
    cpu_trainer,
    grads_of,
    make_samples,
    tiny_bert,
    tiny_gpt2,
)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (
            tiny_bert,
            [
                "bert.embeddings.word_embeddings",
                "bert.embeddings.position_embeddings",
                "bert.embeddings.token_type_embeddings",
            ],
        ),
        (tiny_gpt2, ["transformer.wte", "transformer.wpe"]),
        (PlainTransformer, ["tok", "pos"]),
    ],
)
def test_finds_input_embeddings(factory, expected):
    assert list(find_input_embeddings(factory())) == expected


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2, PlainTransformer])
def test_frozen_get_no_gradient_and_the_rest_is_unchanged(factory):
    model = factory()
    reference = grads_of(copy.deepcopy(model), batch_for(model))
    result = freeze_embeddings(model, untie=True)
    grads = grads_of(model, batch_for(model))
    frozen = set(result.parameters)
    assert frozen and not frozen & set(grads)  # no gradient for frozen parameters
    for name, g in grads.items():  # every other gradient equals the unfrozen model's
        if name != "lm_head.weight":  # (GPT-2's untied head: its tied reference gradient includes the embedding's)
            torch.testing.assert_close(g, reference[name], rtol=1e-6, atol=1e-7)


def test_bert_layernorm_stays_trainable_unless_asked():
    model = tiny_bert()
    freeze_embeddings(model)
    assert model.bert.embeddings.LayerNorm.weight.requires_grad
    model = tiny_bert()
    result = freeze_embeddings(model, include_layernorm=True)
    assert not model.bert.embeddings.LayerNorm.weight.requires_grad
    assert "bert.embeddings.LayerNorm" in result.modules
    gpt = tiny_gpt2()
    freeze_embeddings(gpt, include_layernorm=True, untie=True)
    assert gpt.transformer.ln_f.weight.requires_grad  # GPT-2's final norm is not an embedding norm


def test_tied_head_is_detected_and_warned_or_untied():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"transformer.wte.weight is shared with lm_head.weight"):
        result = freeze_embeddings(model)
    assert result.tied == {"transformer.wte.weight": ["lm_head.weight"]}
    assert not model.lm_head.weight.requires_grad  # frozen with it, as the warning says
    model = tiny_gpt2()
    before = model.lm_head.weight.detach().clone()
    result = freeze_embeddings(model, untie=True)
    assert result.tied == {}
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.requires_grad and not model.transformer.wte.weight.requires_grad
    torch.testing.assert_close(model.lm_head.weight, before)
    assert model.config.tie_word_embeddings is False
    grads = grads_of(model, batch_for(model))
    assert "lm_head.weight" in grads and "transformer.wte.weight" not in grads


def test_names_override_and_errors():
    model = tiny_bert()
    result = freeze_embeddings(model, names=["bert.embeddings.word_embeddings"])
    assert result.modules == ["bert.embeddings.word_embeddings"]
    assert model.bert.embeddings.position_embeddings.weight.requires_grad
    with pytest.raises(ValueError, match="No module named 'nope'"):
        freeze_embeddings(tiny_bert(), names=["nope"])
    with pytest.raises(ValueError, match="No input embeddings found"):
        freeze_embeddings(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


def test_reentrant_checkpointing_with_frozen_embeddings_still_trains_the_blocks():
    reference = tiny_bert()
    freeze_embeddings(reference)
    expected = grads_of(reference, batch_for(reference))
    model = tiny_bert()
    hf_checkpointing_enable(model, use_reentrant=True)
    freeze_embeddings(model)
    model.train()
    got = grads_of(model, batch_for(model))
    assert any(n.startswith("bert.encoder.layer.0.") for n in got)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


def test_unfreeze_function():
    model = tiny_bert()
    result = freeze_embeddings(model)
    params = unfreeze_embeddings(model, result)
    assert len(params) == 3 and all(p.requires_grad for p in params)


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="unfreeze_at_epoch"):
        FreezeEmbeddings(unfreeze_at_epoch=-1)
    with pytest.raises(ValueError, match="lr_factor"):
        FreezeEmbeddings(lr_factor=0)


def _dm():
    return BucketDataModule(make_samples(48, seed=4), pad_token_id=0, batch_size=8, seed=3)


def test_callback_frozen_unchanged_and_no_optimizer_state():
    module = ModelModule(tiny_bert(), optimizer="adamw", lr=1e-2)
    before = copy.deepcopy(module.model.state_dict())
    trainer = cpu_trainer(max_epochs=1, callbacks=[FreezeEmbeddings()])
    trainer.fit(module, datamodule=_dm())
    after = module.model.state_dict()
    emb = [k for k in before if k.startswith("bert.embeddings.") and "LayerNorm" not in k]
    assert len(emb) == 3
    for k in emb:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert not torch.equal(
        after["bert.encoder.layer.0.attention.self.query.weight"],
        before["bert.encoder.layer.0.attention.self.query.weight"],
    )
    optimizer = trainer.optimizers[0]
    frozen = {
        id(p) for n, p in module.model.named_parameters() if n.startswith("bert.embeddings.") and "LayerNorm" not in n
    }
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not frozen & in_groups
    assert not frozen & {id(p) for p in optimizer.state}
    assert len(optimizer.state) == len(in_groups)  # everything else has state


def test_callback_gradient_step_equals_reference():
    """One SGD(lr=1) step through the Trainer equals minus the gradient of the frozen model on the same batch."""
    samples = make_samples(8, seed=9)
    dm = BucketDataModule(samples, pad_token_id=0, batch_size=8, shuffle=False)
    module = ModelModule(tiny_bert(), optimizer="sgd", lr=1.0)
    reference = copy.deepcopy(module.model)
    freeze_embeddings(reference)
    dm.setup("fit")
    batch = {k: v for k, v in next(iter(dm.train_dataloader())).items() if k != "idx"}
    expected = grads_of(reference, batch)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cpu_trainer(max_steps=1, callbacks=[FreezeEmbeddings()]).fit(module, datamodule=dm)
    for name, p in module.model.named_parameters():
        delta = before[name] - p.detach()
        torch.testing.assert_close(delta, expected.get(name, torch.zeros_like(delta)), rtol=1e-5, atol=1e-6)


def _fit(tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    module = ModelModule(tiny_bert(), optimizer="adamw", lr=1e-2, schedule=True)
    trainer = cpu_trainer(
        max_epochs=max_epochs,
        callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1, lr_factor=0.5), *callbacks],
        enable_checkpointing=bool(callbacks),
    )
    trainer.fit(module, datamodule=_dm(), ckpt_path=ckpt_path)
    return module, trainer


def test_unfreeze_at_epoch_and_resume_anywhere(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, trainer = _fit(tmp_path, 3, callbacks=[ckpt])
    per_epoch = trainer.num_training_batches
    assert per_epoch == 6
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(groups[0]["initial_lr"] * 0.5)
    assert groups[1]["lr"] < groups[1]["initial_lr"]  # the LambdaLR schedule drives the new group too
    initial = tiny_bert().state_dict()
    assert not torch.equal(
        full.model.state_dict()["bert.embeddings.word_embeddings.weight"],
        initial["bert.embeddings.word_embeddings.weight"],
    )
    final = full.model.state_dict()
    for step in (4, 8, 16):  # mid-epoch 0 (before N), mid-epoch 1 (after), mid-epoch 2
        resumed, _ = _fit(tmp_path, 3, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        for k, v in resumed.model.state_dict().items():
            torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=f"resume from step {step}: {k}")


def test_frozen_for_the_first_epoch_only():
    module = ModelModule(tiny_bert(), optimizer="sgd", lr=0.5)
    before = module.model.bert.embeddings.word_embeddings.weight.detach().clone()
    cpu_trainer(max_epochs=1, callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1)]).fit(module, datamodule=_dm())
    torch.testing.assert_close(module.model.bert.embeddings.word_embeddings.weight, before, rtol=0, atol=0)

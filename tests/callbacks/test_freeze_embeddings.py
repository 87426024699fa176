from __future__ import annotations

import copy

import lightning.pytorch as pl
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
from tests.zoo import FAMILIES


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
    # GPT-2's final norm is not an embedding norm, and there is no other: the setting would do nothing
    with pytest.raises(ValueError, match=r"include_layernorm=True, but GPT2LMHeadModel has no nn.LayerNorm beside"):
        freeze_embeddings(gpt, include_layernorm=True, untie=True)
    assert gpt.transformer.ln_f.weight.requires_grad and gpt.transformer.wte.weight.requires_grad


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
    with pytest.raises(ValueError, match="unfreeze_at_epoch"):
        FreezeEmbeddings(unfreeze_at_epoch=True)
    with pytest.raises(ValueError, match="lr_factor"):
        FreezeEmbeddings(lr_factor=0)
    with pytest.raises(
        ValueError, match=r"lr_factor=0.1 .* would do nothing. Set unfreeze_at_epoch, or drop lr_factor"
    ):
        FreezeEmbeddings(lr_factor=0.1)
    with pytest.raises(ValueError, match=r"unfreeze_at_epoch=0 .* would never be frozen"):
        FreezeEmbeddings(unfreeze_at_epoch=0, lr_factor=0.1)
    assert FreezeEmbeddings(unfreeze_at_epoch=2, lr_factor=0.1).lr_factor == 0.1


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
    embeddings = "bert.embeddings.word_embeddings.weight"
    before = module.model.get_parameter(embeddings).detach().clone()
    trainer = cpu_trainer(max_epochs=1, callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1)])
    with pytest.warns(
        UserWarning, match=r"unfreeze_at_epoch=1\) with Trainer\(max_epochs=1\).*stay frozen in this run"
    ):
        trainer.fit(module, datamodule=_dm())
    torch.testing.assert_close(module.model.get_parameter(embeddings), before, rtol=0, atol=0)


# --- T5: aliases of the shared table, the tied LM head, relative attention biases (issue #14) ---


def _t5_lm():
    """T5ForConditionalGeneration from the zoo's tiny T5 config (the zoo builds T5 for classification only)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(FAMILIES["t5"].config)
    cfg.pop("model_type")
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**cfg)).train()


def _t5_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (3, 9), generator=g)
    ids[:, -1] = 2  # end of sequence (T5 classification pools it)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(5, 64, (3, 7), generator=g),
    }


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}


T5_INPUT = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}


def test_t5_untie_keeps_every_input_alias_frozen_and_the_head_trainable():
    model = _t5_lm()
    reference = copy.deepcopy(model)  # by hand: untie the head, freeze the one shared table
    reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    reference.shared.weight.requires_grad_(False)
    assert reference.encoder.embed_tokens.weight is reference.shared.weight

    result = freeze_embeddings(model, untie=True)
    assert result.modules == ["shared", "encoder.embed_tokens", "decoder.embed_tokens"]
    assert set(result.parameters) == T5_INPUT and result.tied == {}
    assert result.num_parameters == model.shared.weight.numel()  # one tensor, counted once
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert frozen == T5_INPUT
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    assert model.lm_head.weight is not model.shared.weight and model.lm_head.weight.requires_grad
    for name in (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ):
        assert model.get_parameter(name).requires_grad  # not an input embedding

    batch = _t5_batch()
    got, expected = _grads(model, batch), _grads(reference, batch)
    assert set(got) == set(expected) and not T5_INPUT & set(got) and "lm_head.weight" in got
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_t5_tied_head_is_frozen_with_a_warning():
    model = _t5_lm()
    with pytest.warns(UserWarning, match=r"shared.weight is shared with lm_head.weight"):
        result = freeze_embeddings(model)
    assert result.tied == {"shared.weight": ["lm_head.weight"]}  # the input aliases are not "ties"
    assert not model.lm_head.weight.requires_grad and model.lm_head.weight is model.shared.weight


def test_lightning_module_wrapping_t5_freezes_exactly_the_input_embeddings():
    module = ModelModule(FAMILIES["t5"].build())
    result = freeze_embeddings(module)
    expected = {f"model.transformer.{n}" for n in T5_INPUT}
    assert set(result.parameters) == expected
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert frozen == expected  # both relative attention biases stay trainable
    # the same as on the Hugging Face model itself
    assert {f"model.{n}" for n in find_input_embeddings(module.model)} == set(find_input_embeddings(module))


def test_callback_on_t5_through_the_trainer():
    module = ModelModule(FAMILIES["t5"].build(), optimizer="adamw", lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    samples = make_samples(16, seed=5)
    for s in samples:
        s["input_ids"] = [*s["input_ids"], 2]  # one end-of-sequence token each (T5 classification pools it)
    dm = BucketDataModule(samples, pad_token_id=0, batch_size=8, seed=3)
    trainer = cpu_trainer(max_steps=2, callbacks=[FreezeEmbeddings()])
    trainer.fit(module, datamodule=dm)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "model.transformer.shared.weight" not in changed
    assert {
        "model.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "model.transformer.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    } <= changed


def test_several_models_and_empty_names_are_errors():
    class TwoModels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher, self.student = tiny_bert(), tiny_bert()

    with pytest.raises(ValueError, match=r"several models with input embeddings \(teacher, student\)"):
        freeze_embeddings(TwoModels())
    assert freeze_embeddings(TwoModels(), names=["student.bert.embeddings.word_embeddings"]).num_parameters == 64 * 16
    with pytest.raises(ValueError, match="`names` is empty"):
        freeze_embeddings(tiny_bert(), names=[])
    with pytest.raises(ValueError, match=r"'bert.embeddings' of BertForSequenceClassification holds no parameters"):
        freeze_embeddings(tiny_bert(), names=["bert.embeddings"])


def test_plain_model_with_two_stacks_keeps_embeddings_inside_blocks_trainable():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias_table = torch.nn.Embedding(4, 8)  # like T5's relative attention bias
            self.linear = torch.nn.Linear(8, 8)

    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(10, 8)
            self.encoder = torch.nn.ModuleList(Block() for _ in range(2))
            self.decoder = torch.nn.ModuleList(Block() for _ in range(3))

    assert list(find_input_embeddings(TwoStacks())) == ["tok"]


# --- the DDP setup checks and the gradient average after unfreezing ---


def _stub_trainer(**kwargs):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    defaults = dict(max_epochs=3, world_size=2, strategy=DDPStrategy(), precision_plugin=object(), precision="32-true")
    defaults.update(kwargs)
    return SimpleNamespace(**defaults)


def test_unfreeze_on_several_processes_refuses_other_strategies_and_fp16():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    callback = FreezeEmbeddings(unfreeze_at_epoch=1)
    module = ModelModule(tiny_bert())
    with pytest.raises(ValueError, match=r"supports DDP strategies only, got FSDPStrategy"):
        callback.setup(_stub_trainer(strategy=FSDPStrategy()), module, "fit")
    fp16 = SimpleNamespace(scaler=object())
    with pytest.raises(ValueError, match=r"fp16 AMP \(precision='16-mixed'\) on 2 processes.*bf16-mixed"):
        callback.setup(_stub_trainer(precision_plugin=fp16, precision="16-mixed"), module, "fit")
    assert callback.frozen is None  # refused before anything was frozen
    FreezeEmbeddings().setup(_stub_trainer(precision_plugin=fp16, precision="16-mixed"), module, "fit")  # no unfreeze


class _TwoOptimizers(ModelModule):
    def __init__(self):
        super().__init__(tiny_bert())
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)  # configure_optimizers gives two
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable[:10], lr=0.1), torch.optim.SGD(trainable[10:], lr=0.1)


def test_unfreeze_into_one_of_several_optimizers_that_never_held_them_is_an_error():
    trainer = cpu_trainer(max_epochs=2, callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1)])
    with pytest.raises(ValueError, match=r"were in none of the 2 optimizers"):
        trainer.fit(_TwoOptimizers(), datamodule=_dm())


class _Fixed(torch.utils.data.Dataset):
    """Equal-length samples, no padding: a rank's batch mean is a mean over equally many items."""

    def __init__(self, n=32, length=10):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(5, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class _Interleaved(pl.LightningDataModule):
    """Rank ``r`` of ``w`` gets items ``r, r + w, ...`` in order: ``w`` ranks of batch ``8 / w`` see, step by step,
    the items of one process's batch 8."""

    def train_dataloader(self):
        assert self.trainer is not None
        rank, world = self.trainer.global_rank, self.trainer.world_size
        subset = torch.utils.data.Subset(_Fixed(), range(rank, 32, world))
        return torch.utils.data.DataLoader(subset, batch_size=8 // world)


def _unfreeze_run(tmp_path, devices):
    tmp_path.mkdir()
    module = ModelModule(tiny_bert(), optimizer="sgd", lr=0.5, record_dir=str(tmp_path))
    kwargs = {"devices": 2, "strategy": "ddp_spawn"} if devices == 2 else {}
    trainer = cpu_trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        callbacks=[FreezeEmbeddings(unfreeze_at_epoch=1)],
        **kwargs,
    )
    trainer.fit(module, datamodule=_Interleaved())
    return [torch.load(tmp_path / f"params_rank{r}.pt") for r in range(devices)]


@pytest.mark.ddp
def test_unfreeze_under_ddp_keeps_ranks_identical_and_equals_one_process(tmp_path):
    (single,) = _unfreeze_run(tmp_path / "one", 1)
    rank0, rank1 = _unfreeze_run(tmp_path / "two", 2)
    initial = tiny_bert().state_dict()
    emb = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(single[emb], initial[emb])  # trained in epoch 1
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0, msg=k)  # the ranks stayed in sync
        torch.testing.assert_close(rank0[k], single[k], rtol=1e-5, atol=1e-6, msg=k)  # and equal one process


def test_average_gradients_counts_a_missing_gradient_as_zero_and_keeps_globally_missing_ones_none():
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_txopt.callbacks.freeze_embeddings import _average_gradients

    class OtherRank(DDPStrategy):
        """Two processes, the other one holding ``other`` (its flat buffer: gradients, then presence flags)."""

        def __init__(self, other):
            super().__init__()
            self.other = other

        @property
        def world_size(self):
            return 2

        def reduce(self, tensor, group=None, reduce_op="mean"):
            assert reduce_op == "sum"
            return tensor + self.other

    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad = torch.tensor([2.0, 4.0])  # here and there
    # b: only on the other rank; c: nowhere
    other = torch.tensor([6.0, 8.0, 1.0, 3.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    _average_gradients([a, b, c], OtherRank(other))
    torch.testing.assert_close(a.grad, torch.tensor([4.0, 6.0]))
    torch.testing.assert_close(b.grad, torch.tensor([0.5, 1.5]))
    assert c.grad is None


def test_unfrozen_group_joins_torch_schedulers_through_the_one_internal_access():
    # _extend_scheduler is the one place that extends torch scheduler state (no public API adds a group); it relies
    # on these attributes: fail here, loudly, if torch renames them
    from lightning_txopt.callbacks.freeze_embeddings import _extend_scheduler

    for make in (
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5**step),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    ):
        first = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([first], lr=1.0)
        scheduler = make(opt)
        assert isinstance(scheduler.base_lrs, list) and isinstance(vars(scheduler).get("_last_lr"), list)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.25, "initial_lr": 0.25})
        _extend_scheduler(scheduler, opt.param_groups[1], like=0)
        assert len(scheduler.get_last_lr()) == 2
        opt.step()
        scheduler.step()
        assert scheduler.get_last_lr() == pytest.approx([0.5, 0.125])  # the new group follows the same schedule

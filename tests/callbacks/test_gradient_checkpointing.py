from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_txopt.callbacks.gradient_checkpointing import (
    GradientCheckpointing,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    selective_checkpointing_available,
)
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
from tests.utils.test_blocks import DictTransformer
from tests.zoo import FAMILIES

MODES = ["full"] + (["selective"] if selective_checkpointing_available() else [])


def _count_block_forwards(model, blocks):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1

    handles = [b.register_forward_hook(hook) for b in blocks]
    return calls, handles


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2, PlainTransformer])
@pytest.mark.parametrize("every_n_layers", [1, 2])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_reference(factory, every_n_layers, mode):
    model = factory()
    model.train()
    batch = batch_for(model)
    reference = grads_of(copy.deepcopy(model), batch)
    plan = enable_gradient_checkpointing(model, every_n_layers=every_n_layers, mode=mode)
    got = grads_of(model, batch)
    assert set(got) == set(reference)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7)
    native = every_n_layers == 1 and mode == "full" and not isinstance(model, PlainTransformer)
    assert plan.mechanism == ("huggingface" if native else "wrap")
    if not native:
        assert plan.checkpointed == tuple(range(0, 4, every_n_layers))


def test_blocks_are_recomputed_in_backward():
    model = PlainTransformer(num_layers=4)
    model.train()
    batch = batch_for(model)
    calls, _ = _count_block_forwards(model, model.layers)
    grads_of(model, batch)
    assert calls["n"] == 4  # plain: one forward per block
    enable_gradient_checkpointing(model, every_n_layers=2)
    calls["n"] = 0
    grads_of(model, batch)
    # forward hooks of a checkpointed block fire in the forward; its recomputation calls forward directly
    forwards = {"n": 0}
    original = type(model.layers[0]).forward

    def counting(self, *a, **k):
        forwards["n"] += 1
        return original(self, *a, **k)

    type(model.layers[0]).forward = counting
    try:
        grads_of(model, batch)
    finally:
        type(model.layers[0]).forward = original
    assert forwards["n"] == 4 + 2  # blocks 0 and 2 run twice


def test_eval_and_no_grad_do_not_checkpoint():
    model = PlainTransformer()
    enable_gradient_checkpointing(model)
    model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (4, 3)


def test_names_state_dict_and_pickling_unchanged():
    model = PlainTransformer()
    keys = list(model.state_dict())
    enable_gradient_checkpointing(model)
    assert list(model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(model))
    batch = batch_for(model)
    torch.testing.assert_close(clone(**batch), model(**batch))
    copy.deepcopy(model)
    disable_gradient_checkpointing(model)
    assert "forward" not in model.layers[0].__dict__


def test_block_classes_override_and_errors():
    model = tiny_bert()
    plan = enable_gradient_checkpointing(model, block_classes=["BertLayer"])
    assert plan.mechanism == "wrap" and plan.block_list == "bert.encoder.layer"
    with pytest.raises(ValueError, match="No repeated block list"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="No repeated block list"):
        enable_gradient_checkpointing(PlainTransformer(), block_classes=["Nope"])
    with pytest.raises(ValueError, match="every_n_layers"):
        enable_gradient_checkpointing(PlainTransformer(), every_n_layers=0)
    with pytest.raises(ValueError, match="mode"):
        enable_gradient_checkpointing(PlainTransformer(), mode="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every_n_layers"):
        GradientCheckpointing(every_n_layers=0)


def test_selective_unavailable_is_a_clear_error(monkeypatch):
    import torch.utils.checkpoint as tc

    monkeypatch.delattr(tc, "create_selective_checkpoint_contexts", raising=False)
    with pytest.raises(RuntimeError, match="mode='selective' needs"):
        enable_gradient_checkpointing(PlainTransformer(), mode="selective")


def test_use_cache_is_turned_off():
    model = tiny_gpt2()
    assert model.config.use_cache
    enable_gradient_checkpointing(model)
    assert not model.config.use_cache


@pytest.mark.parametrize("kwargs", [{}, {"every_n_layers": 2}])
def test_callback_through_trainer_matches_plain_training(kwargs):
    dm = BucketDataModule(make_samples(32, seed=2), pad_token_id=0, batch_size=8, seed=1)
    plain = ModelModule(tiny_bert(), lr=0.5)
    cpu_trainer(max_epochs=1).fit(plain, datamodule=dm)
    module = ModelModule(tiny_bert(), lr=0.5)
    callback = GradientCheckpointing(**kwargs)
    cpu_trainer(max_epochs=1, callbacks=[callback]).fit(module, datamodule=dm)
    assert callback.plan is not None and callback.plan.num_blocks == 4
    for (name, a), b in zip(plain.model.state_dict().items(), module.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --- encoder-decoders (both stacks, caches off everywhere) and ModuleDict block lists (issue #14) ---


def _t5_lm():
    """T5ForConditionalGeneration from the zoo's tiny T5 config (the zoo builds T5 for classification only)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(FAMILIES["t5"].config)
    cfg.pop("model_type")
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**cfg)).train()


def _t5_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (3, 9), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(5, 64, (3, 7), generator=g),
    }


def _t5_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _CountForwards:
    """Counts calls of a block class's forward (a checkpoint's recomputation calls it directly)."""

    def __init__(self, cls):
        self.cls, self.original, self.n = cls, cls.forward, 0

    def __enter__(self):
        original = self.original

        def counting(module, *args, **kwargs):
            self.n += 1
            return original(module, *args, **kwargs)

        self.cls.forward = counting
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.original


@pytest.mark.parametrize("mode", MODES)
def test_t5_wrapper_every_2_checkpoints_both_stacks_exactly(mode):
    from transformers.models.t5.modeling_t5 import T5Block

    model = _t5_lm()
    batch = _t5_batch()
    reference = _t5_grads(copy.deepcopy(model), batch)
    plan = enable_gradient_checkpointing(model, prefer_native=False, every_n_layers=2, mode=mode)
    assert plan.mechanism == "wrap" and plan.block_lists == ("encoder.block", "decoder.block")
    assert plan.blocks_per_list == (2, 2) and plan.num_blocks == 4 and plan.checkpointed == (0, 2)
    assert plan.checkpointed_in("encoder.block") == (0,) and plan.checkpointed_in("decoder.block") == (0,)
    assert plan.block_list == "encoder.block"
    assert not model.config.use_cache and not model.encoder.config.use_cache and not model.decoder.config.use_cache
    with _CountForwards(T5Block) as calls:
        got = _t5_grads(model, batch)  # raised CheckpointError before: the decoder's cache was still on
    assert calls.n == 4 + 2  # every block once, block 0 of each stack once more in the backward
    assert set(got) == set(reference)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_t5_native_plan_reports_both_stacks():
    model = _t5_lm()
    batch = _t5_batch()
    reference = _t5_grads(copy.deepcopy(model), batch)
    plan = enable_gradient_checkpointing(model)
    assert plan.mechanism == "huggingface" and plan.block_list is None
    assert plan.block_lists == ("encoder.block", "decoder.block") and plan.checkpointed == (0, 1, 2, 3)
    assert not model.decoder.config.use_cache
    got = _t5_grads(model, batch)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_a_cache_passed_to_a_checkpointed_block_is_a_clear_error():
    model = _t5_lm()
    enable_gradient_checkpointing(model, prefer_native=False)
    with pytest.raises(RuntimeError, match=r"checkpointed T5Block was called with a KV cache"):
        model(**_t5_batch(), use_cache=True)
    with pytest.raises(ValueError, match=r"'nope' is not a checkpointed block list"):
        enable_gradient_checkpointing(_t5_lm(), prefer_native=False).checkpointed_in("nope")


@pytest.mark.parametrize("block_classes", [None, ["TransformerEncoderLayer"]])
def test_module_dict_blocks(block_classes):
    model = DictTransformer()
    model.train()
    batch = batch_for(model)
    reference = grads_of(copy.deepcopy(model), batch)
    plan = enable_gradient_checkpointing(model, every_n_layers=2, block_classes=block_classes)
    assert plan.block_lists == ("blocks",) and plan.checkpointed == (0, 2)
    assert "forward" in model.blocks["second"].__dict__ and "forward" in model.blocks["zeta"].__dict__
    assert "forward" not in model.blocks["first"].__dict__  # insertion order, not key order
    with _CountForwards(torch.nn.TransformerEncoderLayer) as calls:
        got = grads_of(model, batch)
    assert calls.n == 4 + 2
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)

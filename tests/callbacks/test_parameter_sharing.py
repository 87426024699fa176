from __future__ import annotations

import copy
import os
from typing import cast

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from lightning_txopt.callbacks.gradient_checkpointing import enable_gradient_checkpointing
from lightning_txopt.callbacks.parameter_sharing import ParameterSharing, layer_mapping, share_layers
from lightning_txopt.data import BucketDataModule
from lightning_txopt.utils.blocks import BlockList
from tests.helpers import (
    ModelModule,
    PlainTransformer,
    batch_for,
    cpu_trainer,
    grads_of,
    loss_of,
    make_samples,
    tiny_bert,
    tiny_gpt2,
)
from tests.utils.test_blocks import DictTransformer
from tests.zoo import FAMILIES


@pytest.mark.parametrize(
    ("n", "m", "strategy", "expected"),
    [
        (6, 3, "sequence", [0, 0, 1, 1, 2, 2]),
        (6, 3, "cycle", [0, 1, 2, 0, 1, 2]),
        (6, 3, "cycle_rev", [0, 1, 2, 2, 1, 0]),
        (12, 4, "cycle_rev", [0, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 0]),
        (7, 3, "cycle_rev", [0, 1, 2, 0, 1, 2, 2]),
        (5, 2, "sequence", [0, 0, 0, 1, 1]),
        (3, 1, "all", [0, 0, 0]),
        (4, 4, "cycle", [0, 1, 2, 3]),
    ],
)
def test_mappings_match_the_paper(n, m, strategy, expected):
    assert layer_mapping(n, m, strategy) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((6, 0, "cycle"), r"\[1, 6\]"),
        ((6, 7, "cycle"), r"\[1, 6\]"),
        ((6, 2, "all"), "must be 1"),
        ((6, 2, "spiral"), "strategy"),
    ],
)
def test_mapping_errors(args, match):
    with pytest.raises(ValueError, match=match):
        layer_mapping(*args)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2, PlainTransformer])
@pytest.mark.parametrize("strategy", ["sequence", "cycle", "cycle_rev"])
def test_shared_gradient_is_the_sum_over_positions(factory, strategy):
    """Independent reference: the unshared model with copies of the kept blocks, gradients summed per group."""
    model = factory()
    result = share_layers(model, num_unique_layers=2, strategy=strategy)
    blocks_name = result.block_list
    reference = copy.deepcopy(model)
    container = reference.get_submodule(blocks_name)
    for i in range(len(container)):
        container[i] = copy.deepcopy(container[i])  # same weights, no sharing
    assert len({id(b) for b in container}) == 4
    batch = batch_for(model)
    torch.testing.assert_close(loss_of(model, batch), loss_of(reference, batch))
    got = grads_of(model, batch)
    ref = grads_of(reference, batch)
    for name, g in got.items():
        if not name.startswith(blocks_name + "."):
            continue
        rest = name[len(blocks_name) + 1 :]
        pos, _, pname = rest.partition(".")
        u = result.mapping[int(pos)]
        expected = sum(ref[f"{blocks_name}.{i}.{pname}"] for i, g_ in enumerate(result.mapping) if g_ == u)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_counts_parameters_once_and_bert_base_target():
    from transformers import BertConfig, BertModel

    config = BertConfig()  # BERT-base shape: 12 layers, 768 hidden
    with torch.device("meta"):
        model = BertModel(config)
    encoder_before = sum(p.numel() for p in model.encoder.parameters())
    result = share_layers(model, num_unique_layers=4, strategy="cycle_rev")
    encoder_after = sum(p.numel() for p in model.encoder.parameters())
    assert encoder_before == 3 * encoder_after
    assert result.params_before - result.params_after == encoder_before - encoder_after
    assert len(list(model.parameters())) < len(list(model.named_parameters(remove_duplicate=False)))


def test_init_first_and_average():
    model = PlainTransformer(num_layers=4)
    originals = [cast(nn.TransformerEncoderLayer, copy.deepcopy(layer)) for layer in model.layers]
    share_layers(model, num_unique_layers=2, strategy="sequence", init="first")
    torch.testing.assert_close(model.get_parameter("layers.1.linear1.weight"), originals[0].linear1.weight)
    model = PlainTransformer(num_layers=4)
    share_layers(model, num_unique_layers=2, strategy="sequence", init="average")
    expected = (originals[2].linear1.weight + originals[3].linear1.weight) / 2
    torch.testing.assert_close(model.get_parameter("layers.3.linear1.weight"), expected)
    assert model.layers[2] is model.layers[3] and model.layers[0] is not model.layers[2]


def test_idempotent_and_conflicting_resharing():
    model = PlainTransformer(num_layers=4)
    share_layers(model, num_unique_layers=2)
    result = share_layers(model, num_unique_layers=2)
    assert result.params_before == result.params_after
    with pytest.raises(ValueError, match="already shared"):
        share_layers(model, num_unique_layers=2, strategy="sequence")
    with pytest.raises(ValueError, match="init"):
        share_layers(PlainTransformer(), num_unique_layers=2, init="random")  # type: ignore[arg-type]


def test_works_with_checkpointing():
    model = tiny_bert()
    share_layers(model, num_unique_layers=2)
    reference = grads_of(copy.deepcopy(model), batch_for(model))
    enable_gradient_checkpointing(model)
    model.train()
    got = grads_of(model, batch_for(model))
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7)


def _dm():
    return BucketDataModule(make_samples(32, seed=8), pad_token_id=0, batch_size=8, seed=2)


def test_checkpoint_reload_keeps_sharing_and_weights(tmp_path):
    module = ModelModule(tiny_bert(num_hidden_layers=4), optimizer="adamw", lr=1e-2)
    trainer = cpu_trainer(max_epochs=1, callbacks=[ParameterSharing(2, strategy="cycle")])
    trainer.fit(module, datamodule=_dm())
    assert trainer.optimizers[0].param_groups[0]["params"].__len__() == len(list(module.parameters()))
    shared_path = tmp_path / "shared.ckpt"
    trainer.save_checkpoint(shared_path)
    unshared = ModelModule(tiny_bert(num_hidden_layers=4), optimizer="adamw")
    t2 = cpu_trainer(max_epochs=1)
    t2.fit(unshared, datamodule=_dm())
    unshared_path = tmp_path / "unshared.ckpt"
    t2.save_checkpoint(unshared_path)
    assert os.path.getsize(shared_path) < 0.8 * os.path.getsize(unshared_path)

    fresh = ModelModule(tiny_bert(num_hidden_layers=4), optimizer="adamw", lr=1e-2)
    cpu_trainer(max_epochs=1, callbacks=[ParameterSharing(2, strategy="cycle")]).fit(
        fresh, datamodule=_dm(), ckpt_path=str(shared_path)
    )  # already at max_epochs: restores, trains no further
    layers = cast(BertForSequenceClassification, fresh.model).bert.encoder.layer
    assert layers[0] is layers[2] and layers[1] is layers[3]
    query = "attention.self.query.weight"
    assert layers[0].get_parameter(query).data_ptr() == layers[2].get_parameter(query).data_ptr()
    for (k, a), b in zip(module.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="num_unique_layers=2"):
        cpu_trainer(max_epochs=1, callbacks=[ParameterSharing(1, strategy="all")]).fit(
            ModelModule(tiny_bert(num_hidden_layers=4)), datamodule=_dm(), ckpt_path=str(shared_path)
        )


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="must be 1"):
        ParameterSharing(2, strategy="all")
    with pytest.raises(ValueError, match="strategy"):
        ParameterSharing(2, strategy="zigzag")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_unique_layers` must be a positive integer, got 0"):
        ParameterSharing(0)
    assert type(ParameterSharing(np.int64(2)).num_unique_layers) is int  # a plain int in the checkpointed state


# --- every stack, blocks that differ beyond their weights, nothing to share (issue #14) ---


def weight_copy_reference(original, shared, result):
    """The unshared ``original`` whose every position holds the weights of the block it shares in ``shared``.

    Each position keeps its own block and settings (attention type, window, ...): sharing is exact iff the shared
    model computes what this reference computes.
    """
    reference = copy.deepcopy(original)
    for name in result.block_lists:
        ours, theirs = BlockList(name, shared.get_submodule(name)), BlockList(name, reference.get_submodule(name))
        for i in range(len(ours)):
            missing, unexpected = theirs[i].load_state_dict(ours[i].state_dict(), strict=False)
            assert not missing, (name, i, missing)
            assert all("relative_attention_bias" in k for k in unexpected), (name, i, unexpected)  # T5: block 0 only
    return reference


def assert_sharing_exact(shared, reference, result, loss, rtol=1e-5, atol=1e-6):
    """Outputs equal; each shared block's gradient is the sum of its positions' gradients in the reference."""
    shared.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    a, b = loss(shared), loss(reference)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    a.backward()
    b.backward()
    ref_grads = dict(reference.named_parameters(remove_duplicate=False))
    checked = set()
    for name in result.block_lists:
        ours, theirs = BlockList(name, shared.get_submodule(name)), BlockList(name, reference.get_submodule(name))
        for i in range(len(ours)):
            if any(ours[i] is ours[j] for j in range(i)):
                continue
            users = [j for j in range(len(ours)) if ours[j] is ours[i]]
            for pname, p in ours[i].named_parameters():
                parts = [dict(theirs[j].named_parameters()).get(pname) for j in users]
                expected = sum((q.grad for q in parts if q is not None and q.grad is not None), torch.zeros_like(p))
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=f"{name}[{i}].{pname}")
                checked.add(id(p))
    for pname, p in shared.named_parameters():
        if id(p) not in checked:
            q = ref_grads[pname]
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=pname)


def _t5_loss(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (3, 9), generator=g)
    ids[:, -1] = 2
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 2])).loss


@pytest.mark.parametrize("init", ["first", "average"])
def test_t5_shares_both_stacks_exactly(init):
    original = FAMILIES["t5"].build()
    model = copy.deepcopy(original)
    result = share_layers(model, num_unique_layers=1, strategy="all", init=init)
    assert result.block_lists == ("transformer.encoder.block", "transformer.decoder.block")
    assert result.mappings == ((0, 0), (0, 0)) and result.mapping == (0, 0)
    assert model.transformer.encoder.block[1] is model.transformer.encoder.block[0]
    assert model.transformer.decoder.block[1] is model.transformer.decoder.block[0]
    assert not model.transformer.decoder.config.use_cache
    if init == "average":
        enc = original.transformer.encoder.block
        expected = (enc[0].layer[1].DenseReluDense.wi.weight + enc[1].layer[1].DenseReluDense.wi.weight) / 2
        torch.testing.assert_close(model.transformer.encoder.block[0].layer[1].DenseReluDense.wi.weight, expected)
        bias = "layer.0.SelfAttention.relative_attention_bias.weight"  # only block 0 has it: kept as it was
        torch.testing.assert_close(model.transformer.encoder.block[0].get_parameter(bias), enc[0].get_parameter(bias))
    assert_sharing_exact(model, weight_copy_reference(original, model, result), result, _t5_loss)


def _zoo_loss(model):
    batch = batch_for(model)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@pytest.mark.parametrize(
    ("family", "match"),
    [
        (
            "modernbert",
            r"position 1 of model.layers would use block 0, which differs from its own block beyond the "
            r"weights \(.*attention_type: 'sliding_attention' here, 'full_attention' in the shared block",
        ),
        ("qwen2", r"position 1 of model.layers would use block 0.*sliding_window: 8 here, None in the shared block"),
    ],
)
def test_blocks_that_differ_beyond_their_weights_are_refused(family, match):
    model = FAMILIES[family].build()
    before = [id(b) for b in model.model.layers]
    with pytest.raises(ValueError, match=match):
        share_layers(model, num_unique_layers=1, strategy="all")
    assert [id(b) for b in model.model.layers] == before  # nothing changed


def test_a_mapping_that_keeps_each_kind_is_accepted_and_exact():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = FAMILIES["qwen2"].config_dict(num_hidden_layers=4, max_window_layers=2)  # full, full, sliding, sliding
    cfg.pop("model_type")
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **cfg)
    config.num_labels = 3
    original = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()
    with pytest.raises(ValueError, match=r"position 2 of model.layers would use block 0"):
        share_layers(copy.deepcopy(original), num_unique_layers=2, strategy="cycle")
    model = copy.deepcopy(original)
    result = share_layers(model, num_unique_layers=2, strategy="sequence")
    assert result.mapping == (0, 0, 1, 1)
    assert_sharing_exact(model, weight_copy_reference(original, model, result), result, _zoo_loss)


def test_layer_index_counts_when_the_model_uses_it():
    with pytest.raises(ValueError, match=r"attn.layer_idx: 1 here, 0 in the shared block"):
        share_layers(tiny_gpt2(scale_attn_by_inverse_layer_idx=True), num_unique_layers=1, strategy="all")
    share_layers(tiny_gpt2(), num_unique_layers=1, strategy="all")  # otherwise it only picks a cache slot


def test_nothing_to_share_is_an_error():
    with pytest.raises(ValueError, match=r"num_unique_layers=4 is the number of blocks \(layers: 4\): nothing"):
        share_layers(PlainTransformer(num_layers=4), num_unique_layers=4)
    with pytest.raises(ValueError, match="nothing would be shared"):
        cpu_trainer(max_epochs=1, callbacks=[ParameterSharing(4)]).fit(
            ModelModule(PlainTransformer()), datamodule=_dm()
        )


def test_module_dict_blocks_are_shared_in_insertion_order():
    original = DictTransformer()
    model = copy.deepcopy(original)
    result = share_layers(model, num_unique_layers=2, strategy="sequence")
    assert result.block_lists == ("blocks",) and result.mapping == (0, 0, 1, 1)
    assert list(model.blocks.keys()) == list(DictTransformer.KEYS)
    assert model.blocks["first"] is model.blocks["second"] and model.blocks["alpha"] is model.blocks["zeta"]
    assert_sharing_exact(
        model, weight_copy_reference(original, model, result), result, lambda m: loss_of(m, batch_for(m))
    )

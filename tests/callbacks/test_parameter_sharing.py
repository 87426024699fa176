from __future__ import annotations

import copy
import os

import pytest
import torch

from lightning_txopt.callbacks.gradient_checkpointing import enable_gradient_checkpointing
from lightning_txopt.callbacks.parameter_sharing import ParameterSharing, layer_mapping, share_layers
from lightning_txopt.data import BucketDataModule
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
    originals = [copy.deepcopy(layer) for layer in model.layers]
    share_layers(model, num_unique_layers=2, strategy="sequence", init="first")
    torch.testing.assert_close(model.layers[1].linear1.weight, originals[0].linear1.weight)
    model = PlainTransformer(num_layers=4)
    share_layers(model, num_unique_layers=2, strategy="sequence", init="average")
    expected = (originals[2].linear1.weight + originals[3].linear1.weight) / 2
    torch.testing.assert_close(model.layers[3].linear1.weight, expected)
    assert model.layers[2] is model.layers[3] and model.layers[0] is not model.layers[2]


def test_idempotent_and_conflicting_resharing():
    model = PlainTransformer(num_layers=4)
    share_layers(model, num_unique_layers=2)
    result = share_layers(model, num_unique_layers=2)
    assert result.params_before == result.params_after
    with pytest.raises(ValueError, match="already shared"):
        share_layers(model, num_unique_layers=2, strategy="sequence")
    with pytest.raises(ValueError, match="init"):
        share_layers(PlainTransformer(), num_unique_layers=2, init="random")


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
    layers = fresh.model.bert.encoder.layer
    assert layers[0] is layers[2] and layers[1] is layers[3]
    assert layers[0].attention.self.query.weight.data_ptr() == layers[2].attention.self.query.weight.data_ptr()
    for (k, a), b in zip(module.model.state_dict().items(), fresh.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="num_unique_layers=2"):
        cpu_trainer(max_epochs=1, callbacks=[ParameterSharing(4, strategy="cycle")]).fit(
            ModelModule(tiny_bert(num_hidden_layers=4)), datamodule=_dm(), ckpt_path=str(shared_path)
        )


def test_callback_argument_errors():
    with pytest.raises(ValueError, match="must be 1"):
        ParameterSharing(2, strategy="all")
    with pytest.raises(ValueError, match="strategy"):
        ParameterSharing(2, strategy="zigzag")
    with pytest.raises(ValueError, match="num_unique_layers"):
        ParameterSharing(0)

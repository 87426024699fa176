from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lightning_txopt.utils.blocks import disable_kv_cache, find_block_list, find_block_lists, model_configs
from tests.helpers import VOCAB, PlainTransformer, tiny_bert
from tests.zoo import FAMILIES


class DictTransformer(nn.Module):
    """A plain encoder whose blocks sit in an nn.ModuleDict, keyed out of alphabetical order."""

    KEYS = ("second", "first", "zeta", "alpha")

    def __init__(self, d_model: int = 16, num_labels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleDict(
            {k: nn.TransformerEncoderLayer(d_model, 2, 32, dropout=0.0, batch_first=True) for k in self.KEYS}
        )
        self.head = nn.Linear(d_model, num_labels)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: Any = None, **_: Any
    ) -> SimpleNamespace:
        x = self.tok(input_ids)
        pad = None if attention_mask is None else attention_mask == 0
        for block in self.blocks.values():  # insertion order
            x = block(x, src_key_padding_mask=pad)
        logits = self.head(x[:, 0])
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)  # like a Hugging Face output, for tests.helpers.loss_of


def test_t5_has_two_block_lists_in_model_order():
    model = FAMILIES["t5"].build()
    lists = find_block_lists(model)
    assert [(b.name, len(b)) for b in lists] == [("transformer.encoder.block", 2), ("transformer.decoder.block", 2)]
    assert find_block_list(model).name == "transformer.decoder.block"  # the largest (it has cross-attention)


def test_lists_inside_blocks_are_not_block_lists():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Expert() for _ in range(3))

    model = nn.Sequential(nn.Embedding(5, 4), nn.ModuleList(MoEBlock() for _ in range(2)))
    assert [b.name for b in find_block_lists(model)] == ["1"]


def test_module_dict_is_detected_in_insertion_order():
    model = DictTransformer()
    found = find_block_list(model)
    assert found.name == "blocks" and len(found) == 4
    assert found.blocks == [model.blocks[k] for k in DictTransformer.KEYS]
    assert found[2] is model.blocks["zeta"]
    assert find_block_list(model, block_classes=["TransformerEncoderLayer"]).name == "blocks"
    assert find_block_list(model, block_classes=["torch.nn.modules.transformer.TransformerEncoderLayer"]).name == (
        "blocks"
    )


def test_replace_keeps_keys_and_order():
    model = DictTransformer()
    found = find_block_list(model)
    first = found[0]
    found.replace(2, first)
    assert list(model.blocks.keys()) == list(DictTransformer.KEYS)
    assert model.blocks["zeta"] is first
    plain = PlainTransformer()
    listed = find_block_list(plain)
    listed.replace(3, listed[0])
    assert plain.layers[3] is plain.layers[0]


def test_errors():
    with pytest.raises(ValueError, match=r"No repeated block list found in Linear.*Pass `block_classes"):
        find_block_lists(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"of classes \['Nope'\]"):
        find_block_list(DictTransformer(), block_classes=["Nope"])
    stack = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})  # a stack of plain layers: not blocks
    with pytest.raises(ValueError, match="No repeated block list"):
        find_block_list(stack)


def test_disable_kv_cache_reaches_every_config():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(FAMILIES["t5"].config)
    cfg.pop("model_type")
    model = T5ForConditionalGeneration(T5Config(**cfg))
    configs: list[Any] = list(model_configs(model))  # configuration objects, whatever their class
    assert len(configs) == 3 and len({id(c) for c in configs}) == 3  # the model's, the encoder's, the decoder's
    assert model.decoder.config is not model.config and model.decoder.config.use_cache
    disable_kv_cache(model)
    assert not any(c.use_cache for c in configs)
    assert len(list(model_configs(tiny_bert()))) == 1
    disable_kv_cache(PlainTransformer())  # no config: nothing to do

"""Packed batches on the model side: exact against each sample run alone, or refused with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.models import check_packing_support, packed_model_inputs, position_offset
from lightning_txopt.models.attention import register_varlen_attention
from lightning_txopt.models.packing import attention_window, is_causal_model, pool_packed
from lightning_txopt.module import Task, TransformerModule
from tests.helpers import assert_same_gradients, tensor_sum
from tests.zoo import FAMILIES, VOCAB, WINDOW


def _samples(n=5, seed=0, longest=3 * WINDOW, eos=None):
    g = torch.Generator().manual_seed(seed)
    lens = [longest, 5, longest - 3, 2, WINDOW + 1][:n]
    out = []
    for k in lens:
        ids = torch.randint(3, VOCAB, (k,), generator=g)
        if eos is not None:
            ids[-1] = eos
        out.append(ids)
    return out


def _module(family: str, task: Task, attn: str = "auto") -> TransformerModule:
    torch.manual_seed(0)
    return TransformerModule(config=FAMILIES[family].config_dict(), task=task, num_labels=3, attn_implementation=attn)


@pytest.mark.parametrize("attn", ["auto", "sdpa", "eager"])
@pytest.mark.parametrize(
    "family",
    ["bert", "roberta", "distilbert", "electra", "modernbert", "gpt2", "llama", "qwen2", "mistral", "gpt_neox"],
)
def test_packed_classification_loss_and_gradients_equal_unpacked(family, attn):
    module = _module(family, "sequence-classification", attn)
    windowed = attention_window(module.model) is not None
    seqs = _samples()
    labels = torch.tensor([0, 1, 2, 0, 1])
    batch = PackingCollator(48)([{"input_ids": s, "labels": int(y)} for s, y in zip(seqs, labels, strict=True)])
    assert batch["input_ids"].shape[0] < len(seqs)  # really packed
    if windowed and attn != "auto":
        with pytest.raises(ValueError, match="sliding-window or local attention"):
            module.loss_and_items(batch, "sum")
        return
    reference = copy.deepcopy(module.model)
    loss, items, logits = module.loss_and_items(batch, "sum")
    alone = torch.cat([reference(input_ids=s[None]).logits for s in seqs])
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    loss.backward()
    F.cross_entropy(alone, labels, reduction="sum").backward()
    assert int(items) == 5
    assert_same_gradients(module.model, reference)


@pytest.mark.parametrize("attn", ["auto", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "gpt_neox"])
def test_packed_causal_lm_loss_items_and_gradients_equal_unpacked(family, attn):
    module = _module(family, "causal-lm", attn)
    if attention_window(module.model) is not None and attn != "auto":
        pytest.skip("refused on sdpa; covered by the classification test")
    seqs = _samples(seed=1)
    # no causal=True in the collator: the module itself keeps predictions inside each sample
    batch = PackingCollator(48)([{"input_ids": s, "labels": s} for s in seqs])
    reference = copy.deepcopy(module.model)
    loss, items, _ = module.loss_and_items(batch, "sum")  # the chunked loss: no full logits
    with torch.no_grad():
        logits = module.forward_logits(batch)
    per_sample = [reference(input_ids=s[None]).logits[0] for s in seqs]
    ref = tensor_sum(F.cross_entropy(lg[:-1], s[1:], reduction="sum") for lg, s in zip(per_sample, seqs, strict=True))
    assert int(items) == int(module.count_loss_items(batch)) == sum(len(s) - 1 for s in seqs)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for i, s in enumerate(seqs):  # each sample's logits equal its unpacked logits
        r, c = batch["cls_index"][i].tolist()
        torch.testing.assert_close(logits[r, c : c + len(s)], per_sample[i], rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    assert_same_gradients(module.model, reference)


def test_support_probe_covers_windows_and_refuses_what_it_cannot_pack():
    register_varlen_attention()
    for name in ("qwen2", "mistral", "modernbert"):
        model = FAMILIES[name].build("sequence-classification", attn="txopt_varlen")
        support = check_packing_support(model, task="sequence-classification")
        assert support.window is not None and support.window >= WINDOW
    with pytest.raises(ValueError, match="encoder-decoder"):
        check_packing_support(FAMILIES["t5"].build(), task="sequence-classification")
    roberta = FAMILIES["roberta"].build()
    assert position_offset(roberta) == roberta.config.pad_token_id + 1
    assert check_packing_support(roberta, task="sequence-classification").position_offset == 2


class _IgnoresPositions(torch.nn.Module):
    """A Hugging Face-shaped model whose positions ignore position_ids (cannot be packed)."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"vocab_size": VOCAB, "_attn_implementation": "sdpa"})()
        self.tok = torch.nn.Embedding(VOCAB, 8)
        self.pos = torch.nn.Embedding(64, 8)

    @property
    def base_model(self):
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        return type("O", (), {"last_hidden_state": x})()


def test_a_model_that_mixes_samples_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="mixes packed samples"):
        check_packing_support(_IgnoresPositions())


def test_eager_gets_an_additive_mask_and_sdpa_a_boolean_one():
    batch = PackingCollator(16)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    eager = FAMILIES["llama"].build("causal-lm", attn="eager")
    mask = packed_model_inputs(eager, batch)["attention_mask"]
    assert mask.dtype == torch.float32 and mask[0, 0, 4, 3] == 0 and mask[0, 0, 4, 2] < -1e30  # other sample
    assert mask[0, 0, 3, 4] < -1e30  # causal: a decoder never sees the future
    sdpa = packed_model_inputs(FAMILIES["bert"].build(attn="sdpa"), batch)["attention_mask"]
    assert sdpa.dtype == torch.bool and bool(sdpa[0, 0, 0, 2]) and not bool(sdpa[0, 0, 0, 3])  # bidirectional


def test_pooling_and_causality_helpers():
    assert is_causal_model(FAMILIES["gpt2"].build("causal-lm")) and not is_causal_model(FAMILIES["electra"].build())
    batch = PackingCollator(4, rows=2, num_slots=4)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    hidden = torch.arange(8.0).view(2, 4, 1)  # sample 0: row 0 cols 0-2; sample 1: row 1 cols 0-1
    assert pool_packed(hidden, batch, "mean")[:2].flatten().tolist() == [1.0, 4.5]
    assert pool_packed(hidden, batch, "last")[:2].flatten().tolist() == [2.0, 5.0]
    assert torch.isfinite(pool_packed(hidden, batch, "mean")).all()  # filler slots stay finite


def test_the_probe_compares_in_full_fp32_and_restores_the_matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ GPUs: ~5e-3 off, more than a leaking mask
    try:
        check_packing_support(FAMILIES["bert"].build(), task="sequence-classification")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("family", ["bert", "llama", "mistral"])
def test_the_probe_ignores_the_surrounding_autocast(family):
    # the first packed training batch runs the probe inside bf16-mixed's autocast: it must still compare in fp32
    register_varlen_attention()
    model = FAMILIES[family].build("sequence-classification", attn="txopt_varlen")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_packing_support(model, task="sequence-classification")
        with pytest.raises(ValueError, match="mixes packed samples"):
            check_packing_support(_IgnoresPositions())


def test_half_precision_parameters_are_compared_at_their_precision():
    register_varlen_attention()
    model = FAMILIES["llama"].build("causal-lm", attn="txopt_varlen").bfloat16()
    check_packing_support(model, task="causal-lm")  # bf16 arithmetic: within 3e-2, not the fp32 1e-4
    with pytest.raises(ValueError, match="mixes packed samples"):
        check_packing_support(_IgnoresPositions().bfloat16())


def test_the_exact_varlen_fallback_masks_each_row_not_the_whole_batch(monkeypatch):
    # CPU/fp32 runs the exact fallback: one (rows*W)^2 mask over a 16k-token batch would cost 16k^2 per head and
    # layer (the dense layout the fast path replaced); the rows stay rows, each masked by its own W x W block
    from lightning_txopt.models import attention

    shapes = []
    mask = attention.segment_mask

    def spy(*args, **kwargs):
        out = mask(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    register_varlen_attention()
    model = FAMILIES["llama"].build("causal-lm", attn="txopt_varlen")
    batch = PackingCollator(16)([{"input_ids": list(range(5, 5 + n))} for n in (9, 7, 12, 4, 10)])
    rows = batch["input_ids"].shape[0]
    monkeypatch.setattr(attention, "segment_mask", spy)
    inputs = packed_model_inputs(model, batch)
    assert inputs["input_ids"].shape == (rows, 16) and rows > 1
    logits = model(**inputs).logits
    assert set(shapes) == {(rows, 1, 16, 16)}
    for i, n in enumerate((9, 7, 12, 4, 10)):  # and each sample's logits are its logits alone
        r, c = batch["cls_index"][i].tolist()
        alone = model(input_ids=torch.tensor([list(range(5, 5 + n))])).logits[0]
        torch.testing.assert_close(logits[r, c : c + n], alone, rtol=1e-5, atol=1e-5)


def test_the_attention_implementation_is_read_where_transformers_keeps_it():
    # transformers has no public getter: models/packing.py reads config._attn_implementation in one function; if
    # transformers renames it, every model would read as "eager" here, so fail loudly instead
    from transformers import PretrainedConfig

    from lightning_txopt.models.packing import _attn_implementation

    assert isinstance(getattr(PretrainedConfig, "_attn_implementation", None), property)
    register_varlen_attention()
    assert _attn_implementation(FAMILIES["llama"].build("causal-lm", attn="txopt_varlen")) == "txopt_varlen"
    assert _attn_implementation(FAMILIES["bert"].build(attn="sdpa")) == "sdpa"

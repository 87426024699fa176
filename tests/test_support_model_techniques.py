"""Support matrix: every model family of ``tests/zoo.py`` x freezing, checkpointing and sharing.

Each cell is exact against an independent reference, or refused at setup with an error that names the model, the
reason and the alternative; never anything else. ``EXPECTED`` is the matrix (``docs/support.md`` is rendered from it).

Models: the causal-LM head where the family has one (so GPT-2's tied LM head is in the matrix), T5 as a
``T5ForConditionalGeneration`` (tied LM head, decoder with a KV cache), sequence classification for the encoders.
Sequences are 24 tokens, longer than every attention window of the zoo.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import pytest
import torch

from lightning_txopt.callbacks.freeze_embeddings import FreezeEmbeddings, freeze_embeddings
from lightning_txopt.callbacks.gradient_checkpointing import (
    GradientCheckpointing,
    Mode,
    enable_gradient_checkpointing,
    selective_checkpointing_available,
)
from lightning_txopt.callbacks.parameter_sharing import ParameterSharing, share_layers
from tests.callbacks.test_parameter_sharing import assert_sharing_exact, weight_copy_reference
from tests.helpers import ModelModule, as_dataset, cpu_trainer
from tests.zoo import FAMILIES, VOCAB

FREEZE_TIED = "freeze (tied)"
FREEZE_UNTIED = "freeze (untied)"
CKPT_NATIVE = "checkpointing (native)"
CKPT_WRAP = "checkpointing (wrapper)"
CKPT_EVERY2 = "checkpointing (wrapper, every 2)"
CKPT_SELECTIVE = "checkpointing (wrapper, every 2, selective)"
SHARE_ALL = "sharing (all)"
TECHNIQUES = [FREEZE_TIED, FREEZE_UNTIED, CKPT_NATIVE, CKPT_WRAP, CKPT_EVERY2, CKPT_SELECTIVE, SHARE_ALL]

_REFUSED_SHARING = {
    "modernbert": "refused: layers differ (global vs local attention; the first layer has no attention norm)",
    "qwen2": "refused: layers differ (full vs sliding-window attention)",
}
EXPECTED: dict[tuple[str, str], str] = {
    (family, technique): _REFUSED_SHARING.get(family, "exact") if technique == SHARE_ALL else "exact"
    for family in FAMILIES
    for technique in TECHNIQUES
}
# what a refusal's message must say, beyond naming the model class
_REFUSAL_PATTERNS = {
    ("modernbert", SHARE_ALL): r"attention_type: 'sliding_attention' here, 'full_attention' in the shared block.*"
    r"Choose a mapping in which every position uses a block of its own kind",
    ("qwen2", SHARE_ALL): r"sliding_window: 8 here, None in the shared block.*Choose a mapping",
}

# Independent references, written by hand from the models' code.
INPUT_EMBEDDINGS = {
    "bert": [f"bert.embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")],
    "roberta": [f"roberta.embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")],
    "distilbert": [f"distilbert.embeddings.{t}_embeddings.weight" for t in ("word", "position")],
    "electra": [f"electra.embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")],
    "modernbert": ["model.embeddings.tok_embeddings.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
    "llama": ["model.embed_tokens.weight"],
    "qwen2": ["model.embed_tokens.weight"],
    "mistral": ["model.embed_tokens.weight"],
    "gpt_neox": ["gpt_neox.embed_in.weight"],
    "t5": ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
}
TIED_HEAD = {"gpt2": "lm_head.weight", "t5": "lm_head.weight"}  # the others' configs do not tie their heads
BLOCK_LISTS = {
    "bert": {"bert.encoder.layer": 2},
    "roberta": {"roberta.encoder.layer": 2},
    "distilbert": {"distilbert.transformer.layer": 2},
    "electra": {"electra.encoder.layer": 2},
    "modernbert": {"model.layers": 3},
    "gpt2": {"transformer.h": 2},
    "llama": {"model.layers": 2},
    "qwen2": {"model.layers": 2},
    "mistral": {"model.layers": 2},
    "gpt_neox": {"gpt_neox.layers": 2},
    "t5": {"encoder.block": 2, "decoder.block": 2},
}
LENGTH = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def build(family: str) -> Any:
    fam = FAMILIES[family]
    if family == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = fam.config_dict()
        cfg.pop("model_type")
        torch.manual_seed(0)
        return T5ForConditionalGeneration(T5Config(**cfg)).train()
    return fam.build("causal-lm" if fam.causal_lm else "sequence-classification")


def batch_of(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    mask[0, LENGTH - 6 :] = 0
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0
    fam = FAMILIES[family]
    if family == "t5":
        labels = torch.randint(5, VOCAB, (3, 7), generator=g)
    elif fam.causal_lm:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (3,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_of(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def grads(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}


def assert_grads_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def frozen_names(model: Any) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _freeze_cell(family: str, untie: bool) -> None:
    model = build(family)
    original = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    reference = copy.deepcopy(model)
    head = TIED_HEAD.get(family)
    if head is not None and untie:  # by hand: the head gets its own trainable copy
        owner, _, pname = head.rpartition(".")
        module = reference.get_submodule(owner)
        setattr(module, pname, torch.nn.Parameter(getattr(module, pname).detach().clone()))
    for name in INPUT_EMBEDDINGS[family]:
        reference.get_parameter(name).requires_grad_(False)
    expected_frozen = set(INPUT_EMBEDDINGS[family]) | ({head} if head is not None and not untie else set())
    assert frozen_names(reference) == expected_frozen

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freeze_embeddings(model, untie=untie)
    tie_warnings = [w for w in caught if "is shared with" in str(w.message)]
    assert len(tie_warnings) == (1 if head is not None and not untie else 0)
    assert frozen_names(model) == expected_frozen

    batch = batch_of(family)
    got, want = grads(model, batch), grads(reference, batch)
    assert not expected_frozen & set(got)  # frozen parameters get no gradient
    assert_grads_equal(got, want)
    for m in (model, reference):  # one step: frozen parameters do not move, the rest moves as the reference
        torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01).step()
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(reference.named_parameters(remove_duplicate=False))
    for name, p in ours.items():
        if name in expected_frozen:
            torch.testing.assert_close(p, original[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-7, msg=name)


class CountForwards:
    """Counts calls of a block class's ``forward`` (a checkpoint's recomputation calls it directly)."""

    def __init__(self, cls: type[torch.nn.Module]) -> None:
        self.cls, self.original, self.n = cls, cls.forward, 0

    def __enter__(self) -> CountForwards:
        original = self.original

        def counting(module: Any, *args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return original(module, *args, **kwargs)

        self.cls.forward = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.forward = self.original


def _checkpointing_cell(family: str, technique: str) -> None:
    model = build(family)
    batch = batch_of(family)
    reference = grads(copy.deepcopy(model), batch)
    every = 2 if technique in (CKPT_EVERY2, CKPT_SELECTIVE) else 1
    kwargs: dict[str, Any] = {"every_n_layers": every, "prefer_native": technique == CKPT_NATIVE}
    if technique == CKPT_SELECTIVE:
        kwargs["mode"] = "selective"
    plan = enable_gradient_checkpointing(model, **kwargs)
    lists = BLOCK_LISTS[family]
    assert dict(zip(plan.block_lists, plan.blocks_per_list, strict=True)) == lists  # every stack
    expected: list[int] = []  # every n-th block of each stack, counted over the stacks in model order
    start = 0
    for n in lists.values():
        expected += [start + i for i in range(0, n, every)]
        start += n
    assert list(plan.checkpointed) == expected
    assert not any(getattr(c, "use_cache", False) for c in _configs(model))
    if technique == CKPT_NATIVE:
        assert plan.mechanism == "huggingface"
        got = grads(model, batch)
    else:  # the wrapper: count the recomputations
        assert plan.mechanism == "wrap"
        block_cls = type(model.get_submodule(f"{next(iter(lists))}.0"))
        with CountForwards(block_cls) as calls:
            got = grads(model, batch)
        assert calls.n == sum(lists.values()) + len(expected)
    assert_grads_equal(got, reference)


def _configs(model: Any) -> list[Any]:
    return [m.config for m in model.modules() if hasattr(m, "config")]


def _sharing_cell(family: str) -> None:
    original = build(family)
    model = copy.deepcopy(original)
    result = share_layers(model, num_unique_layers=1, strategy="all")
    assert dict(zip(result.block_lists, (len(m) for m in result.mappings), strict=True)) == BLOCK_LISTS[family]
    assert all(set(m) == {0} for m in result.mappings)
    batch = batch_of(family)
    reference = weight_copy_reference(original, model, result)
    assert_sharing_exact(model, reference, result, lambda m: loss_of(m, batch))


def run_cell(family: str, technique: str) -> str:
    """Run one cell: ``"exact"`` after checking it against its reference, or ``"refused: ..."`` at setup."""
    try:
        if technique in (FREEZE_TIED, FREEZE_UNTIED):
            _freeze_cell(family, untie=technique == FREEZE_UNTIED)
        elif technique == SHARE_ALL:
            _sharing_cell(family)
        else:
            _checkpointing_cell(family, technique)
    except ValueError as err:  # raised by the technique at setup (a failed comparison is an AssertionError)
        message = str(err)
        pattern = _REFUSAL_PATTERNS.get((family, technique))
        assert pattern is not None, f"unexpected refusal of {family} x {technique}: {message}"
        assert type(build(family)).__name__ in message, message  # names the model
        assert re.search(pattern, message, flags=re.DOTALL), message
        return EXPECTED[(family, technique)]
    return "exact"


def test_the_matrix_is_complete():
    assert set(EXPECTED) == {(f, t) for f in FAMILIES for t in TECHNIQUES}
    assert set(BLOCK_LISTS) == set(INPUT_EMBEDDINGS) == set(FAMILIES)
    assert all(v == "exact" or v.startswith("refused: ") for v in EXPECTED.values())


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell(family, technique):
    if technique == CKPT_SELECTIVE and not selective_checkpointing_available():
        pytest.skip("this torch has no selective activation checkpointing")
    assert run_cell(family, technique) == EXPECTED[(family, technique)]


# --- the same techniques through the Lightning callbacks with a real Trainer ---


def _loader(family: str, steps: int = 2) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(as_dataset([batch_of(family, seed=s) for s in range(steps)]), batch_size=None)


def _fit(module: ModelModule, family: str, callbacks: list) -> ModelModule:
    cpu_trainer(max_epochs=1, callbacks=callbacks).fit(module, train_dataloaders=_loader(family))
    return module


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_callback_freeze_embeddings_on_t5():
    reference = ModelModule(build("t5"), lr=0.1)
    for name in INPUT_EMBEDDINGS["t5"]:  # by hand; the tied head is frozen with them (untie=False)
        reference.model.get_parameter(name).requires_grad_(False)
    before = reference.model.get_parameter("shared.weight").detach().clone()
    _fit(reference, "t5", [])
    module = ModelModule(build("t5"), lr=0.1)
    with pytest.warns(UserWarning, match="is shared with"):
        _fit(module, "t5", [FreezeEmbeddings()])
    assert frozen_names(module.model) == set(INPUT_EMBEDDINGS["t5"]) | {"lm_head.weight"}
    torch.testing.assert_close(module.model.get_parameter("shared.weight"), before, rtol=0, atol=0)
    _assert_same_parameters(module, reference)


def test_callback_wrapper_checkpointing_on_t5():
    reference = _fit(ModelModule(build("t5"), lr=0.1), "t5", [])
    mode: Mode = "selective" if selective_checkpointing_available() else "full"
    callback = GradientCheckpointing(prefer_native=False, every_n_layers=2, mode=mode)
    module = _fit(ModelModule(build("t5"), lr=0.1), "t5", [callback])
    assert callback.plan is not None and callback.plan.block_lists == ("encoder.block", "decoder.block")
    _assert_same_parameters(module, reference)


def test_callback_parameter_sharing_on_llama_and_its_refusal_on_modernbert():
    reference = ModelModule(build("llama"), lr=0.1)
    share_layers(reference, num_unique_layers=1, strategy="all")
    _fit(reference, "llama", [])
    module = _fit(ModelModule(build("llama"), lr=0.1), "llama", [ParameterSharing(1, strategy="all")])
    assert module.model.get_submodule("model.layers.0") is module.model.get_submodule("model.layers.1")
    _assert_same_parameters(module, reference)
    with pytest.raises(
        ValueError, match=r"ModelModule \(ModernBertForSequenceClassification\): position 1 of model.model.layers"
    ):
        _fit(ModelModule(build("modernbert"), lr=0.1), "modernbert", [ParameterSharing(1, strategy="all")])

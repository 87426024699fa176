"""Chunked LM loss against the unchunked reference: loss and gradients, saved tensors, memory, Hugging Face models."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_txopt.data import PackingCollator
from lightning_txopt.losses import (
    CHUNKED_LOSS_MODELS,
    DEFAULT_CHUNK_SIZE,
    check_chunked_loss_support,
    chunked_causal_lm_loss,
    chunked_linear_cross_entropy,
    lm_head_of,
    shift_labels,
)
from lightning_txopt.models.packing import packed_model_inputs
from tests.zoo import FAMILIES, VOCAB

N, H, V = 50, 12, 70
RECOMPUTE = [None, True, False]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make(n=N, hidden=H, vocab=V, bias=True, ignore_every=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=gen)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, b, y


def grads_of(loss, upstream, *tensors):
    for t in tensors:
        if t is not None:
            t.grad = None
    (loss * upstream).sum().backward()
    return [t.grad.clone() if t is not None else None for t in tensors]


def reference(h, w, b, y, reduction):
    return F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100, reduction=reduction)


# ------------------------------------------------------------------------------------------------ exact in fp32
@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [7, 10, N, 64])  # does not divide N, divides N, = N, > N (one chunk)
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_equal_the_unchunked_reference(recompute, reduction, chunk_size, bias):
    h, w, b, y = make(bias=bias)
    upstream = torch.tensor(0.7)  # not 1: the upstream gradient must reach all three gradients
    ref = reference(h, w, b, y, reduction)
    ref_grads = grads_of(ref, upstream, h, w, b)
    ours = chunked_linear_cross_entropy(
        h, w, y, bias=b, chunk_size=chunk_size, reduction=reduction, recompute=recompute
    )
    our_grads = grads_of(ours, upstream, h, w, b)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert rel(ours, ref) <= 1e-5
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.dtype == theirs.dtype and rel(mine, theirs) <= 1e-5


@pytest.mark.parametrize("recompute", [None, True])
def test_reduction_none_gives_each_rows_loss_and_its_gradient(recompute):
    h, w, b, y = make()
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(1))  # a different gradient for every row
    ref = reference(h, w, b, y, "none")
    ref_grads = grads_of(ref, upstream, h, w, b)
    ours = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=9, reduction="none", recompute=recompute)
    assert ours.shape == (N,) and bool((ours[y == -100] == 0).all())
    assert rel(ours, ref) <= 1e-5
    for mine, theirs in zip(grads_of(ours, upstream, h, w, b), ref_grads, strict=True):
        assert rel(mine, theirs) <= 1e-5


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_leading_dimensions_are_flattened(recompute):
    h, w, b, y = make(n=48)
    h3 = h.detach().view(4, 12, H).requires_grad_()
    ours = chunked_linear_cross_entropy(h3, w, y.view(4, 12), bias=b, chunk_size=5, recompute=recompute)
    (g_ours,) = grads_of(ours, 1.0, h3)
    ref = reference(h, w, b, y, "mean")
    (g_ref,) = grads_of(ref, 1.0, h)
    assert rel(ours, ref) <= 1e-5 and g_ours.shape == (4, 12, H) and rel(g_ours.view(48, H), g_ref) <= 1e-5
    none = chunked_linear_cross_entropy(h3, w, y.view(4, 12), bias=b, chunk_size=5, reduction="none")
    assert none.shape == (4, 12)


@pytest.mark.parametrize("recompute", RECOMPUTE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_labels_ignored_is_a_zero_loss_with_zero_gradients(recompute, reduction):
    h, w, b, y = make()
    y[:] = -100
    loss = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=16, reduction=reduction, recompute=recompute)
    grads = grads_of(loss, 1.0, h, w, b)
    assert float(loss.detach()) == 0.0
    assert all(bool((g == 0).all()) for g in grads)
    assert torch.isnan(reference(h, w, b, y, "mean"))  # what F.cross_entropy gives instead for "mean"


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_no_rows_at_all(recompute):
    h, w, b, y = make(n=0)
    loss = chunked_linear_cross_entropy(h, w, y, bias=b, recompute=recompute)
    gh, gw, gb = grads_of(loss, 1.0, h, w, b)
    assert float(loss.detach()) == 0.0 and gh.shape == (0, H) and bool((gw == 0).all()) and bool((gb == 0).all())


def test_a_custom_ignore_index():
    h, w, b, y = make(ignore_every=0)
    y[::3] = 5  # class 5 ignored
    ours = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, ignore_index=5)
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=5)
    assert rel(ours, ref) <= 1e-5


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_gradients_reach_only_the_inputs_that_require_them(recompute):
    h, w, b, y = make()
    w.requires_grad_(False)
    loss = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, recompute=recompute)
    gh, gb = grads_of(loss, 1.0, h, b)
    ref = reference(h, w, b, y, "mean")
    rh, rb = grads_of(ref, 1.0, h, b)
    assert w.grad is None and rel(gh, rh) <= 1e-5 and rel(gb, rb) <= 1e-5


def test_no_grad_computes_the_loss_only():
    h, w, b, y = make()
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=8)
    assert not loss.requires_grad and rel(loss, reference(h, w, b, y, "mean")) <= 1e-5


def test_backward_twice_with_retained_graph():
    h, w, b, y = make()
    loss = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=8, recompute=False)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    assert rel(h.grad, 2 * first) <= 1e-6


# ------------------------------------------------------------------------------------------------ low precision
def _truth(h, w, b, y, dtype):
    """fp64 loss and gradients of what autocast computes: the logits of ``dtype``-rounded inputs."""
    hd, wd = (t.detach().to(dtype).double().requires_grad_() for t in (h, w))
    bd = b.detach().to(dtype).double().requires_grad_() if b is not None else None
    loss = F.cross_entropy(F.linear(hd, wd, bd), y, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), [t.grad for t in (hd, wd, bd) if t is not None]


@pytest.mark.parametrize("recompute", [None, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_is_as_accurate_as_the_reference(recompute, dtype):
    """Low precision cannot match to 1e-5; each of ours is at most about as far from the fp64 truth as the reference."""
    h, w, b, y = make(n=300, hidden=32, vocab=500)
    upstream = torch.tensor(1024.0 if dtype == torch.float16 else 1.0)  # fp16: a loss scale, as GradScaler's
    truth, truth_grads = _truth(h, w, b, y, dtype)
    with torch.autocast("cpu", dtype=dtype):
        ref = reference(h, w, b, y, "sum")
        ours = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=64, reduction="sum", recompute=recompute)
    ref_grads = [g / upstream for g in grads_of(ref, upstream, h, w, b)]
    our_grads = [g / upstream for g in grads_of(ours, upstream, h, w, b)]
    assert rel(ours, truth) <= 2 * rel(ref, truth) + 1e-6
    for mine, theirs, true in zip(our_grads, ref_grads, truth_grads, strict=True):
        assert mine.dtype == torch.float32  # the parameters' dtype, as autocast gives
        assert rel(mine, true) <= 2 * rel(theirs, true) + 1e-6


def test_logits_are_computed_in_the_autocast_dtype():
    """Under bf16 autocast the loss is the reference's (bf16 logits), not the fp32 one."""
    h, w, b, y = make(n=200, hidden=64, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=32)
        ref = reference(h, w, b, y, "mean")
    fp32 = reference(h, w, b, y, "mean")
    assert rel(ours, ref) <= 1e-6 < rel(fp32, ref)


def test_pure_bf16_inputs_without_autocast():
    h, w, b, y = make()
    hb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    ours = chunked_linear_cross_entropy(hb, wb, y, bias=bb, chunk_size=8)
    gh, gw, gb = grads_of(ours, 1.0, hb, wb, bb)
    ref = reference(hb, wb, bb, y, "mean")
    rh, rw, rb = grads_of(ref, 1.0, hb, wb, bb)
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    assert rel(ours, ref) <= 1e-5 and rel(gh, rh) <= 1e-2 and rel(gw, rw) <= 1e-2 and rel(gb, rb) <= 1e-2


# ------------------------------------------------------------------------------------------------ memory
def _record(shapes: list[tuple[int, ...]], t: torch.Tensor) -> torch.Tensor:
    shapes.append(tuple(t.shape))
    return t


@pytest.mark.parametrize("recompute", [True, False])
def test_nothing_of_size_n_by_v_is_saved_for_backward(recompute):
    n, vocab, chunk = 300, 1000, 64
    h, w, b, y = make(n=n, hidden=24, vocab=vocab)
    shapes: list[tuple[int, ...]] = []
    pack = functools.partial(_record, shapes)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(h, w, b, y, "mean")
    assert (n, vocab) in shapes  # the hooks do see the reference's saved logits

    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, recompute=recompute).backward()
    largest = max((torch.Size(s).numel() for s in shapes), default=0)
    assert largest <= vocab * 24  # the weight itself; nothing with V columns and more than one row
    assert not [s for s in shapes if len(s) == 2 and s[1] == vocab]


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("recompute", [True, False])
def test_no_operation_makes_a_tensor_larger_than_a_chunk_of_logits(recompute):
    n, hidden, vocab, chunk = 600, 16, 1000, 64
    h, w, b, y = make(n=n, hidden=hidden, vocab=vocab)
    with _LargestTensor() as ref_mode:
        reference(h, w, b, y, "mean").backward()
    with _LargestTensor() as mode:
        chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, recompute=recompute).backward()
    assert ref_mode.largest == n * vocab
    assert mode.largest == chunk * vocab  # the chunk of logits (V x H = 16,000 is smaller)


def cpu_peak_bytes(fn) -> int:
    """Peak CPU allocation while ``fn`` runs, above what was allocated before, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert events, "the profiler recorded no memory events: this torch reports CPU memory differently"
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def _chunked_step(h, w, b, y, chunk, recompute):
    chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, recompute=recompute).backward()


def _reference_step(h, w, b, y):
    reference(h, w, b, y, "mean").backward()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("recompute", [True, False])
def test_peak_cpu_memory_grows_with_the_chunk_not_with_n(recompute, autocast):
    """Measured by the CPU allocator: the peak is a few chunks of logits plus the gradients, not N x V.

    (fp32 needs one fp32 chunk; bf16 autocast 2.3 chunks on CPU: the fp32 chunk, its bf16 copy and a contiguous copy
    of it that CPU matmuls make for the transposed product. The reference needs three fp32 (N, V) tensors.)
    """
    hidden, vocab, chunk = 16, 2000, 128
    peaks = {}
    for n in (1024, 4096):
        h, w, b, y = make(n=n, hidden=hidden, vocab=vocab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            peaks[n] = cpu_peak_bytes(functools.partial(_chunked_step, h, w, b, y, chunk, recompute))
            ref_peak = cpu_peak_bytes(functools.partial(_reference_step, h, w, b, y))
        assert ref_peak >= 3 * n * vocab * 4
        gradients = (n * hidden + vocab * hidden + vocab) * 4 * 2  # the inputs' gradients, fp32 accumulators
        chunks = 2.5 if autocast else 1.2
        assert peaks[n] <= chunks * chunk * vocab * 4 + gradients + 64 * n  # + per-row vectors (labels, masks, lse)
    assert peaks[4096] - peaks[1024] <= (4096 - 1024) * (hidden * 4 * 2 + 64)  # only (N, H) and (N,) grow


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("recompute", [True, False])
def test_compiled_caller_gets_eager_results_and_saves_no_logits(recompute):
    torch._dynamo.reset()
    h, w, b, y = make(n=300, hidden=24, vocab=1000)

    def step(h, w, b, y):
        return chunked_linear_cross_entropy(torch.tanh(h), w, y, bias=b, chunk_size=64, recompute=recompute) * 2

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_record, shapes), lambda t: t):
            loss = fn(h, w, b, y)
        results.append([loss.detach(), *grads_of(loss, 1.0, h, w, b)])
        assert not [s for s in shapes if len(s) == 2 and s[1] == 1000], shapes
    for eager, compiled in zip(*results, strict=True):
        assert rel(compiled, eager) <= 1e-6


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_are_refused():
    h, w, b, y = make()
    with pytest.raises(ValueError, match=r"`chunk_size` must be an int >= 1.*got 0"):
        chunked_linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"`chunk_size` must be an int >= 1.*got True"):
        chunked_linear_cross_entropy(h, w, y, chunk_size=True)
    with pytest.raises(ValueError, match=r"`reduction` must be one of .*got 'avg'"):
        chunked_linear_cross_entropy(h, w, y, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`hidden` must be \(..., H\) and `weight` \(V, H\).*\(50, 12\) and \(12, 70\)"
    ):
        chunked_linear_cross_entropy(h, w.t(), y)
    with pytest.raises(ValueError, match=r"`labels` must have the shape of `hidden` without its last.*\(49,\)"):
        chunked_linear_cross_entropy(h, w, y[:-1])
    with pytest.raises(ValueError, match=r"`bias` must be \(70,\).*got \(69,\)"):
        chunked_linear_cross_entropy(h, w, y, bias=b[:-1])
    with pytest.raises(TypeError, match=r"`labels` must be integer class indices, got dtype torch\.float32"):
        chunked_linear_cross_entropy(h, w, y.float())
    with pytest.raises(
        TypeError, match=r"\(torch.float32\), `weight` \(torch.bfloat16\).*must share a dtype outside autocast"
    ):
        chunked_linear_cross_entropy(h, w.bfloat16(), y)


def test_recompute_false_is_refused_where_it_would_differ():
    h, w, _, y = make()
    with pytest.raises(ValueError, match=r"`recompute=False`.*one per row.*reduction='none'"):
        chunked_linear_cross_entropy(h, w, y, reduction="none", recompute=False)
    with (
        pytest.raises(ValueError, match=r"`recompute=False`.*fp16 loss scaling.*torch.float16"),
        torch.autocast("cpu", dtype=torch.float16),
    ):
        chunked_linear_cross_entropy(h, w, y, recompute=False)


# ------------------------------------------------------------------------------------------------ Hugging Face
_SMALL = {"vocab_size": VOCAB, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
_DECODER = {**_SMALL, "num_hidden_layers": 2, "max_position_embeddings": 64, "pad_token_id": 0}
EXTRA = {  # verified families beyond the zoo's causal LMs
    "qwen3": {"model_type": "qwen3", **_DECODER, "num_key_value_heads": 1, "head_dim": 8},
    "phi": {"model_type": "phi", **_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0},
    "phi3": {
        "model_type": "phi3",
        **_DECODER,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gemma": {"model_type": "gemma", **_DECODER, "num_key_value_heads": 1, "head_dim": 8},
}


def build(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    zoo = {f.config["model_type"]: f for f in FAMILIES.values() if f.causal_lm}
    if model_type in zoo and not overrides:
        return zoo[model_type].build("causal-lm")
    cfg = dict(zoo[model_type].config if model_type in zoo else EXTRA[model_type])
    cfg.update(overrides)
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def test_every_verified_family_is_tested():
    zoo = {f.config["model_type"] for f in FAMILIES.values() if f.causal_lm}
    assert set(CHUNKED_LOSS_MODELS) == zoo | set(EXTRA)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 20), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 14:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_type", sorted(CHUNKED_LOSS_MODELS))
def test_hf_model_loss_and_all_gradients_equal_the_models_own(model_type, reduction):
    model = build(model_type)
    check_chunked_loss_support(model)
    ids, labels = _batch()
    model.zero_grad()
    if reduction == "mean":  # the model's own shifted-label loss
        ref = model(input_ids=ids, labels=labels).loss
    else:  # TransformerModule's reference: full logits, shifted
        logits = model(input_ids=ids).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ours = chunked_causal_lm_loss(model, {"input_ids": ids}, labels, chunk_size=7, reduction=reduction)
    ours.backward()
    assert rel(ours, ref) <= 1e-5
    for name, p in model.named_parameters():
        assert rel(p.grad, ref_grads[name]) <= 1e-5, name


def test_tied_gpt2_head_is_the_input_embedding_and_gets_both_gradients():
    model = FAMILIES["gpt2"].build("causal-lm")
    head = lm_head_of(model)
    assert head.weight is model.get_input_embeddings().weight
    ids, labels = _batch(1)
    model.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    ref = head.weight.grad.clone()
    model.zero_grad()
    chunked_causal_lm_loss(model, {"input_ids": ids}, labels, chunk_size=16).backward()
    assert rel(head.weight.grad, ref) <= 1e-5
    # the head's share alone (hidden states detached) is not the whole gradient: the embedding's share was added
    model.zero_grad()
    hidden = model.base_model(input_ids=ids).last_hidden_state.detach()
    chunked_linear_cross_entropy(hidden, head.weight, shift_labels(labels), chunk_size=16).backward()
    assert rel(head.weight.grad, ref) > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_packed_rows_equal_the_unchunked_packed_loss(model_type):
    model = build(model_type)
    gen = torch.Generator().manual_seed(2)
    samples = [
        {"input_ids": (ids := torch.randint(3, VOCAB, (n,), generator=gen)), "labels": ids} for n in (9, 5, 12, 7)
    ]
    batch = PackingCollator(20, causal=True)(samples)
    inputs = packed_model_inputs(model, batch)  # the exact block mask for the model's attention
    labels = batch["labels"]
    assert bool((labels[0, [0, 9]] == -100).all())  # each sample's first token predicts nothing
    model.zero_grad()
    logits = model(**inputs).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ours = chunked_causal_lm_loss(model, inputs, labels, chunk_size=6, reduction="sum")
    ours.backward()
    assert rel(ours, ref) <= 1e-5
    assert all(rel(p.grad, ref_grads[k]) <= 1e-5 for k, p in model.named_parameters())


def test_shift_labels_matches_the_slicing_reference():
    labels = torch.tensor([[1, 2, 3, -100], [-100, 4, 5, 6]])
    shifted = shift_labels(labels)
    assert shifted[:, :-1].tolist() == labels[:, 1:].tolist() and bool((shifted[:, -1] == -100).all())


@pytest.mark.parametrize(
    ("model_type", "overrides", "match"),
    [
        ("gemma2", {"num_key_value_heads": 1, "head_dim": 8}, r"Gemma2ForCausalLM.*soft-caps the logits.*=30\.0"),
        ("cohere", {"num_key_value_heads": 1}, r"CohereForCausalLM.*multiplies the logits by a scale.*0\.0625"),
        ("granite", {"num_key_value_heads": 1, "logits_scaling": 8.0}, r"GraniteForCausalLM.*scales the logits"),
        ("opt", {"ffn_dim": 32, "word_embed_proj_dim": 16}, r"verified for these causal LMs only.*'opt'"),
    ],
)
def test_models_whose_logits_are_not_a_plain_head_are_refused(model_type, overrides, match):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_DECODER, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        lm_head_of(model)
    with pytest.raises(ValueError, match="compute the loss unchunked instead"):
        chunked_causal_lm_loss(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, torch.ones(1, 4).long())


def test_granite_without_scaling_is_still_refused_as_unverified():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **_DECODER, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"verified for these causal LMs only.*GraniteForCausalLM"):
        lm_head_of(model)


def test_subclasses_and_changed_heads_are_refused():
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = build("llama")
    subclass = MyLlama(model.config)
    with pytest.raises(ValueError, match=r"verified for these causal LMs only.*MyLlama"):
        lm_head_of(subclass)

    class ScaledLinear(nn.Linear):
        pass

    model.lm_head = ScaledLinear(16, VOCAB, bias=False)
    with pytest.raises(ValueError, match=r"output layer of type ScaledLinear, not a plain nn.Linear"):
        lm_head_of(model)

    class Shard(torch.Tensor):
        pass

    model.lm_head = nn.Linear(16, VOCAB, bias=False)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().as_subclass(Shard))
    with pytest.raises(ValueError, match=r"holds Shard parameters .*not plain tensors"):
        lm_head_of(model)


def test_support_check_catches_a_hook_on_the_head_and_restores_training_flags():
    model = build("llama")
    model.model.layers[0].eval()  # e.g. a frozen block: must stay in eval mode
    check_chunked_loss_support(model)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    model.lm_head.register_forward_hook(lambda module, args, out: out * 0.5)
    with pytest.raises(ValueError, match=r"logits are not lm_head\(base_model.*max difference.*unchunked instead"):
        check_chunked_loss_support(model)
    assert model.training and not model.model.layers[0].training


def test_default_chunk_size():
    assert DEFAULT_CHUNK_SIZE == 4096


# ------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("recompute", [None, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_is_as_accurate_as_the_reference(recompute, dtype):
    h, w, b, y = (t.detach().cuda().requires_grad_(t.requires_grad) for t in make(n=2000, hidden=64, vocab=3000))
    y = y.detach()
    upstream = torch.tensor(1024.0 if dtype == torch.float16 else 1.0, device="cuda")
    truth, truth_grads = _truth(h, w, b, y, dtype)
    with torch.autocast("cuda", dtype=dtype):
        ref = reference(h, w, b, y, "sum")
        ours = chunked_linear_cross_entropy(h, w, y, bias=b, chunk_size=256, reduction="sum", recompute=recompute)
    ref_grads = [g / upstream for g in grads_of(ref, upstream, h, w, b)]
    our_grads = [g / upstream for g in grads_of(ours, upstream, h, w, b)]
    assert rel(ours, truth) <= 2 * rel(ref, truth) + 1e-6
    for mine, theirs, true in zip(our_grads, ref_grads, truth_grads, strict=True):
        assert rel(mine, true) <= 2 * rel(theirs, true) + 1e-6


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("recompute", [True, False])
def test_cuda_peak_memory_is_a_few_chunks(recompute):
    n, hidden, vocab, chunk = 8192, 256, 32000, 512
    h = torch.randn(n, hidden, device="cuda", requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", requires_grad=True)
    y = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(h, w, y, chunk_size=chunk, recompute=recompute)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - before
    gradients = (n * hidden + 2 * vocab * hidden) * 4  # d hidden, d weight and its accumulator
    assert peak <= 2 * chunk * vocab * 8 + gradients + 64 * n
    assert peak < n * vocab * 4  # less than one fp32 copy of the logits


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_quick_runs_and_reports_every_row(tmp_path):
    """CI smoke run of benchmarks/chunked_loss.py --quick (CPU): it must run to the end; the figures are not checked."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cl.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "chunked_loss.py", "--quick", "--repeats", "1", "--warmup", "0", "--json", str(out)],
        cwd=root / "benchmarks",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows][:3] == [
        "unchunked, as TransformerModule today",
        "unchunked, flat",
        "chunked, chunk 256",
    ]
    assert len(rows) == 6 and all(r["peak_bytes"] > 0 and r["ms"] > 0 and r["loss_rel_diff"] < 1e-5 for r in rows)
    assert rows[2]["peak_bytes"] < rows[0]["peak_bytes"] / 3

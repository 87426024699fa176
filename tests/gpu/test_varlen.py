"""The varlen attention backend on a CUDA GPU: FlashAttention's variable-length kernel against the exact fallback, and
packed batches through TransformerModule against each sample alone, per family (skipped without a GPU).

Results of the last GPU run are recorded in docs/results/gpu_tests.md.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_txopt.data.packing import PackingCollator
from lightning_txopt.models.attention import (
    _kernel,
    segment_mask,
    varlen_attention_forward,
    varlen_kernel_available,
)
from lightning_txopt.module import TransformerModule
from tests.helpers import tensor_sum
from tests.zoo import FAMILIES, VOCAB, WINDOW

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and varlen_kernel_available("cuda", torch.bfloat16)),
        reason="needs a CUDA device with the varlen kernel",
    ),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (7, 0), (7, 7)])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_kernel_equals_exact_fallback_with_empty_segments(window, kv_heads):
    torch.manual_seed(0)
    rows, width, heads, dim = 2, 64, 4, 64
    # segments: samples, a padding run, an empty one (a full row), more samples; empty filler segments at the end
    lens = [20, 30, 14, 0, 40, 24, 0, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(rows * width, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(rows * width, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(rows * width, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = _kernel(q, k, v, cu, cu, max(lens), max(lens), scale=None, window=window)
    g = torch.randn_like(out)
    out.backward(g)
    grads = []
    for t in (q, k, v):
        assert t.grad is not None
        grads.append(t.grad.clone())
        t.grad = None
    # the exact fallback, in fp32
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    qb = q32.view(rows, width, heads, dim).transpose(1, 2)
    rep = heads // kv_heads
    kb = k32.view(rows, width, kv_heads, dim).transpose(1, 2).repeat_interleave(rep, 1)
    vb = v32.view(rows, width, kv_heads, dim).transpose(1, 2).repeat_interleave(rep, 1)
    mask = segment_mask(cu, rows, width, causal=window[1] == 0, window=window)
    ref = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask).transpose(1, 2).reshape(rows * width, heads, dim)
    ref.backward(g.float())
    assert _rel(out, ref) < 2e-2
    for got, t in zip(grads, (q32, k32, v32), strict=True):
        assert t.grad is not None and _rel(got, t.grad) < 3e-2


def _samples(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in (3 * WINDOW, 5, 2 * WINDOW + 1, 2, WINDOW + 3)]


@pytest.mark.parametrize(
    ("family", "task"),
    [
        ("bert", "sequence-classification"),
        ("roberta", "sequence-classification"),
        ("modernbert", "sequence-classification"),
        ("gpt2", "causal-lm"),
        ("llama", "causal-lm"),
        ("qwen2", "causal-lm"),
        ("mistral", "causal-lm"),
        ("gpt_neox", "sequence-classification"),
    ],
)
def test_packed_varlen_equals_each_sample_alone_in_bf16(family, task):
    torch.manual_seed(0)
    config = FAMILIES[family].config_dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    if family == "gpt2":
        config = FAMILIES[family].config_dict(n_embd=128, n_head=2)
    if family == "distilbert":
        config = FAMILIES[family].config_dict(dim=128, n_heads=2)
    module = TransformerModule(config=config, task=task, num_labels=3).cuda()
    reference = copy.deepcopy(module.model)
    seqs = _samples()
    samples = [{"input_ids": s, "labels": s if task == "causal-lm" else i % 3} for i, s in enumerate(seqs)]
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in PackingCollator(64)(samples).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, logits = module.loss_and_items(batch, "sum")
        if logits is None:  # causal LMs: the chunked loss forms no full logits
            with torch.no_grad():
                logits = module.forward_logits(batch)
        per_sample = [reference(input_ids=s[None].cuda()).logits[0] for s in seqs]
    if task == "causal-lm":
        for i, s in enumerate(seqs):
            r, c = batch["cls_index"][i].tolist()
            assert _rel(logits[r, c : c + len(s)], per_sample[i]) < 3e-2, i
        ref = tensor_sum(
            F.cross_entropy(lg[:-1].float(), s[1:].cuda(), reduction="sum")
            for lg, s in zip(per_sample, seqs, strict=True)
        )
    else:
        alone = torch.stack(per_sample)
        assert _rel(logits, alone) < 3e-2
        ref = F.cross_entropy(alone.float(), batch["labels"], reduction="sum")
    assert abs(float(loss) - float(ref)) <= 2e-2 * abs(float(ref))
    loss.backward()
    ref.backward()
    pairs = [(p.grad, q.grad) for p, q in zip(module.model.parameters(), reference.parameters(), strict=True)]
    got = torch.cat([a.float().flatten() for a, b in pairs if b is not None])
    want = torch.cat([b.float().flatten() for a, b in pairs if b is not None])
    assert float((got - want).norm() / want.norm()) < 5e-2  # bf16: the whole gradient, relative to its norm


def test_varlen_forward_delegates_padded_batches_to_sdpa():
    module = FAMILIES["bert"].build().cuda().bfloat16()
    attn = module.bert.encoder.layer[0].attention.self
    q = k = v = torch.randn(2, 2, 10, 8, device="cuda", dtype=torch.bfloat16)
    out, _ = varlen_attention_forward(attn, q, k, v, None)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (7, 0), (7, 7)])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_direct_flash_op_equals_torch_public_varlen_attn(window, kv_heads):
    from torch.nn.attention.varlen import varlen_attn

    from lightning_txopt.models.attention import _flash_varlen

    torch.manual_seed(1)
    lens = [20, 30, 14, 0, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lens)
    q = torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, kv_heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, kv_heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    got = _flash_varlen(q, k, v, cu, cu, 40, 40, scale=None, window=window)
    kk, vv = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    want = varlen_attn(q, kk, vv, cu, cu, 40, 40, window_size=window)
    assert isinstance(want, torch.Tensor)  # no auxiliary outputs asked for
    assert torch.equal(got, want) or _rel(got, want) < 1e-2
    g = torch.randn_like(got)
    (dq, dk, dv) = torch.autograd.grad(got, (q, k, v), g)
    (rq, rk, rv) = torch.autograd.grad(want, (q, k, v), g)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert _rel(a, b) < 2e-2


@pytest.mark.parametrize(
    ("family", "task", "compile"),
    [
        ("bert", "sequence-classification", False),
        ("bert", "sequence-classification", True),
        ("llama", "causal-lm", False),
        ("mistral", "causal-lm", False),
    ],
)
def test_trainer_fit_on_packed_batches_runs_the_kernel_under_bf16_mixed(family, task, compile, monkeypatch):
    """Through the public API as a user runs it: the fit-start packing check passes on the GPU, every training step
    calls the varlen kernel (never the block-mask fallback), and compiled static shapes make graphs once."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lightning_txopt import BucketDataModule
    from lightning_txopt.models import attention
    from tests.helpers import cpu_trainer, make_samples

    calls = {"kernel": 0, "fallback": 0}
    kernel, fallback = attention._kernel, attention.segment_mask

    def counted_kernel(*args, **kwargs):
        calls["kernel"] += 1
        return kernel(*args, **kwargs)

    def counted_fallback(*args, **kwargs):
        calls["fallback"] += 1
        return fallback(*args, **kwargs)

    torch._dynamo.reset()
    counters.clear()
    if not compile:  # compiled code would guard on the counters' values and recompile each step
        monkeypatch.setattr(attention, "_kernel", counted_kernel)
        monkeypatch.setattr(attention, "segment_mask", counted_fallback)
    samples = make_samples(160, seed=5, max_len=3 * WINDOW)
    if task == "causal-lm":
        samples = [{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in samples]
    config = FAMILIES[family].config_dict(hidden_size=64, num_attention_heads=2, intermediate_size=128)
    dm = BucketDataModule(
        samples, pad_token_id=0, strategy="packed", max_tokens=256, max_length=64, static_shapes=compile
    )
    module = TransformerModule(config=config, task=task, num_labels=3, compile=compile)
    graphs, snapshots = [], []

    class Graphs(pl.Callback):
        def on_train_batch_end(self, *_args) -> None:
            graphs.append(int(counters["stats"]["unique_graphs"]))
            snapshots.append(dict(calls))  # after the first step: its fp32 packing probe ran the exact fallback

    trainer = cpu_trainer(
        accelerator="cuda", precision="bf16-mixed", max_steps=6, callbacks=[Graphs()], limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    assert module.model.config._attn_implementation == "txopt_varlen"
    assert trainer.global_step == 6 and torch.isfinite(trainer.callback_metrics["train_loss"])
    if not compile:  # steps 2-6: every layer on the kernel (rotary models too), never the fallback
        layers = config.get("num_hidden_layers", 2)
        assert snapshots[-1]["kernel"] - snapshots[0]["kernel"] == 5 * layers, snapshots
        assert snapshots[-1]["fallback"] == snapshots[0]["fallback"], snapshots
    else:
        assert graphs[0] >= 1 and len(set(graphs)) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_memory_efficient_kernel_equals_flash_and_runs_eager_and_compiled_calls(causal):
    """Packed calls without a window take the memory-efficient kernel (64-query tiles), eager and inside compiled
    graphs (Inductor, forward and backward): the same attention as FlashAttention's, empty segments included."""
    from lightning_txopt.models.attention import _efficient_varlen, _flash_varlen, efficient_forward_schema_matches

    assert efficient_forward_schema_matches()
    torch.manual_seed(2)
    lens = [20, 30, 14, 0, 40, 3, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lens)
    q, k, v = (torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    window = (-1, 0) if causal else (-1, -1)
    fast = _efficient_varlen(q, k, v, cu, cu, 40, 40, scale=None, causal=causal)
    flash = _flash_varlen(q, k, v, cu, cu, 40, 40, scale=None, window=window)
    assert _rel(fast, flash) < 2e-2
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(flash, (q, k, v), g), strict=True):
        assert _rel(a, b) < 3e-2
    with torch.no_grad():
        assert torch.equal(_kernel(q, k, v, cu, cu, 40, 40, scale=None, window=window), fast)
        traced = torch.compile(
            lambda a, b, c: _kernel(a, b, c, cu, cu, 40, 40, scale=None, window=window),
            backend="aot_eager",
            fullgraph=True,
        )
        assert torch.equal(traced(q, k, v), fast)
    # Inductor, forward and backward; an explicit default scale and another one (FlashAttention's in graphs)
    for scale in (None, 64**-0.5, 0.1):
        torch.compiler.reset()
        compiled = torch.compile(
            lambda a, b, c, s=scale: _kernel(a, b, c, cu, cu, 40, 40, scale=s, window=window) * 1.0, fullgraph=True
        )
        out = compiled(q, k, v)
        ref = _efficient_varlen(q, k, v, cu, cu, 40, 40, scale=scale, causal=causal)
        assert _rel(out, ref) < 2e-2, scale
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads, strict=True):
            assert _rel(a, b) < 3e-2, scale

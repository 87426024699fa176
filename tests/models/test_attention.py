from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_txopt.models.attention import (
    VARLEN_ATTENTION,
    attention_dropout,
    efficient_forward_schema_matches,
    flash_forward_schema_matches,
    register_varlen_attention,
    segment_ids,
    segment_mask,
    use_varlen_attention,
    varlen_attention_forward,
    varlen_kernel_available,
)
from tests.zoo import FAMILIES


class _Attn(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal


def _per_segment_reference(q, k, v, lens, *, causal, left=-1):
    """Attention of each segment on its own (plain SDPA), concatenated: the reference for packed rows."""
    outs, start = [], 0
    for n in lens:
        if n == 0:
            continue
        qs, ks, vs = (t[:, :, start : start + n] for t in (q, k, v))
        i = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= i[:, None] >= i[None, :]
        if left >= 0:
            allowed &= (i[:, None] - i[None, :]).abs() <= left
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_packed_fallback_equals_each_segment_alone(causal, window, kv_heads):
    torch.manual_seed(0)
    lens = [7, 0, 12, 3, 10]  # an empty segment (a full row's padding run) included
    total = sum(lens)
    q = torch.randn(1, 2, total, 8)
    k, v = torch.randn(1, kv_heads, total, 8), torch.randn(1, kv_heads, total, 8)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out, weights = varlen_attention_forward(
        _Attn(causal),
        q,
        k,
        v,
        None,
        sliding_window=window,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lens),
        max_length_k=max(lens),
    )
    kk, vv = (t.repeat_interleave(2 // kv_heads, dim=1) for t in (k, v))
    ref = _per_segment_reference(q, kk, vv, lens, causal=causal, left=window - 1 if window else -1)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_padded_batches_go_to_sdpa_and_the_window_applies_without_a_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8) for _ in range(3))
    out, _ = varlen_attention_forward(_Attn(True), q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2))
    windowed, _ = varlen_attention_forward(_Attn(True), q, k, v, None, sliding_window=4)
    i = torch.arange(20)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(1, 2)
    torch.testing.assert_close(windowed, ref)


def test_segment_helpers():
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert segment_ids(cu, 5).tolist() == [0, 0, 2, 2, 2]
    m = segment_mask(cu, 1, 5, causal=False, window=(1, 1))[0, 0].int()
    assert m.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_a_relative_position_bias_cannot_be_packed():
    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="position bias"):
        varlen_attention_forward(_Attn(False), q, q, q, None, cu_seq_lens_q=cu, position_bias=torch.zeros(1))


def test_registration_and_switching():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert register_varlen_attention() == VARLEN_ATTENTION
    assert VARLEN_ATTENTION in AttentionInterface() and VARLEN_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS
    model = FAMILIES["llama"].build("causal-lm")
    config = model.config
    assert use_varlen_attention(model) is model  # in place
    assert config._attn_implementation == VARLEN_ATTENTION
    with pytest.raises(ValueError, match="not a Hugging Face PreTrainedModel"):
        use_varlen_attention(torch.nn.Linear(2, 2))


def test_attention_dropout_is_reported_because_the_kernel_has_none():
    model = FAMILIES["bert"].build()
    model.config.attention_probs_dropout_prob = 0.1
    assert attention_dropout(model) == 0.1
    with pytest.warns(UserWarning, match="attention dropout 0.1"):
        use_varlen_attention(model)


def test_the_kernel_needs_cuda_half_precision_and_the_op_keeps_its_schema():
    assert not varlen_kernel_available("cpu", torch.bfloat16)
    assert not varlen_kernel_available("cpu", torch.float32)
    # the backend calls aten::_flash_attention_forward and aten::_efficient_attention_forward directly (see
    # _flash_varlen, _efficient_varlen): this fails when torch changes them
    assert flash_forward_schema_matches()
    assert efficient_forward_schema_matches()


def test_compiled_graphs_pass_the_memory_efficient_backward_a_scale_only_where_its_fake_implementation_takes_one():
    # torch 2.11-2.13's fake backward lacks the op's `out` argument: an explicit scale collides, a left-out one
    # traces with the right shapes. The backend relies on both facts (see _kernel); this fails when either changes.
    from lightning_txopt.models import attention

    t = torch.empty(1, 8, 2, 64, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    seed = torch.empty((), device="meta", dtype=torch.int64)
    lse = torch.empty(1, 2, 8, device="meta", dtype=torch.float32)
    args = (t, t, t, t, None, t, cu, cu, 4, 4, lse, 0.0, seed, seed, 0, False)
    grads = torch.ops.aten._efficient_attention_backward(*args)
    assert [tuple(g.shape) for g in grads[:3]] == [(1, 8, 2, 64)] * 3
    try:
        torch.ops.aten._efficient_attention_backward(*args, scale=0.1)
        takes_scale = True
    except TypeError as err:
        assert "scale" in str(err)
        takes_scale = False
    assert attention.efficient_backward_traces_with_scale() is takes_scale
    assert attention._EFFICIENT_SCALE_TRACES is takes_scale


def test_packed_rotary_projections_reach_the_kernel_in_the_autocast_dtype(monkeypatch):
    # Llama-style rotary embeddings promote bf16 projections to fp32 under autocast; SDPA would get them cast back
    from lightning_txopt.models import attention

    seen = []

    def kernel(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "varlen_kernel_available", lambda device, dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(attention, "_kernel", kernel)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)  # fp32, as the rotary product leaves them
    v = torch.randn(1, 1, 5, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.varlen_attention_forward(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    attention.varlen_attention_forward(torch.nn.Module(), q, k, v.float(), None, cu_seq_lens_q=cu)
    assert len(seen) == 1  # fp32 without autocast: the exact fallback, untouched


def _padded_batch(lengths: list[int], vocab: int = 60) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padded_batches_attend_as_sdpa_without_reading_an_encoders_mask_on_the_host(name, monkeypatch):
    """The backend builds an encoder's padding mask without transformers' ``padding_mask.all()`` (a host-device sync
    per forward on a GPU); every family still gives SDPA's outputs, padded (samples longer than any window) or not."""
    import transformers.masking_utils as masking

    family = FAMILIES[name]
    if family.encoder_decoder:
        pytest.skip("encoder-decoder models do not run the varlen backend")
    task = "sequence-classification" if family.classification else "causal-lm"
    reference = family.build(task).eval()
    try:
        model = use_varlen_attention(family.build(task)).eval()
    except ValueError as err:
        pytest.skip(f"{name}: {err}")
    original = masking._ignore_bidirectional_mask_sdpa
    reads: list[int] = []

    def counted(*args, **kwargs):
        reads.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", counted)
    for lengths in ([20, 13, 3], [20, 20]):  # with padding; without (the mask all ones)
        batch = _padded_batch(lengths)
        with torch.no_grad():
            reads.clear()
            got = model(**batch).logits
            got_reads = len(reads)
            expected = reference(**batch).logits
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        if not family.causal:
            assert got_reads == 0, f"{name}: the varlen backend read the padding mask on the host"
            assert len(reads) > got_reads, f"{name}: SDPA's own mask builder no longer checks (the test sees nothing)"


@pytest.mark.parametrize("compiling", [False, True])
def test_kernel_choice_eager_and_inside_compiled_graphs(monkeypatch, compiling):
    from lightning_txopt.models import attention

    calls = []
    monkeypatch.setattr(attention, "_EFFICIENT_OP", True)
    monkeypatch.setattr(attention, "_FLASH_OP", True)
    monkeypatch.setattr(attention, "_EFFICIENT_SCALE_TRACES", False)
    monkeypatch.setattr(attention.torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(attention, "_efficient_varlen", lambda *a, scale, causal: calls.append(("efficient", scale)))
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a, scale, window: calls.append(("flash", scale)))
    q, kv = torch.zeros(6, 4, 64), torch.zeros(6, 2, 64)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    for scale in (None, 64**-0.5, 0.1):
        attention._kernel(q, q, q, cu, cu, 6, 6, scale=scale, window=(-1, -1))
    attention._kernel(q, kv, kv, cu, cu, 6, 6, scale=None, window=(-1, 0))  # fewer key heads
    attention._kernel(q, q, q, cu, cu, 6, 6, scale=None, window=(3, 0))  # a sliding window
    attention._kernel(q, q, q, cu, cu, 6, 6, scale=None, window=(-1, -1), memory_efficient=False)
    if compiling:  # the default scale goes as None (the fake backward's flaw), another one to FlashAttention's
        expected = [("efficient", None), ("efficient", None), ("flash", 0.1)]
    else:
        expected = [("efficient", None), ("efficient", 64**-0.5), ("efficient", 0.1)]
    assert calls == [*expected, ("flash", None), ("flash", None), ("flash", None)]

"""The pure memory logic: the budget search and the checkpointing choice against exhaustive scans of fake probes,
the explained out-of-memory error, and the saved-tensors estimate against hand-computed byte counts."""

from __future__ import annotations

import inspect
import math
import pickle
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_txopt import memory as memory_module
from lightning_txopt.callbacks import enable_gradient_checkpointing
from lightning_txopt.memory import (
    CudaMemory,
    SavedTensorsMemory,
    checkpointing_candidates,
    choose_checkpointing,
    enable_expandable_segments,
    expandable_segments_enabled,
    explain_out_of_memory,
    explaining_out_of_memory,
    format_bytes,
    is_out_of_memory,
    search_token_budget,
)
from tests.helpers import tiny_bert

CPU = torch.device("cpu")


def largest_fitting(f, limit: float, low: int, multiple: int, cap: int) -> int | None:
    """Exhaustive reference: the largest multiple in [low, cap] with f(b) <= limit and every smaller one fitting."""
    best = None
    for b in range(-(-low // multiple) * multiple, cap + 1, multiple):
        peak = f(b)
        if peak is None or peak > limit:
            break
        best = b
    return best


# ---------------------------------------------------------------------------------------------- search
def test_linear_memory_is_found_in_a_few_probes():
    f = lambda b: 2e9 + 350_000.0 * b  # noqa: E731  weights + activations per token (BERT-base-like)
    limit = 0.9 * 141e9
    search = search_token_budget(f, limit=limit, min_tokens=512, multiple=64, baseline=2e9)
    best = largest_fitting(f, limit, 512, 64, 10**6)
    assert search.max_tokens is not None and best is not None
    assert best * 0.98 - 64 <= search.max_tokens <= best and f(search.max_tokens) <= limit
    assert search.stopped == "bracketed" and len(search.probes) <= 5
    assert search.probes[0][0] == 512


def test_the_baseline_speeds_up_the_first_extrapolation():
    f = lambda b: 2e9 + 350_000.0 * b  # noqa: E731
    with_baseline = search_token_budget(f, limit=30e9, min_tokens=4096, baseline=2e9)
    without = search_token_budget(f, limit=30e9, min_tokens=4096)
    assert with_baseline.max_tokens == without.max_tokens
    assert len(with_baseline.probes) < len(without.probes)


@pytest.mark.parametrize("multiple", [1, 8, 64, 512])
def test_granularity_and_bounds(multiple):
    f = lambda b: 1000.0 + 3.0 * b  # noqa: E731
    search = search_token_budget(f, limit=50_000, min_tokens=700, max_tokens=20_000, multiple=multiple)
    assert all(b % multiple == 0 and 700 <= b <= 20_000 for b, _ in search.probes)
    best = largest_fitting(f, 50_000, 700, multiple, 20_000)
    assert search.max_tokens is not None and best is not None
    assert search.max_tokens <= best and search.max_tokens >= best * 0.98 - multiple


def test_upper_bound_reached():
    search = search_token_budget(lambda b: float(b), limit=1e9, min_tokens=64, max_tokens=1000, multiple=64)
    assert search.max_tokens == 960 and search.stopped == "max_tokens"


def test_min_tokens_does_not_fit():
    search = search_token_budget(lambda b: float(b), limit=100, min_tokens=128, multiple=64)
    assert search.max_tokens is None and search.stopped == "min_tokens does not fit"
    assert search.probes == ((128, 128.0),)
    oom = search_token_budget(lambda b: None, limit=100, min_tokens=64, multiple=64)
    assert oom.max_tokens is None and oom.probes == ((64, None),)


def test_out_of_memory_below_the_limit():
    """The device fails at 40,000 tokens although the line reaches the limit at ~46,000 (another process, say)."""
    f = lambda b: None if b >= 40_000 else 1e6 + 1e4 * b  # noqa: E731
    search = search_token_budget(f, limit=4.6e8, min_tokens=64, multiple=64)
    assert search.max_tokens is not None and 40_000 * 0.98 - 64 <= search.max_tokens < 40_000
    assert any(p is None for _, p in search.probes) and search.stopped == "bracketed"


def test_bert_base_with_every_block_checkpointed_on_an_h200():
    """The peaks an H200 measured (bf16, BERT-base, every block checkpointed), linear in between, out of memory from
    1.75M tokens: the first extrapolation overshoots into an OOM; the search recovers without a long bisection."""
    measured = [(512, 1.828e9), (32768, 4.156e9), (245312, 21.99e9), (671232, 57.34e9), (1254080, 106.52e9)]
    measured += [(1545536, 130.36e9), (1576448, 134.07e9), (1594496, 135.39e9), (1750000, 146.0e9)]
    xs, ys = zip(*measured, strict=True)

    def f(b: int) -> float | None:
        return None if b >= 1_750_000 else float(np.interp(b, xs, ys))

    limit = 134.37e9  # 0.9 of the 139.3 GiB this process could use
    search = search_token_budget(f, limit=limit, min_tokens=512, multiple=64, baseline=1.70e9)
    best = largest_fitting(f, limit, 512, 64 * 64, 1_700_000)  # coarse scan, then the exact answer below
    assert best is not None
    best = largest_fitting(f, limit, best, 64, 1_700_000)
    assert search.max_tokens is not None and best is not None
    assert best * 0.98 - 64 <= search.max_tokens <= best
    assert len(search.probes) <= 7


def test_quadratic_memory():
    f = lambda b: 1e6 + 50.0 * b + 0.01 * b * b  # noqa: E731  attention's square
    search = search_token_budget(f, limit=5e7, min_tokens=64, multiple=64)
    best = largest_fitting(f, 5e7, 64, 64, 10**6)
    assert search.max_tokens is not None and best is not None and best * 0.98 - 64 <= search.max_tokens <= best


def test_noisy_peaks():
    """+-1% noise: the answer fits (as measured), is within a few percent of the noise-free one, never above a
    failing probe."""
    rng = np.random.default_rng(0)
    f0 = lambda b: 1e8 + 1e4 * b  # noqa: E731
    for _ in range(20):
        noise: dict[int, float] = {}

        def f(b: int, noise: dict[int, float] = noise) -> float:
            noise.setdefault(b, 1 + rng.uniform(-0.01, 0.01))
            return f0(b) * noise[b]

        search = search_token_budget(f, limit=1e9, min_tokens=64, multiple=64)
        best = largest_fitting(f0, 1e9, 64, 64, 10**6)
        assert search.max_tokens is not None and best is not None
        peak = search.peak_of(search.max_tokens)
        assert peak is not None and peak <= 1e9
        assert abs(search.max_tokens - best) <= 0.04 * best
        failing = [b for b, p in search.probes if p is None or p > 1e9]
        assert all(b > search.max_tokens for b in failing)


def test_memory_that_stops_growing():
    """A small dataset: past 5,000 tokens every budget gives the same batches."""
    search = search_token_budget(lambda b: float(min(b, 5000)), limit=1e9, min_tokens=64, multiple=64)
    assert search.stopped == "saturated" and search.max_tokens is not None and search.max_tokens >= 5000


def test_memory_in_steps():
    """The plan's worst batches change in steps (on an H200, 325,376 and 331,904 tokens both peaked at 124.09 GiB):
    a flat pair of close probes is a step, not saturation."""
    f = lambda b: 1e9 + 3e5 * (b // 8192 * 8192 + 8192)  # noqa: E731
    limit = 1e11
    search = search_token_budget(f, limit=limit, min_tokens=512, multiple=64, baseline=1e9)
    best = largest_fitting(f, limit, 512, 64, 10**6)
    assert search.stopped == "bracketed" and search.max_tokens is not None and best is not None
    assert best * 0.98 - 64 <= search.max_tokens <= best


def test_max_probes():
    f = lambda b: 1e6 + 10.0 * b  # noqa: E731
    search = search_token_budget(f, limit=1e9, min_tokens=64, multiple=64, max_probes=2)
    assert len(search.probes) == 2 and search.stopped == "max_probes"


@settings(max_examples=80, deadline=None)
@given(
    base=st.floats(1e5, 1e10),
    slope=st.floats(1.0, 1e6),
    attention_share=st.floats(0.0, 1.0),
    answer=st.integers(3000, 10**7),
    multiple=st.sampled_from([1, 8, 64, 128]),
    min_tokens=st.integers(1, 2048),
    baseline=st.booleans(),
)
def test_search_against_an_exhaustive_scan(base, slope, attention_share, answer, multiple, min_tokens, baseline):
    """Monotone convex memory (a quadratic term up to the linear one at the answer, as attention's can be): the
    result fits, is within the tolerance of the exhaustive answer (solved), in at most 12 probes."""
    square = attention_share * slope / answer

    def f(b: int) -> float:
        return base + slope * b + square * b * b

    limit = f(answer)
    search = search_token_budget(
        f, limit=limit, min_tokens=min_tokens, multiple=multiple, baseline=base if baseline else None
    )
    best = answer // multiple * multiple  # f is increasing: the largest multiple <= answer (to rounding)
    while f(best + multiple) <= limit:
        best += multiple
    while f(best) > limit:
        best -= multiple
    if best < -(-min_tokens // multiple) * multiple:
        assert search.max_tokens is None
        return
    assert search.max_tokens is not None
    assert f(search.max_tokens) <= limit and search.max_tokens <= best
    assert search.max_tokens >= best * 0.98 - multiple
    assert search.stopped == "bracketed" and len(search.probes) <= 12


def test_extreme_convexity_still_fits():
    """Memory 150x its linear part at the answer (nothing real is this convex): the search may run out of probes,
    but its answer fits and is within 10%."""
    f = lambda b: 1e5 + b + 5e-5 * b * b  # noqa: E731
    search = search_token_budget(f, limit=f(68) + 0.05078125 * 1e10, min_tokens=68, multiple=1, baseline=1e5)
    assert search.max_tokens is not None and f(search.max_tokens) <= search.limit
    assert search.max_tokens >= 0.9 * 3176903


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(limit=0), "limit"),
        (dict(limit=math.inf), "limit"),
        (dict(min_tokens=0), "min_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(multiple=0), "multiple"),
        (dict(tolerance=1.5), "tolerance"),
        (dict(max_growth=1.0), "max_growth"),
        (dict(max_probes=0), "max_probes"),
        (dict(min_tokens=100, max_tokens=120, multiple=64), "No multiple of 64"),
    ],
)
def test_search_arguments(kwargs, match):
    args = {"limit": 1e9, "min_tokens": 64, "multiple": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        search_token_budget(lambda b: float(b), **args)


@pytest.mark.parametrize("bad", [-1.0, math.nan, "1", True])
def test_a_bad_probe_value_is_an_error(bad):
    with pytest.raises(ValueError, match="The probe returned"):
        search_token_budget(lambda b: bad, limit=1e9, min_tokens=64)


def test_peak_of_an_unprobed_budget():
    search = search_token_budget(lambda b: float(b), limit=1e9, min_tokens=64, max_tokens=64)
    with pytest.raises(KeyError, match="was not probed"):
        search.peak_of(128)


# ---------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("blocks", [1, 2, 5, 12, 24, 32])
def test_candidates_cover_every_count(blocks):
    candidates = checkpointing_candidates(blocks)
    counts = [c for c, _ in candidates]
    assert counts == sorted({math.ceil(blocks / n) for n in range(1, blocks + 1)})
    for count, n in candidates:
        assert math.ceil(blocks / n) == count
        assert all(math.ceil(blocks / m) != count for m in range(1, n))  # the smallest such n


def test_candidates_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        checkpointing_candidates(0)


@pytest.mark.parametrize("blocks", [2, 6, 12, 24])
@pytest.mark.parametrize("limit", [150.0, 400.0, 800.0, 1300.0, 2500.0, 5000.0])
def test_choice_is_the_fewest_fitting_blocks(blocks, limit):
    def peak(n: int | None) -> float:
        k = 0 if n is None else math.ceil(blocks / n)
        return 100.0 * (blocks - k) + 10.0 * k + 100.0

    choice = choose_checkpointing(peak, blocks, limit=limit)
    options = [(0, None), *checkpointing_candidates(blocks)]
    fitting = [(c, n) for c, n in options if peak(n) <= limit]
    if not fitting:
        assert not choice.fits and choice.every_n_layers == 1 and choice.checkpointed == blocks
    else:
        assert choice.fits and (choice.checkpointed, choice.every_n_layers) == min(fitting, key=lambda x: x[0])
    assert len(choice.probes) <= 2 + math.ceil(math.log2(len(options)))


def test_choice_with_out_of_memory_probes():
    choice = choose_checkpointing(lambda n: None if n is None or n > 2 else 1.0, 8, limit=10.0)
    assert (choice.every_n_layers, choice.checkpointed, choice.fits) == (2, 4, True)
    with pytest.raises(ValueError, match="limit"):
        choose_checkpointing(lambda n: 1.0, 8, limit=-1)


# ---------------------------------------------------------------------------------------------- explained OOM
def test_explanation_names_shape_tokens_budget_and_remedies():
    mask = torch.zeros(4, 128, dtype=torch.long)
    mask[:, :100] = 1
    batch = {"input_ids": torch.zeros(4, 128, dtype=torch.long), "attention_mask": mask, "labels": torch.zeros(4)}
    original = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    err = explain_out_of_memory(original, batch, max_tokens=512)
    text = str(err)
    assert isinstance(err, torch.OutOfMemoryError)
    assert "shape (4, 128) (input_ids): 512 padded tokens, 400 real (22% padding)" in text
    assert "max_tokens=512" in text and "e.g. 384" in text
    assert "TokenBudgetFinder" in text and "GradientCheckpointing" in text
    assert text.endswith("Original error: CUDA out of memory. Tried to allocate 2.00 GiB.")


def test_explanation_of_packed_and_other_batches():
    packed = {"input_ids": torch.zeros(1, 64, dtype=torch.long), "cu_seq_lens": torch.tensor([0, 30, 60])}
    assert "64 padded tokens, 60 real (6% padding)" in str(explain_out_of_memory(RuntimeError("x"), packed))
    pair = (torch.zeros(2, 10, dtype=torch.long), torch.zeros(2))
    text = str(explain_out_of_memory(RuntimeError("x"), pair, max_tokens=None, where="backward pass"))
    assert "backward pass on a batch of shape (2, 10) (batch[0])" in text and "no token budget" in text
    assert "a batch of type str" in str(explain_out_of_memory(RuntimeError("x"), "text", max_tokens="auto"))


def test_explaining_context():
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    explained = pytest.raises(torch.OutOfMemoryError, match="Out of memory in a training step")
    with explained as info, explaining_out_of_memory(batch, max_tokens=16):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError) as twice, explaining_out_of_memory(batch, max_tokens=16):
        raise info.value  # an explained error is not explained again
    assert twice.value is info.value
    with pytest.raises(ValueError, match="unrelated"), explaining_out_of_memory(batch):
        raise ValueError("unrelated")


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_format_bytes():
    assert format_bytes(2**30) == "1.00 GiB" and format_bytes(512) == "0.5 KiB"


# ---------------------------------------------------------------------------------------------- device readings
def test_cuda_memory_refuses_the_cpu():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaMemory().check(CPU)


def test_saved_tensors_count_against_hand_computed_bytes():
    memory = SavedTensorsMemory(capacity=10**9)
    layer = torch.nn.Linear(64, 32)
    x = torch.ones(16, 64)
    with memory.tracking(CPU):
        y = torch.tanh(layer(x))  # addmm saves x (its weight view is not counted), tanh saves its output
        assert memory.peak(CPU) == 16 * 64 * 4 + 16 * 32 * 4
        y.sum().backward()
    assert memory.peak(CPU) == 16 * 64 * 4 + 16 * 32 * 4
    del y
    assert memory._live == 16 * 64 * 4  # the output's graph is gone; x is still alive (held here)


def test_saved_tensors_grow_with_tokens_and_shrink_with_checkpointing():
    memory = SavedTensorsMemory(capacity=10**12)
    model = tiny_bert(num_hidden_layers=4)

    def peak(rows: int, width: int) -> int:
        ids = torch.randint(5, 60, (rows, width))
        with memory.tracking(CPU):
            model(input_ids=ids, labels=torch.zeros(rows, dtype=torch.long)).loss.backward()
        return memory.peak(CPU)

    small, large = peak(4, 16), peak(8, 16)
    assert 1.9 < large / small < 2.1  # linear in tokens at a fixed width
    enable_gradient_checkpointing(model, every_n_layers=1, prefer_native=False)
    assert peak(8, 16) < 0.5 * large


def test_saved_tensors_simulate_out_of_memory_and_pickle():
    memory = SavedTensorsMemory(capacity=1000)
    with pytest.raises(torch.OutOfMemoryError, match="Simulated out of memory"), memory.tracking(CPU):
        torch.tanh(torch.ones(100, 10, requires_grad=True) * 2)
    copy = pickle.loads(pickle.dumps(memory))
    assert copy.capacity(CPU) == 1000 and copy.peak(CPU) == 0
    quiet = SavedTensorsMemory(capacity=1000, simulate_oom=False)
    with quiet.tracking(CPU):
        torch.tanh(torch.ones(100, 10, requires_grad=True) * 2)
    assert quiet.peak(CPU) == 4000
    with pytest.raises(ValueError, match="capacity"):
        SavedTensorsMemory(capacity=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_reads_the_allocator():
    device = torch.device("cuda")
    memory = CudaMemory()
    memory.check(device)
    assert memory.capacity(device) > 0
    # relative to what the process holds already (tensors of earlier tests: 69,206,016 bytes in a GPU run)
    start = torch.cuda.memory_allocated(device)
    with memory.tracking(device):
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        del x
    assert memory.peak(device) >= start + 64 * 2**20
    memory.release(device)  # the peak counters restart from what is allocated now: the 64 MiB block is not in them
    assert torch.cuda.max_memory_allocated(device) < start + 64 * 2**20
    assert torch.cuda.max_memory_allocated(device) == torch.cuda.memory_allocated(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_out_of_memory_error_explained():
    batch = {"input_ids": torch.zeros(8, 64, dtype=torch.long, device="cuda")}
    with pytest.raises(torch.OutOfMemoryError) as info, explaining_out_of_memory(batch, max_tokens=512):
        torch.empty(2**50, dtype=torch.uint8, device="cuda")
    text = str(info.value)
    assert "shape (8, 64)" in text and "max_tokens=512" in text and "GiB allocated" in text
    assert "Original error: CUDA out of memory" in text


def test_cuda_memory_peak_kinds():
    default = CudaMemory()
    assert default.peak_kind == "allocated" and default.enforce_limit
    assert CudaMemory(peak="reserved", enforce_limit=False).peak_kind == "reserved"
    with pytest.raises(ValueError, match="`peak` must be"):
        CudaMemory(peak="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`enforce_limit` must be a bool"):
        CudaMemory(enforce_limit="yes")  # type: ignore[arg-type]


class _FakeCudaFraction:
    """torch.cuda's per-process memory fraction, on a pretend 100-byte device."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: float) -> None:
        self.fraction = start
        self.calls: list[float] = []
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=100))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", self.get, raising=False)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self.set)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def set(self, fraction: float, device: object = None) -> None:
        assert isinstance(fraction, float) and device == 0  # torch's setter and getter need an index
        self.calls.append(fraction)
        self.fraction = fraction

    def get(self, device: object) -> float:
        assert device == 0
        return self.fraction


def test_cuda_memory_caps_the_allocator_at_the_limit_and_restores_it(monkeypatch):
    fake = _FakeCudaFraction(monkeypatch, start=0.95)
    device = torch.device("cuda")  # no index: the current device's
    with CudaMemory().limited(device, 80.0):
        assert fake.fraction == pytest.approx(0.8)
    assert fake.fraction == 0.95
    with pytest.raises(torch.OutOfMemoryError), CudaMemory().limited(device, 250.0):  # above the device: 1.0
        assert fake.fraction == 1.0
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert fake.fraction == 0.95 and fake.calls == [0.8, 0.95, 1.0, 0.95]
    with CudaMemory(enforce_limit=False).limited(device, 80.0):  # untouched
        assert fake.fraction == 0.95
    assert len(fake.calls) == 4


def test_the_allocator_fraction_is_read_through_torchs_public_getter():
    """``_memory_fraction`` reads ``torch.cuda.get_per_process_memory_fraction`` (torch >= 2.8); fails if it moves."""
    assert callable(torch.cuda.get_per_process_memory_fraction)
    assert list(inspect.signature(torch.cuda.get_per_process_memory_fraction).parameters) == ["device"]


def test_a_reader_without_a_cap_runs_the_block_unchanged():
    memory = SavedTensorsMemory(capacity=100)
    with memory.limited(CPU, 1.0):
        x = torch.ones(1000)
    assert x.sum() == 1000


@pytest.fixture
def allocator_settings_restored() -> Iterator[None]:
    """The allocator's settings are process-wide: put expandable segments back as they were."""
    before = expandable_segments_enabled()
    yield
    memory_module._set_allocator_settings(f"expandable_segments:{before}")


def test_the_allocator_settings_are_read_and_written_at_run_time(allocator_settings_restored):
    """The one read and the one write of torch's live allocator settings (no public function exists): if torch
    moves them, this fails, and with it every probe's guard against fragmentation."""
    assert memory_module._live_allocator_settings() is not None, "torch._C._accelerator_getAllocatorSettings moved"
    memory_module._set_allocator_settings("expandable_segments:False")
    assert memory_module._live_allocator_settings() == "expandable_segments:False"
    assert not expandable_segments_enabled()
    assert enable_expandable_segments() is True
    assert expandable_segments_enabled()
    assert enable_expandable_segments() is False  # already on: nothing changed


@pytest.mark.parametrize(
    "env, on",
    [
        ({}, False),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:true"}, True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, True),
    ],
)
def test_expandable_segments_from_the_environment_where_torch_cannot_report_them(monkeypatch, env, on):
    monkeypatch.setattr(memory_module, "_live_allocator_settings", lambda: None)
    monkeypatch.setattr(memory_module, "_APPLIED", [])
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert expandable_segments_enabled() is on
    advice = CudaMemory().advice()
    assert (advice is None) is on
    if advice is not None:
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in advice and "max_memory_fraction" in advice
    assert SavedTensorsMemory(10).advice() is None  # an estimate has nothing to warn about


def test_settings_applied_at_run_time_count_where_torch_cannot_report_them(monkeypatch, allocator_settings_restored):
    """torch 2.11 has the setter but no getter: what was applied since start is remembered."""
    monkeypatch.setattr(memory_module, "_live_allocator_settings", lambda: None)
    monkeypatch.setattr(memory_module, "_APPLIED", [])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert not expandable_segments_enabled()
    assert enable_expandable_segments() is True and expandable_segments_enabled()
    assert enable_expandable_segments() is False
    memory_module._set_allocator_settings("expandable_segments:False")
    assert not expandable_segments_enabled()


@pytest.mark.parametrize(
    ("live", "on"),
    [("", False), ("expandable_segments:True", True), ("max_split_size_mb:128,expandable_segments:True", True)],
)
def test_the_live_settings_win_over_the_environment(monkeypatch, live, on):
    """The allocator read the environment when the process started; a variable set later changes nothing."""
    monkeypatch.setattr(memory_module, "_live_allocator_settings", lambda: live)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False" if on else "expandable_segments:True")
    assert expandable_segments_enabled() is on


def test_cuda_memory_turns_on_expandable_segments_in_prepare(allocator_settings_restored):
    memory_module._set_allocator_settings("expandable_segments:False")
    assert CudaMemory().prepare(torch.device("cpu")) is None  # not a CUDA device: nothing to set
    assert CudaMemory(expandable_segments=False).prepare(torch.device("cuda", 0)) is None
    assert CudaMemory(expandable_segments=False).advice() is not None  # left as it is: the warning
    assert not expandable_segments_enabled()
    changed = CudaMemory().prepare(torch.device("cuda", 0))
    assert changed is not None and expandable_segments_enabled()
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in changed
    assert "CudaMemory(expandable_segments=False)" in changed
    assert CudaMemory().advice() is None
    assert CudaMemory().prepare(torch.device("cuda", 0)) is None  # on already: nothing more to log
    assert SavedTensorsMemory(10).prepare(torch.device("cpu")) is None


def test_cuda_memory_checks_expandable_segments_argument():
    with pytest.raises(ValueError, match="expandable_segments"):
        CudaMemory(expandable_segments="yes")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    plateau=st.integers(1, 40),
    slope=st.floats(1.0, 50.0),
    limit=st.floats(2_000.0, 200_000.0),
)
def test_budgets_with_one_key_are_measured_once(plateau, slope, limit):
    """Memory as a step function of the budget (the plan changes every ``plateau`` multiples): with ``key`` the
    search finds the same budget as without it, calls the probe once per distinct key, and never more often."""
    calls: list[int] = []

    def key(b: int) -> int:
        return b // (64 * plateau)

    def probe(b: int) -> float:
        calls.append(b)
        return 500.0 + slope * 64 * plateau * (key(b) + 1)

    keyed = search_token_budget(probe, limit=limit, min_tokens=64, multiple=64, key=key, max_probes=40)
    n_keyed = len(calls)
    calls.clear()
    plain = search_token_budget(probe, limit=limit, min_tokens=64, multiple=64, max_probes=40)
    assert len(calls) >= n_keyed == len({key(b) for b, _ in keyed.probes})  # one measurement per key
    for found in (keyed, plain):  # a fitting budget, within one plateau of the largest that fits
        assert found.max_tokens is None or probe(found.max_tokens) <= limit
    reference = largest_fitting(probe, limit, 64, 64, 64 * 4000)
    if keyed.max_tokens is not None and keyed.stopped == "bracketed":  # within one step (2%) of the largest
        assert reference is not None and reference >= keyed.max_tokens
        assert reference - keyed.max_tokens <= max(64, -(-math.ceil(0.02 * keyed.max_tokens) // 64) * 64)


def test_a_reused_key_does_not_count_against_max_probes():
    """Memory grows up to 512 tokens, then the plan stops changing (a small dataset) until 4,096, where one batch of
    everything does not fit: budgets of the plateau are visited without measuring them again."""

    def key(b: int) -> object:
        return b if b < 512 else ("plateau" if b < 4096 else "one batch")

    def peak(b: int) -> float | None:
        return 100.0 + b if b < 512 else (612.0 if b < 4096 else None)

    probed: list[int] = []

    def probe(b: int) -> float | None:
        probed.append(b)
        return peak(b)

    found = search_token_budget(probe, limit=5000.0, min_tokens=64, multiple=64, key=key, max_probes=5)
    assert len(probed) == len({key(b) for b, _ in found.probes}) <= 5  # one measurement per key
    assert len(found.probes) > len(probed)  # plateau budgets visited without a measurement
    assert found.stopped == "bracketed" and found.max_tokens is not None
    assert 4096 - 128 <= found.max_tokens < 4096  # within one 2% step of the plateau's edge


def test_each_probe_is_timed_and_a_reused_key_takes_none():
    """``BudgetSearch.seconds``: one wall time per entry of ``probes``, the time the probe took; a budget that reused
    a key's measurement took 0 (the plateau of the test above)."""

    def key(b: int) -> object:
        return b if b < 512 else ("plateau" if b < 4096 else "one batch")

    def probe(b: int) -> float | None:
        time.sleep(0.01)
        return 100.0 + b if b < 512 else (612.0 if b < 4096 else None)

    found = search_token_budget(probe, limit=5000.0, min_tokens=64, multiple=64, key=key, max_probes=5)
    assert len(found.seconds) == len(found.probes)
    seen: set[object] = set()
    reused = 0
    for (budget, _), took in zip(found.probes, found.seconds, strict=True):
        if key(budget) in seen:
            assert took == 0.0
            reused += 1
        else:
            assert took >= 0.01
        seen.add(key(budget))
    assert reused > 0

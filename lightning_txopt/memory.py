"""Memory: the largest token budget that fits a device, checkpointing chosen for a memory target, self-explaining OOMs.

The searches are pure functions of a *probe* callable (a budget or a checkpointing interval in, peak memory out, or
``None`` when the probe ran out of memory), so they are tested with fake probes and reused by any adapter. What is
specific to a device (its capacity, its peak-memory counter, what an out-of-memory error looks like) sits in
:class:`DeviceMemory` subclasses: :class:`CudaMemory` measures, :class:`SavedTensorsMemory` estimates (CPU tests and
demos). :class:`~lightning_txopt.callbacks.TokenBudgetFinder` runs the probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "BudgetSearch",
    "CheckpointingChoice",
    "CudaMemory",
    "DeviceMemory",
    "SavedTensorsMemory",
    "checkpointing_candidates",
    "choose_checkpointing",
    "enable_expandable_segments",
    "explain_out_of_memory",
    "expandable_segments_enabled",
    "explaining_out_of_memory",
    "format_bytes",
    "is_out_of_memory",
    "search_token_budget",
]

GiB = float(2**30)


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB, MiB or KiB.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(1.5 * 2**20), format_bytes(2048)
        ('3.00 GiB', '1.50 MiB', '2.0 KiB')
    """
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


_EXPLAINED = "lightning_txopt_explained"  # attribute set on the errors explain_out_of_memory builds


# ---------------------------------------------------------------------------------------------- budget search
@dataclasses.dataclass(frozen=True)
class BudgetSearch:
    """What :func:`search_token_budget` found.

    Attributes:
        max_tokens: The largest probed budget whose peak stayed within ``limit``, or ``None`` when even the smallest
            budget did not fit.
        limit: The memory limit the peaks were compared with (the probe's unit, bytes for a device).
        probes: ``(budget, peak)`` of every probe in probing order; the peak is ``None`` where the probe ran out of
            memory.
        stopped: Why the search stopped: ``"bracketed"`` (a budget one step larger did not fit), ``"max_tokens"``
            (the upper bound fits), ``"saturated"`` (memory did not grow over a doubling of the budget: larger budgets
            do not change the batches), ``"max_probes"`` or ``"min_tokens does not fit"``.
        seconds: Wall time of each probe, in the order of ``probes`` (0 for a budget that reused the measurement
            of an equal ``key``); empty when not recorded.

    Example:
        >>> found = search_token_budget(lambda n: 1000 + 10.0 * n, limit=50_000, min_tokens=64)
        >>> found.max_tokens, found.stopped, found.max_tokens * 10 + 1000 <= 50_000
        (4800, 'bracketed', True)
    """

    max_tokens: int | None
    limit: float
    probes: tuple[tuple[int, float | None], ...]
    stopped: str
    seconds: tuple[float, ...] = ()

    def peak_of(self, budget: int) -> float | None:
        """The peak measured at ``budget`` (``None``: out of memory).

        Raises:
            KeyError: If ``budget`` was not probed.
        """
        for b, peak in self.probes:
            if b == budget:
                return peak
        raise KeyError(f"Budget {budget!r} was not probed; probed: {[b for b, _ in self.probes]}.")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def search_token_budget(
    probe: Callable[[int], float | None],
    *,
    limit: float,
    min_tokens: int,
    max_tokens: int | None = None,
    multiple: int = 64,
    baseline: float | None = None,
    tolerance: float = 0.02,
    max_probes: int = 12,
    max_growth: float = 64.0,
    key: Callable[[int], Hashable] | None = None,
) -> BudgetSearch:
    """The largest multiple of ``multiple`` in ``[min_tokens, max_tokens]`` whose ``probe`` peak is ``<= limit``.

    Memory grows about linearly with the budget, so the search solves the line through two measurements for
    ``limit`` (regula falsi), with a bracket and bisection as safeguards for what is not linear (attention's square,
    allocator rounding, noise, an out-of-memory error below the limit):

    1. probe ``min_tokens`` (rounded up to ``multiple``); if it does not fit, stop (``max_tokens=None``);
    2. while no budget has failed: extrapolate the line (the two largest fitting probes, or the first probe and
       ``baseline``, the memory at budget 0) to ``limit`` (aiming under it by ``tolerance / 2`` of what the
       budget adds to the first probe's peak), at most ``max_growth`` times the largest fitting budget (x4 without
       a line: one probe and no ``baseline``);
    3. once a budget failed: interpolate between the largest fitting budget and the smallest failing one (when the
       failing one ran out of memory, so has no peak, extrapolate from below, or go 90% of the way if the line
       points past it), the end that stayed put twice in a row weighing half as much each time (the Illinois
       method, against one-sided convergence); bisect when the line gives nothing useful (geometrically while the
       bracket spans more than a factor 4);
    4. stop when the smallest failing budget is within one step of the largest fitting one, the step being
       ``max(multiple, tolerance * budget)`` rounded up to ``multiple``.

    A budget fails when its peak exceeds ``limit`` or its probe ran out of memory (``None``). Noisy, non-monotone
    peaks are handled conservatively: the answer is the largest fitting budget below the smallest failing one.

    Args:
        probe: ``budget -> peak`` (same unit as ``limit``), or ``None`` when the probe ran out of memory.
        limit: The largest acceptable peak.
        min_tokens: Smallest budget (rounded up to ``multiple``); probed first.
        max_tokens: Largest budget (rounded down to ``multiple``); ``None`` for no bound.
        multiple: Budgets are multiples of this (the step granularity).
        baseline: Memory at budget 0 (weights, optimizer state and gradients), used only to extrapolate from the
            first probe.
        tolerance: Relative precision at which the search stops.
        max_probes: Most probes (distinct measurements, with ``key``).
        max_growth: Most growth of the budget from one probe to the next while no budget has failed.
        key: ``budget -> hashable``: budgets with equal keys have equal peaks (e.g. the shapes of the batches the
            plan makes at them: a small dataset gives the same batches over a range of budgets). A budget whose key
            was measured reuses that peak without calling ``probe`` and does not count against ``max_probes``; it is
            listed in :attr:`BudgetSearch.probes` like the others. At most ``4 * max_probes`` budgets are visited.

    Returns:
        A :class:`BudgetSearch`.

    Raises:
        ValueError: On invalid arguments, ``min_tokens > max_tokens``, or a probe returning a negative, NaN or
            non-numeric peak.

    Example:
        >>> memory = lambda b: 1000 + 2 * b  # weights 1000, 2 per token: 3968 tokens is the most that fits 9000
        >>> search = search_token_budget(memory, limit=9000, min_tokens=64, multiple=64, baseline=1000)
        >>> search.probes  # the line aims 1% under the limit; one step (2%) more does not fit
        ((64, 1128.0), (3904, 8808.0), (4032, 9064.0))
        >>> search.max_tokens, search.stopped
        (3904, 'bracketed')
    """
    multiple = _positive_int("multiple", multiple)
    min_tokens = _positive_int("min_tokens", min_tokens)
    max_probes = _positive_int("max_probes", max_probes)
    if max_tokens is not None:
        max_tokens = _positive_int("max_tokens", max_tokens)
    if not (isinstance(limit, int | float) and math.isfinite(limit) and limit > 0):
        raise ValueError(f"`limit` must be a positive finite number, got {limit!r}.")
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be in [0, 1), got {tolerance!r}.")
    if not max_growth > 1:
        raise ValueError(f"`max_growth` must be > 1, got {max_growth!r}.")
    low = -(-min_tokens // multiple) * multiple
    cap = None if max_tokens is None else max_tokens // multiple * multiple
    if cap is not None and cap < low:
        raise ValueError(
            f"No multiple of {multiple} lies in [min_tokens={min_tokens}, max_tokens={max_tokens}]: widen the bounds."
        )

    peaks: dict[int, float | None] = {}
    order: list[int] = []
    seconds: list[float] = []
    measured: dict[Hashable, float | None] = {}  # by key: the distinct measurements

    def run(budget: int) -> None:
        k = key(budget) if key is not None else budget
        if k in measured:
            peaks[budget] = measured[k]
            order.append(budget)
            seconds.append(0.0)
            return
        start = time.perf_counter()
        peak = probe(budget)
        seconds.append(time.perf_counter() - start)
        if peak is not None:
            if isinstance(peak, bool) or not isinstance(peak, int | float) or not peak >= 0:
                raise ValueError(f"The probe returned {peak!r} at budget {budget}: give a peak >= 0, or None (OOM).")
            peak = float(peak)
        peaks[budget] = measured[k] = peak
        order.append(budget)

    def fits(budget: int) -> bool:
        peak = peaks[budget]
        return peak is not None and peak <= limit

    def step_at(budget: int) -> int:
        return max(multiple, -(-math.ceil(tolerance * budget) // multiple) * multiple)

    def result(best: int | None, stopped: str) -> BudgetSearch:
        return BudgetSearch(best, float(limit), tuple((b, peaks[b]) for b in order), stopped, tuple(seconds))

    aim = float(limit)  # lines aim a little under the limit (set after the first probe): landing just below it

    def line_at_limit(points: Sequence[tuple[float, float]]) -> float | None:
        (b1, p1), (b2, p2) = points
        if b2 == b1 or p2 <= p1:
            return None
        return b1 + (aim - p1) * (b2 - b1) / (p2 - p1)

    run(low)
    if not fits(low):
        return result(None, "min_tokens does not fit")
    first = peaks[low]
    assert first is not None
    aim = limit - tolerance / 2 * (limit - first)  # under the limit by a share of what the budget adds
    bracket: tuple[int, int] | None = None  # the previous bracket, and how often each end stayed put
    kept = {"lo": 0, "hi": 0}
    while True:
        failing = sorted(b for b in peaks if not fits(b))
        hi = failing[0] if failing else None
        lo = max(b for b in peaks if fits(b) and (hi is None or b < hi))
        p_lo = peaks[lo]
        assert p_lo is not None
        if cap is not None and lo >= cap:
            return result(lo, "max_tokens")
        step = step_at(lo)
        if hi is not None and hi - lo <= step:
            return result(lo, "bracketed")
        if len(measured) >= max_probes or len(order) >= 4 * max_probes:
            return result(lo, "max_probes")
        below = sorted(b for b in peaks if fits(b) and b < lo)
        if hi is None:
            if below:
                p_below = peaks[below[-1]]
                assert p_below is not None
                if p_lo <= p_below and lo >= 2 * below[-1]:  # flat over a doubling: the batches stopped growing
                    return result(lo, "saturated")
                target = line_at_limit([(below[-1], p_below), (lo, p_lo)])
                if target is None:  # flat between close budgets (one step of the plan): the widest span's line
                    p_first = peaks[below[0]]
                    assert p_first is not None
                    target = line_at_limit([(below[0], p_first), (lo, p_lo)])
            elif baseline is not None:
                target = line_at_limit([(0.0, float(baseline)), (lo, p_lo)])
            else:
                target = None
            candidate = lo * min(4.0, max_growth) if target is None else min(target, lo * max_growth)  # x4 blind
            budget = max(int(candidate) // multiple * multiple, lo + step)
        else:
            p_hi = peaks[hi]
            if bracket is not None:  # Illinois: an end that stays put twice counts for less, against one-sidedness
                kept["lo"] = kept["lo"] + 1 if lo == bracket[0] else 0
                kept["hi"] = kept["hi"] + 1 if hi == bracket[1] else 0
            bracket = (lo, hi)
            target = None
            if p_hi is not None:
                e_lo = aim - (aim - p_lo) / 2 ** max(0, kept["lo"] - 1)
                e_hi = aim + (p_hi - aim) / 2 ** max(0, kept["hi"] - 1)
                target = line_at_limit([(lo, e_lo), (hi, e_hi)])
            elif below:
                p_below = peaks[below[-1]]
                assert p_below is not None
                target = line_at_limit([(below[-1], p_below), (lo, p_lo)])
                if target is not None and target >= hi:  # the line overshot into an OOM: memory grows faster
                    target = lo + 0.9 * (hi - lo)
            if target is None or not lo < target < hi or max(kept.values()) >= 4:  # bisect (geometrically if wide)
                target = math.sqrt(lo * hi) if hi > 4 * lo else (lo + hi) / 2
            if hi - lo < 3 * step:  # one step up closes the bracket either way (or leaves one step to close)
                budget = lo + step
            else:
                budget = max(int(min(target, hi - step)) // multiple * multiple, lo + step)  # lo < budget < hi
        if cap is not None:
            budget = min(budget, cap)
        run(budget)


# ---------------------------------------------------------------------------------------------- checkpointing choice
def checkpointing_candidates(num_blocks: int) -> list[tuple[int, int]]:
    """``(checkpointed blocks, every_n_layers)`` for every distinct count of checkpointed blocks, fewest first.

    ``every_n_layers=n`` checkpoints blocks ``0, n, 2n, ...``: ``ceil(num_blocks / n)`` of them. For each count the
    smallest ``n`` that gives it is listed (the most even spacing).

    Raises:
        ValueError: If ``num_blocks`` is not a positive integer.

    Example:
        >>> checkpointing_candidates(12)
        [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
    """
    num_blocks = _positive_int("num_blocks", num_blocks)
    by_count: dict[int, int] = {}
    for n in range(num_blocks, 0, -1):  # descending n: the last n written for a count is the smallest
        by_count[-(-num_blocks // n)] = n
    return sorted(by_count.items())


@dataclasses.dataclass(frozen=True)
class CheckpointingChoice:
    """What :func:`choose_checkpointing` chose.

    Attributes:
        every_n_layers: The interval to checkpoint with, or ``None`` for no checkpointing (it fits without).
        checkpointed: Number of checkpointed blocks.
        fits: Whether the choice fits the limit (``False``: not even every block checkpointed fits;
            ``every_n_layers`` is then 1).
        probes: ``(every_n_layers, peak)`` of every probe in probing order (``None`` interval: no checkpointing;
            ``None`` peak: out of memory).

    Example:
        >>> peaks = {None: 900, 1: 300, 2: 500, 3: 620, 6: 780}  # peak by every_n_layers (None: no checkpointing)
        >>> choice = choose_checkpointing(peaks.get, 6, limit=600)
        >>> choice.every_n_layers, choice.checkpointed, choice.fits
        (2, 3, True)
    """

    every_n_layers: int | None
    checkpointed: int
    fits: bool
    probes: tuple[tuple[int | None, float | None], ...]


def choose_checkpointing(
    peak_at: Callable[[int | None], float | None], num_blocks: int, *, limit: float
) -> CheckpointingChoice:
    """The fewest checkpointed blocks whose peak fits ``limit``: bisection over :func:`checkpointing_candidates`.

    Peak memory falls as more blocks are checkpointed (each keeps only its input), so the search probes no
    checkpointing first (done if it fits), then every block (done, not fitting, if that does not fit), then bisects
    the counts in between. Fewer checkpointed blocks recompute less: the choice is never slower than checkpointing
    every block.

    Args:
        peak_at: ``every_n_layers -> peak`` (``None`` in: no checkpointing), or ``None`` out when the probe ran out
            of memory. It applies the interval to the model and runs the probe steps.
        num_blocks: Number of transformer blocks.
        limit: The largest acceptable peak.

    Returns:
        A :class:`CheckpointingChoice`.

    Raises:
        ValueError: On a non-positive ``num_blocks`` or ``limit``.

    Example:
        >>> def peak(n):  # 100 per uncheckpointed block, 10 per checkpointed one, of 12 blocks
        ...     k = 0 if n is None else -(-12 // n)
        ...     return 100 * (12 - k) + 10 * k
        >>> choice = choose_checkpointing(peak, 12, limit=700)
        >>> choice.every_n_layers, choice.checkpointed, choice.fits  # 6 checkpointed: 600 + 60 = 660
        (2, 6, True)
    """
    candidates = checkpointing_candidates(num_blocks)
    if not (isinstance(limit, int | float) and math.isfinite(limit) and limit > 0):
        raise ValueError(f"`limit` must be a positive finite number, got {limit!r}.")
    probes: list[tuple[int | None, float | None]] = []

    def fits(n: int | None) -> bool:
        peak = peak_at(n)
        probes.append((n, peak))
        return peak is not None and peak <= limit

    if fits(None):
        return CheckpointingChoice(None, 0, True, tuple(probes))
    if not fits(1):
        return CheckpointingChoice(1, num_blocks, False, tuple(probes))
    lo, hi = -1, len(candidates) - 1  # candidates[hi] fits; candidates[lo] (or no checkpointing at -1) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid][1]):
            hi = mid
        else:
            lo = mid
    count, n = candidates[hi]
    return CheckpointingChoice(n, count, True, tuple(probes))


# ---------------------------------------------------------------------------------------------- device memory
def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory error (``torch.OutOfMemoryError`` or a CUDA/cuBLAS alloc failure).

    Example:
        >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")), is_out_of_memory(ValueError("x"))
        (True, False)
    """
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "CUDA out of memory" in text or "CUDA error: out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def _allocator_options(conf: str) -> dict[str, str]:
    return dict(part.split(":", 1) for part in conf.replace(" ", "").split(",") if ":" in part)


_APPLIED: list[str] = []  # settings applied at run time by _set_allocator_settings, in order


def _live_allocator_settings() -> str | None:
    """The allocator's settings string as torch holds it now (``None`` on a torch that cannot report it).

    The one read of it: ``torch._C._accelerator_getAllocatorSettings`` (torch 2.13; torch 2.11 lacks it; no public
    function exists). It returns the settings of the environment at start, or the last ones set at run time; a
    test fails if it moves.
    """
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return None if getter is None else str(getter())


def _set_allocator_settings(conf: str) -> None:
    """Apply allocator settings at run time; the one write of them.

    ``torch._C._accelerator_setAllocatorSettings`` (torch >= 2.9), else ``torch.cuda.memory._set_allocator_settings``
    (older torch); no public function exists. A test fails if both move. Recorded for
    :func:`expandable_segments_enabled` where torch cannot report its settings.
    """
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # pragma: no cover - torch < 2.9
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:  # pragma: no cover
        raise RuntimeError(
            f"This torch ({torch.__version__}) cannot change allocator settings at run time: start the process with "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True instead."
        )
    setter(conf)
    _APPLIED.append(conf)


def expandable_segments_enabled() -> bool:
    """Whether CUDA's allocator creates expandable segments in this process.

    The allocator's live settings: those of ``PYTORCH_CUDA_ALLOC_CONF`` (or ``PYTORCH_ALLOC_CONF``) as the process
    started, or the last applied since (:func:`enable_expandable_segments`). On a torch that cannot report them
    (2.11), the environment with the settings applied since.

    Example:
        >>> import os
        >>> os.environ.get("PYTORCH_CUDA_ALLOC_CONF") is None and expandable_segments_enabled()
        False
    """
    conf = _live_allocator_settings()
    if conf is None:
        conf = ",".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
        conf = ",".join([conf, *_APPLIED])  # later entries win
    return _allocator_options(conf).get("expandable_segments", "").lower() == "true"


def enable_expandable_segments() -> bool:
    """Turn on CUDA's expandable segments for the rest of the process; ``False`` if they were on already.

    Segments the allocator creates from now on grow in place instead of being new blocks of fixed size, so a cache
    serving batches of many shapes stays within a few percent of what is allocated; memory already reserved keeps
    its segments. The same as starting the process with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, which
    is the better place to set it (it then covers the model's weights too). The probing callbacks call it through
    :meth:`CudaMemory.prepare`.

    Example:
        >>> was_on = expandable_segments_enabled()
        >>> enable_expandable_segments() is (not was_on), expandable_segments_enabled()
        (True, True)
        >>> if not was_on:  # the setting is process-wide: put it back for what runs next
        ...     _set_allocator_settings("expandable_segments:False")
    """
    if expandable_segments_enabled():
        return False
    _set_allocator_settings("expandable_segments:True")
    return True


def _memory_fraction(device: torch.device) -> float:
    """The allocator's per-process memory fraction on ``device`` (1.0 on a torch that cannot report it).

    The one read of it: ``torch.cuda.get_per_process_memory_fraction`` (torch >= 2.8); a test fails if it moves.
    """
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return 1.0 if getter is None else float(getter(_cuda_index(device)))


def _cuda_index(device: torch.device) -> int:
    """``device``'s index (``cuda`` without one: the current device), as torch's memory-fraction functions need."""
    return device.index if device.index is not None else torch.cuda.current_device()


class DeviceMemory:
    """How a device's memory is read: override it to probe another device, or to fake one in tests.

    A probe runs inside :meth:`tracking` and reads :meth:`peak` after it; :meth:`release` runs after each probe.
    The base class is an interface; :class:`CudaMemory` is the default implementation.

    Example:
        >>> memory = SavedTensorsMemory(capacity=2**20)  # a DeviceMemory that estimates, on any device
        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> with memory.tracking(torch.device("cpu")):
        ...     (x.exp() * 2).sum().backward()
        >>> memory.peak(torch.device("cpu"))  # bytes saved for backward: exp's output, 64 x 64 fp32
        16384
    """

    def check(self, device: torch.device) -> None:
        """Raise if this reader cannot measure ``device``."""
        raise NotImplementedError

    def capacity(self, device: torch.device) -> int:
        """Bytes this process can use on ``device``."""
        raise NotImplementedError

    def current(self, device: torch.device) -> int:
        """Bytes allocated now (weights, optimizer state; gradients where they exist)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def limited(self, device: torch.device, limit: float) -> Iterator[None]:
        """Run the block as on a device of ``limit`` bytes, where the reader can (default: unchanged)."""
        yield

    @contextlib.contextmanager
    def tracking(self, device: torch.device) -> Iterator[None]:
        """Measure the peak of what runs inside."""
        raise NotImplementedError
        yield  # pragma: no cover

    def peak(self, device: torch.device) -> int:
        """Peak bytes of the last :meth:`tracking` block; inside the block, the peak so far.

        :class:`~lightning_txopt.callbacks.StepProber` reads it after every step of a probe, to stop a probe that is
        already over its limit and to know which batch set the peak.
        """
        raise NotImplementedError

    def release(self, device: torch.device) -> None:
        """Give cached memory back after a probe (an out-of-memory one included)."""

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the probe ran out of memory (default: :func:`is_out_of_memory`)."""
        return is_out_of_memory(error)

    def prepare(self, device: torch.device) -> str | None:
        """Set up ``device`` for measurements that hold in training; what was changed, for the log (default: none).

        Called by the probing callbacks in ``setup``, before the model moves to the device.
        """
        return None

    def advice(self) -> str | None:
        """A warning for the user about what the measurement cannot cover here (default: none)."""
        return None


class CudaMemory(DeviceMemory):
    """CUDA's caching allocator: peak allocated (or reserved) bytes, against the memory this process can use.

    Capacity is ``free + reserved`` (``torch.cuda.mem_get_info`` plus what PyTorch's allocator already holds): the
    device's total minus other processes, the CUDA context and allocations outside PyTorch (NCCL buffers).

    By default (``enforce_limit=True``) every probe runs on an allocator capped at the limit
    (``torch.cuda.set_per_process_memory_fraction``, the previous fraction restored after): a probe fits if its
    steps run on a device of the limit's size, the allocator's fragmentation and its own retry (emptying its cache
    when an allocation fails) included, and runs out of memory otherwise. Its peak is
    ``torch.cuda.max_memory_allocated``, which the search uses to aim. Neither counter alone is the answer,
    measured on an H200:

    * the *allocated* peak misses fragmentation: a Llama-shape model with a 128k vocabulary (24 GiB logits) whose
      probes peaked at 124.6 GiB allocated (within 0.9 of 139.3 GiB) reserved 136.6 GiB in training and ran out of
      memory at its second step;
    * the *reserved* peak counts cached blocks the allocator would have given back: BERT-base packed at 319,488
      tokens reserved 126.6 GiB (over the 125.4 GiB limit) while it needs 80.7 GiB allocated at 314,880, so the
      search stopped at 0.65x what fits.

    ``enforce_limit=False`` compares the chosen counter with the limit instead (``peak="reserved"`` is then the safe
    one; ``peak="allocated"`` is safe with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, little
    fragmentation). The margin ``1 - max_memory_fraction`` covers what later steps add: batches of other shapes, a
    cache fragmented by many steps. Probing resets CUDA's process-wide peak counters; :meth:`release` (after each
    probe: the cache emptied) resets them once more, so that a peak read after training is the run's, not the
    probes'.

    **Expandable segments.** A budget that fits the probes fits training only if the allocator's cache does not
    fragment over the many steps of different shapes that follow, which the default allocator does: on an H200 a
    Llama-shape model with a 128k vocabulary held 116.9 GiB and reserved 138.2 GiB at its third step, and ran out
    of memory at the budget its probes fitted in 0.9 of the device. With expandable segments the three measured
    models (BERT-base bucketed and packed, that Llama shape) trained 3 epochs at their found budgets, reserving
    0.5-4.1% more than they allocated. So :meth:`prepare` (``expandable_segments=True``, the default) turns them on
    for the rest of the process when they are off (:func:`enable_expandable_segments`, logged), in the probing
    callbacks' ``setup``.
    Starting the process with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` does the same and covers the
    weights too. ``expandable_segments=False`` leaves the allocator as it is, with a warning (:meth:`advice`).

    Args:
        peak: ``"allocated"`` or ``"reserved"``: the counter a probe reports.
        enforce_limit: Run each probe on an allocator capped at the limit.
        expandable_segments: Turn on CUDA's expandable segments in :meth:`prepare` when they are off.

    Raises:
        ValueError: On another ``peak``, or an ``enforce_limit`` or ``expandable_segments`` that is not a bool.

    Example:
        >>> memory = CudaMemory()
        >>> memory.peak_kind, memory.enforce_limit, memory.expandable_segments
        ('allocated', True, True)
    """

    def __init__(
        self,
        peak: Literal["reserved", "allocated"] = "allocated",
        enforce_limit: bool = True,
        expandable_segments: bool = True,
    ) -> None:
        if peak not in ("reserved", "allocated"):
            raise ValueError(f"`peak` must be 'reserved' or 'allocated', got {peak!r}.")
        for name, value in (("enforce_limit", enforce_limit), ("expandable_segments", expandable_segments)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be a bool, got {value!r}.")
        self.peak_kind = peak
        self.enforce_limit = enforce_limit
        self.expandable_segments = expandable_segments

    def check(self, device: torch.device) -> None:
        """Raise unless ``device`` is a CUDA device.

        Raises:
            RuntimeError: If ``device`` is not a CUDA device.
        """
        if device.type != "cuda":
            raise RuntimeError(
                f"Probing memory needs a CUDA device: the model is on {str(device)!r}. On this device set the "
                "budget by hand (BucketDataModule(max_tokens=<int>)), or pass memory=SavedTensorsMemory(capacity) "
                "for an estimate (tests and demos only)."
            )

    def capacity(self, device: torch.device) -> int:
        """``free + reserved`` bytes of ``device``."""
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))

    def current(self, device: torch.device) -> int:
        """``torch.cuda.memory_reserved`` (or ``memory_allocated``)."""
        if self.peak_kind == "reserved":
            return int(torch.cuda.memory_reserved(device))
        return int(torch.cuda.memory_allocated(device))

    def prepare(self, device: torch.device) -> str | None:
        """On a CUDA device, turn on expandable segments if they are off (with ``expandable_segments``)."""
        if device.type != "cuda" or not self.expandable_segments or not enable_expandable_segments():
            return None
        return (
            "turned on CUDA's expandable segments for the rest of this process, so that the allocator's cache does "
            "not fragment past the found budget over training's many batch shapes (CudaMemory explains it). Start "
            "the process with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to set it yourself (it then covers "
            "the weights too), or pass memory=CudaMemory(expandable_segments=False) to keep the allocator as it is."
        )

    def advice(self) -> str | None:
        """Without expandable segments, a warning: fragmentation over many steps can exceed the margin."""
        if expandable_segments_enabled():
            return None
        return (
            "CUDA's allocator runs without expandable segments: over many steps of different shapes its cache can "
            "fragment beyond what the probes meet and beyond the margin 1 - max_memory_fraction (measured on an "
            "H200: a Llama-shape model with a 128k vocabulary held 116.9 GiB and reserved 138.2 GiB at its third "
            "step, and ran out of memory at the budget its probes fitted in 0.9 of the device). Keep "
            "CudaMemory(expandable_segments=True) (the default), start the process with "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or lower max_memory_fraction."
        )

    @contextlib.contextmanager
    def limited(self, device: torch.device, limit: float) -> Iterator[None]:
        """Cap this process's allocator at ``limit`` bytes inside the block (with ``enforce_limit``).

        Uses ``torch.cuda.set_per_process_memory_fraction`` (a fraction of the device's total memory) and restores the
        fraction in force before, also on errors.
        """
        if not self.enforce_limit:
            yield
            return
        index = _cuda_index(device)
        total = torch.cuda.get_device_properties(index).total_memory
        before = _memory_fraction(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, float(limit) / total)), index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(before, index)

    @contextlib.contextmanager
    def tracking(self, device: torch.device) -> Iterator[None]:
        """Reset CUDA's peak counter, run the block, wait for the device."""
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        torch.cuda.synchronize(device)

    def peak(self, device: torch.device) -> int:
        """``torch.cuda.max_memory_reserved`` (or ``max_memory_allocated``) since :meth:`tracking` started."""
        if self.peak_kind == "reserved":
            return int(torch.cuda.max_memory_reserved(device))
        return int(torch.cuda.max_memory_allocated(device))

    def release(self, device: torch.device) -> None:
        """Collect garbage, empty the allocator's cache, reset the peak counter."""
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class SavedTensorsMemory(DeviceMemory):
    """An *estimate* for any device (CPU tests and demos): the bytes of tensors autograd saves for backward.

    Inside :meth:`tracking`, every tensor saved for backward is counted once per storage (parameters excluded) while
    it is alive; the peak is the largest total. That is the activation memory, the part that grows with the token
    budget and shrinks with checkpointing (tensors saved inside checkpointed blocks go to the checkpoint, not here).
    Weights, gradients, optimizer state and temporaries are not counted, so ``capacity`` is an activation budget.
    Past ``capacity`` it raises ``torch.OutOfMemoryError`` like a device would (``simulate_oom=False`` turns that
    off). Never use it to size a real device: use :class:`CudaMemory`.

    Args:
        capacity: Activation bytes the pretend device holds.
        simulate_oom: Raise ``torch.OutOfMemoryError`` when the live saved bytes exceed ``capacity``.

    Raises:
        ValueError: If ``capacity`` is not a positive integer.

    Example:
        >>> memory = SavedTensorsMemory(capacity=2**20)
        >>> layer = torch.nn.Linear(256, 256)
        >>> with memory.tracking(torch.device("cpu")):
        ...     layer(torch.ones(8, 256)).sum().backward()
        >>> memory.peak(torch.device("cpu"))  # the layer's input, 8 x 256 fp32 (its weight is not counted)
        8192
    """

    def __init__(self, capacity: int, *, simulate_oom: bool = True) -> None:
        self._capacity = _positive_int("capacity", capacity)
        self.simulate_oom = simulate_oom
        self._live = 0
        self._peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live saved tensors]
        self._generation = 0

    def check(self, device: torch.device) -> None:
        """Any device: this is an estimate."""

    def capacity(self, device: torch.device) -> int:
        """The ``capacity`` given."""
        return self._capacity

    def current(self, device: torch.device) -> int:
        """0: weights and optimizer state are not counted."""
        return 0

    def _forget(self, generation: int, key: int) -> None:
        if generation != self._generation or key not in self._storages:
            return  # a tensor of an earlier tracking block
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._live -= entry[0]
            del self._storages[key]

    @staticmethod
    def _is_parameter(tensor: torch.Tensor, key: int) -> bool:
        """A leaf that requires grad (a parameter), or a view of one (``weight.t()`` saved by ``addmm``)."""
        if tensor.is_leaf:
            return tensor.requires_grad
        for fn, _ in getattr(tensor.grad_fn, "next_functions", ()):
            leaf = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() == key:
                return True
        return False

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or self._is_parameter(tensor, key):  # no storage (meta, empty), or weights
            return tensor
        entry = self._storages.setdefault(key, [int(storage.nbytes()), 0])
        if entry[1] == 0:
            self._live += entry[0]
        entry[1] += 1
        weakref.finalize(tensor, self._forget, self._generation, key)
        self._peak = max(self._peak, self._live)
        if self.simulate_oom and self._live > self._capacity:
            raise torch.OutOfMemoryError(
                f"Simulated out of memory (SavedTensorsMemory): {self._live:,} bytes saved for backward > capacity "
                f"{self._capacity:,}."
            )
        return tensor

    @contextlib.contextmanager
    def tracking(self, device: torch.device) -> Iterator[None]:
        """Count the tensors saved for backward inside the block."""
        self._generation += 1
        self._live, self._peak, self._storages = 0, 0, {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    def peak(self, device: torch.device) -> int:
        """Largest live total of the last :meth:`tracking` block."""
        return self._peak

    def release(self, device: torch.device) -> None:
        """Collect garbage (the graph of an interrupted step)."""
        gc.collect()

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn: no live bookkeeping travels
        state = dict(self.__dict__)
        state.update(_live=0, _peak=0, _storages={})
        return state


# ---------------------------------------------------------------------------------------------- explained OOM
def _tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("batch", batch)]
    if isinstance(batch, Mapping):
        return [(str(k), v) for k, v in batch.items() if isinstance(v, torch.Tensor)]
    if isinstance(batch, list | tuple):
        return [(f"batch[{i}]", v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]
    return []


def _describe_batch(batch: Any) -> str:
    tensors = _tensors(batch)
    if not tensors:
        return f"a batch of type {type(batch).__name__}"
    named = dict(tensors)
    key, ids = next(
        ((k, named[k]) for k in ("input_ids", "inputs_embeds") if k in named),
        next(((k, v) for k, v in tensors if v.dim() >= 2 and not v.is_floating_point()), tensors[0]),
    )
    shape = tuple(ids.shape[:2]) if key == "inputs_embeds" else tuple(ids.shape)
    padded = math.prod(shape)
    text = f"a batch of shape {shape} ({key}): {padded:,} padded tokens"
    real: int | None = None
    try:  # the device is out of memory: reading a count may fail too
        mask = named.get("attention_mask")
        if mask is not None and tuple(mask.shape) == shape:
            real = int(mask.sum())
        elif "cu_seq_lens" in named:
            real = int(named["cu_seq_lens"][-1])
    except RuntimeError:
        real = None
    if real is not None and padded:
        text += f", {real:,} real ({1 - real / padded:.0%} padding)"
    return text


def _device_line(batch: Any) -> str:
    devices = {t.device for _, t in _tensors(batch)}
    device = next((d for d in devices if d.type == "cuda"), None)
    if device is None:
        return ""
    try:
        total = torch.cuda.get_device_properties(device).total_memory
        return (
            f" Device {device}: {torch.cuda.memory_allocated(device) / GiB:.2f} GiB allocated, "
            f"{torch.cuda.memory_reserved(device) / GiB:.2f} GiB reserved of {total / GiB:.2f} GiB; peak "
            f"{torch.cuda.max_memory_allocated(device) / GiB:.2f} GiB."
        )
    except RuntimeError:
        return ""


def explain_out_of_memory(
    error: BaseException, batch: Any = None, *, max_tokens: int | str | None = None, where: str = "training step"
) -> torch.OutOfMemoryError:
    """An out-of-memory error that says which batch ran out of memory and what to do; raise it ``from error``.

    The message gives the batch's shape (``input_ids`` or the first integer matrix), its padded and real tokens, the
    token budget in force, the device's memory, then the remedies: :class:`~lightning_txopt.callbacks.TokenBudgetFinder`
    (``BucketDataModule(max_tokens="auto")``), a lower ``max_tokens``, or gradient checkpointing; and the original
    message. The result is a ``torch.OutOfMemoryError``, so code that catches out-of-memory errors still does.

    Args:
        error: The out-of-memory error caught.
        batch: The batch being processed (a mapping of tensors, a tensor or a sequence of tensors).
        max_tokens: The token budget in force (``None``: batches by sample count).
        where: What ran out of memory (``"training step"``, ``"backward pass"``, ...).

    Returns:
        A ``torch.OutOfMemoryError`` with the explanation.

    Example:
        >>> batch = {"input_ids": torch.zeros(32, 512, dtype=torch.long), "attention_mask": torch.ones(32, 512)}
        >>> err = explain_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), batch, max_tokens=16384)
        >>> print(str(err).splitlines()[0][:82])
        Out of memory in a training step on a batch of shape (32, 512) (input_ids): 16,384
        >>> "max_tokens=16384" in str(err) and "TokenBudgetFinder" in str(err)
        True
    """
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        budget = f"under the token budget max_tokens={max_tokens}"
        lower = max(64, int(max_tokens * 0.75) // 64 * 64)
        lower_hint = f"lower max_tokens (e.g. {lower}, three quarters of it);"
    elif max_tokens is None:
        budget = "with batches of a fixed sample count (no token budget)"
        lower_hint = "batch by tokens instead of samples (BucketDataModule(max_tokens=...)) or lower batch_size;"
    else:
        budget = f"under the token budget max_tokens={max_tokens!r}"
        lower_hint = "lower max_tokens;"
    original = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    message = (
        f"Out of memory in a {where} on {_describe_batch(batch)}, {budget}.{_device_line(batch)}\n"
        "What to do: let TokenBudgetFinder find the largest budget that fits (BucketDataModule(max_tokens='auto') "
        f"and Trainer(callbacks=[TokenBudgetFinder()])); or {lower_hint} or recompute activations "
        "(Trainer(callbacks=[GradientCheckpointing()]), slower steps for much less activation memory).\n"
        f"Original error: {original}"
    )
    explained = torch.OutOfMemoryError(message)
    setattr(explained, _EXPLAINED, True)
    return explained


@contextlib.contextmanager
def explaining_out_of_memory(
    batch: Any, *, max_tokens: int | str | None = None, where: str = "training step"
) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as :func:`explain_out_of_memory` explains it.

    An error already explained passes through unchanged; other errors are not touched.

    Args:
        batch: The batch being processed.
        max_tokens: The token budget in force.
        where: What runs inside (``"training step"``, ``"backward pass"``, ...).

    Raises:
        torch.OutOfMemoryError: The explained error, ``from`` the original.

    Example:
        >>> try:
        ...     with explaining_out_of_memory(torch.zeros(4, 8, dtype=torch.long), max_tokens=32):
        ...         raise torch.OutOfMemoryError("CUDA out of memory.")
        ... except torch.OutOfMemoryError as err:
        ...     print(str(err).split(":")[0])
        Out of memory in a training step on a batch of shape (4, 8) (batch)
    """
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error) or getattr(error, _EXPLAINED, False):
            raise
        raise explain_out_of_memory(error, batch, max_tokens=max_tokens, where=where) from error

"""Argument checks shared by every public class: one wording for each rule, one place to change it."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_exactly_one_budget", "check_positive_int", "round_up"]


def check_positive_int(name: str, value: Any, *, optional: bool = False, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= minimum`` (``None`` allowed with ``optional``).

    Booleans are refused even though ``bool`` subclasses ``int``; numpy integers are accepted.

    Raises:
        ValueError: Naming the argument and quoting the bad value.

    Example:
        >>> check_positive_int("batch_size", 8)
        >>> check_positive_int("batch_size", 0)
        Traceback (most recent call last):
        ...
        ValueError: `batch_size` must be a positive integer, got 0.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {what}{' or None' if optional else ''}, got {value!r}.")


def check_exactly_one_budget(batch_size: Any, max_tokens: Any) -> None:
    """Raise ``ValueError`` unless exactly one of ``batch_size`` (samples) and ``max_tokens`` (tokens) is given.

    Raises:
        ValueError: Quoting both values.

    Example:
        >>> check_exactly_one_budget(None, 4096)
        >>> check_exactly_one_budget(8, 4096)
        Traceback (most recent call last):
        ...
        ValueError: Give exactly one of `batch_size` and `max_tokens` (got batch_size=8, max_tokens=4096): ...
    """
    if (batch_size is None) == (max_tokens is None):
        raise ValueError(
            f"Give exactly one of `batch_size` and `max_tokens` (got batch_size={batch_size!r}, "
            f"max_tokens={max_tokens!r}): batches hold either a number of samples or a budget of padded tokens."
        )


def round_up(values: Any, multiple: int | None) -> np.ndarray:
    """Round each value up to a multiple of ``multiple`` (unchanged when it is ``None`` or 0).

    Example:
        >>> round_up([3, 8, 9], 8).tolist()
        [8, 8, 16]
    """
    arr = np.asarray(values, dtype=np.int64)
    if not multiple:
        return arr
    return -(-arr // multiple) * multiple

"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.helpers import restoring_process_group


@pytest.fixture
def in_process_ddp() -> Iterator[None]:
    """Undo what an in-process ``strategy="ddp"`` run leaves behind (process group, rendezvous variables)."""
    with restoring_process_group():
        yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads each were 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

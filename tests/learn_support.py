"""Shared by the role-learning tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on 2 shared cores run many times faster single-threaded (thread
    hand-off dominates ops this small); the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Integration tests run real QEMU guests and dpdk-testpmd: every one of them is checked for leftovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_lab_leftovers(lab_guard: None) -> Iterator[None]:
    yield

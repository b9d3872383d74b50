"""Integration tests run real QEMU guests and dpdk-testpmd: every one of them is checked for leftovers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vhostmap.lab.guestimage import GuestImage, GuestImageMissing


@pytest.fixture(autouse=True)
def _no_lab_leftovers(lab_guard: None) -> Iterator[None]:
    yield


@pytest.fixture(scope="session")
def python_image() -> GuestImage:
    """The Python guest image, built (or brought up to date) by scripts/guest-image."""
    try:
        return GuestImage.ensure()
    except GuestImageMissing as e:
        pytest.fail(f"cannot build the Python guest image: {e}")

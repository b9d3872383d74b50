"""How a generating port lays its frames over slots (forwarding/source.py frame_slots): whole frames around
the ring, within the slots' capacity, the bytes spread evenly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.forwarding.source import frame_slots


@given(
    length=st.integers(1, 65535 + 12),
    cap=st.sampled_from([2048, 4096, 65535]),
    ring=st.sampled_from([64, 256, 1024, 1000]),
)
def test_a_frame_takes_a_divisor_of_the_ring_and_fits_its_slots(length: int, cap: int, ring: int) -> None:
    need = -(-length // cap)
    try:
        lens = frame_slots(length, cap, ring)
    except ValueError:
        assert not any(ring % d == 0 for d in range(need, ring // 2 + 1))  # no whole number of frames fits
        return
    assert sum(lens) == length and ring % len(lens) == 0 and len(lens) <= ring // 2
    assert max(lens) <= cap and min(lens) >= 1 and max(lens) - min(lens) <= 1


def test_a_64k_frame_takes_32_slots_of_a_1024_slot_ring() -> None:
    assert frame_slots(64012, 2048, 1024) == [2001] * 12 + [2000] * 20
    with pytest.raises(ValueError, match="takes 32 slots of 2048 bytes; the ring has 32"):
        frame_slots(64012, 2048, 32)

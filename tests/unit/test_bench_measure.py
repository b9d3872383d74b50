"""scripts/bench's measurement of one run (vhostmap.lab.bench.measure) over scripted counters."""

from __future__ import annotations

import itertools

import pytest

from vhostmap.lab.bench import measure


@pytest.mark.parametrize(
    ("samples", "busy"),
    [
        # idle ns, clock ns, rounds: 250 of 1000 ns idle -> 75% busy.
        ([(0, 0, 0), (250, 1000, 10)], 0.75),
        # More idle booked than time passed (a pass descheduled across the first sample): not measurable.
        ([(0, 0, 0), (1270, 1000, 10)], None),
    ],
)
def test_the_datapath_busy_share_is_measured_or_said_to_be_unknown(
    samples: list[tuple[int, int, int]], busy: float | None
) -> None:
    packets = itertools.count(1000, 1000)
    loads = iter(samples)
    rate = measure(lambda: next(packets), 0.01, 0.0, lambda: None, lambda: next(loads))
    assert rate.busy == busy
    assert rate.value > 0

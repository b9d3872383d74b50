"""scripts/bench's measurement of one run (vhostmap.lab.bench.measure) over scripted counters."""

from __future__ import annotations

import itertools
import statistics

import pytest

from vhostmap.lab.bench import WINDOW, CoreProbes, measure


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


def test_a_probe_cuts_the_interval_into_windows_each_between_two_probes() -> None:
    """With a probe, the interval is cut into windows of about WINDOW seconds; each window's rate is its own
    packets over its own time, the probes chain (one window's after is the next one's before), and the run's
    rate is every window's packets over their time together."""
    packets = itertools.count(0, 1_000_000)
    probes = iter([70.0, 80.0, 330.0, 320.0])
    calls: list[str] = []

    def probe() -> float:
        calls.append("probe")
        return next(probes)

    rate = measure(lambda: next(packets), 3 * WINDOW, 0.0, lambda: None, probe=probe)
    assert [w.cores for w in rate.windows] == [
        CoreProbes(70.0, 80.0),
        CoreProbes(80.0, 330.0),
        CoreProbes(330.0, 320.0),
    ]
    assert calls == ["probe"] * 4
    # Each window reads the counter twice, so each moved by 1e6 packets in about WINDOW seconds.
    for w in rate.windows:
        assert w.rate == pytest.approx(1 / WINDOW, rel=0.5)
    assert rate.value == pytest.approx(statistics.mean(w.rate for w in rate.windows), rel=0.05)
    # Without a probe: one window, none recorded.
    assert measure(lambda: next(packets), 0.01, 0.0, lambda: None).windows == ()

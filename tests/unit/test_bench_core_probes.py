"""scripts/bench's core probes (vhostmap.lab.bench) over made-up numbers: which probes agree, which rounds'
ratios count as matched, and what the table and the JSON say about them."""

from __future__ import annotations

import pytest

from vhostmap.lab.bench import (
    CORE_MATCH_FACTOR,
    CORE_STATE_GAP,
    CoreProbes,
    CoreStates,
    Rate,
    Series,
    Settings,
    Window,
    core_range,
    core_states,
    matched_baseline_ratios,
    matched_ratios,
    probes_agree,
    report,
    state_baseline_ratios,
    state_ratios,
    table,
)

NEAR, FAR = 100.0, 200.0  # ns: the lab's two states


def series(backend: str, runs: list[tuple[float | None, CoreProbes]], scenario: str = "P1") -> Series:
    """A series of ``backend`` at 64 bytes with these runs' rates (None: failed) and core probes."""
    s = Series(scenario, 64, backend)
    for rate, cores in runs:
        s.record(Rate(rate) if rate is not None else None, "" if rate else "failed", cores)
    return s


@pytest.mark.parametrize(
    ("probes", "agree"),
    [
        ([NEAR, NEAR * 1.1, NEAR * 1.3, NEAR], True),  # the factor itself is within
        ([NEAR, NEAR, NEAR * 1.31, NEAR], False),
        ([FAR, FAR * 0.9, FAR, FAR], True),
        ([NEAR, FAR, NEAR, NEAR], False),  # the machine moved during the pair
        ([NEAR, None, NEAR, NEAR], False),  # a probe that failed proves nothing
        ([], False),
    ],
)
def test_probes_agree_within_the_factor_and_only_when_all_were_measured(
    probes: list[float | None], agree: bool
) -> None:
    assert CORE_MATCH_FACTOR == 1.3
    assert probes_agree(probes) is agree


def test_only_rounds_whose_four_probes_agree_are_matched() -> None:
    ours = series(
        "vhostmap",
        [
            (10.0, CoreProbes(NEAR, NEAR)),  # round 1: all near, DPDK too
            (5.0, CoreProbes(FAR, FAR)),  # round 2: ours far, DPDK's near: not comparable
            (6.0, CoreProbes(FAR, FAR * 1.1)),  # round 3: all far
            (None, CoreProbes(NEAR, NEAR)),  # round 4: ours failed: no pair
            (9.0, CoreProbes(NEAR, FAR)),  # round 5: moved during our run
        ],
    )
    dpdk = series(
        "dpdk",
        [
            (8.0, CoreProbes(NEAR * 1.1, NEAR)),
            (8.0, CoreProbes(NEAR, NEAR)),
            (4.0, CoreProbes(FAR, FAR)),
            (8.0, CoreProbes(NEAR, NEAR)),
            (8.0, CoreProbes(NEAR, NEAR)),
        ],
    )
    m = matched_ratios([ours, dpdk])[("P1", 64, "vhostmap")]
    assert m.rounds == [1, 3]
    assert m.ratios == [pytest.approx(10 / 8), pytest.approx(6 / 4)]
    assert m.pairs == 4  # rounds 1, 2, 3 and 5: both back-ends measured
    assert m.median == pytest.approx((10 / 8 + 6 / 4) / 2)
    assert core_range(ours) == (NEAR, FAR * 1.1)
    assert ("P1", 64, "dpdk") not in matched_ratios([ours, dpdk])  # DPDK is the reference, not compared


def test_a_machine_that_moved_in_every_round_matches_none() -> None:
    ours = series("vhostmap", [(10.0, CoreProbes(NEAR, NEAR)), (5.0, CoreProbes(FAR, FAR))])
    dpdk = series("dpdk", [(8.0, CoreProbes(FAR, FAR)), (8.0, CoreProbes(NEAR, NEAR))])
    m = matched_ratios([ours, dpdk])[("P1", 64, "vhostmap")]
    assert (m.rounds, m.ratios, m.pairs, m.median) == ([], [], 2, None)
    out = table([ours, dpdk], runs=2)
    assert "matched 0/2 (core probes within 1.3x): n/a" in out


def test_runs_without_probes_match_nothing() -> None:
    # A series filled without probes (CoreProbes(None, None), as record() does by default).
    ours, dpdk = Series("P1", 64, "vhostmap"), Series("P1", 64, "dpdk")
    ours.record(Rate(10.0))
    dpdk.record(Rate(8.0))
    assert matched_ratios([ours, dpdk])[("P1", 64, "vhostmap")].pairs == 1
    assert matched_ratios([ours, dpdk])[("P1", 64, "vhostmap")].ratios == []
    assert core_range(ours) is None
    assert "core round trip" not in table([ours, dpdk], runs=1)  # nothing to show


def test_each_layout_is_matched_with_dpdk_over_the_same_layout() -> None:
    near = CoreProbes(NEAR, NEAR)
    results = [
        series("vhostmap", [(10.0, near)]),
        series("dpdk", [(5.0, near)]),
        series("vhostmap+packed", [(9.0, near)]),
        series("dpdk+packed", [(3.0, near)]),
    ]
    matched = matched_ratios(results)
    assert matched[("P1", 64, "vhostmap")].ratios == [pytest.approx(2.0)]
    assert matched[("P1", 64, "vhostmap+packed")].ratios == [pytest.approx(3.0)]


def test_the_table_and_the_report_show_the_probes_and_the_matched_ratio() -> None:
    ours = series(
        "vhostmap",
        [(10.0, CoreProbes(95.0, 97.0)), (5.0, CoreProbes(201.0, 190.0)), (11.0, CoreProbes(88.0, 90.0))],
    )
    dpdk = series(
        "dpdk",
        [(8.0, CoreProbes(96.0, 94.0)), (8.0, CoreProbes(92.0, 90.0)), (10.0, CoreProbes(90.0, 91.0))],
    )
    out = table([ours, dpdk], runs=3)
    print(out)  # shown with -s: the example in the report
    lines = out.splitlines()
    # Today's row, unchanged: the median ratio of all rounds and their range.
    assert lines[1].split()[-2:] == ["1.100", "0.62-1.25"]
    assert "core round trip per run (ns, before/after): 95/97 201/190 88/90, range 88-201" in out
    assert "core round trip per run (ns, before/after): 96/94 92/90 90/91, range 90-96" in out
    assert "matched 2/3 (core probes within 1.3x): 1.175x median, rounds 1,3: 1.25 1.10" in out
    assert out.count("matched") == 1  # not under DPDK's row
    got = report(Settings(), [ours, dpdk], interrupted=False)
    assert got["core_probe"] == {
        "cpus": [0, 1],
        "samples": 5,
        "round_trips": 4000,
        "match_factor": 1.3,
        "states": {"near_max": 97.0, "far_min": 190.0},
    }
    ours_entry, dpdk_entry = got["results"]
    assert ours_entry["core_round_trip_ns"][1] == {"before": 201.0, "after": 190.0}
    assert ours_entry["matched_rounds"] == [1, 3]
    assert ours_entry["matched_round_ratios"] == [pytest.approx(1.25), pytest.approx(1.1)]
    assert ours_entry["matched_ratio_to_dpdk"] == pytest.approx(1.175)
    assert ours_entry["ratio_to_dpdk"] == pytest.approx(1.1)  # all rounds, as before
    assert dpdk_entry["core_round_trip_ns"][0] == {"before": 96.0, "after": 94.0}
    assert "matched_rounds" not in dpdk_entry


def test_the_ratio_over_the_baseline_is_matched_too() -> None:
    near, far = CoreProbes(NEAR, NEAR), CoreProbes(FAR, FAR)
    results = [
        series("vhostmap-link", [(10.0, near), (9.0, far), (5.0, far)]),
        series("vhostmap-link@baseline", [(8.0, near), (4.5, near), (4.0, far)]),
        series("dpdk", [(8.0, near), (8.0, near), (4.0, far)], scenario="P1"),
    ]
    m = matched_baseline_ratios(results)[("P1", 64, "vhostmap-link")]
    assert m.rounds == [1, 3]  # round 2: this tree far, the baseline near
    assert m.ratios == [pytest.approx(10 / 8), pytest.approx(5 / 4)]
    assert ("P1", 64, "vhostmap-link@baseline") not in matched_baseline_ratios(results)  # it has no twin
    out = table(results, runs=3)
    assert "over the baseline: 1.250x median, per round 1.25 2.00 1.25" in out
    assert "over the baseline, matched 2/3: 1.250x median, rounds 1,3: 1.25 1.25" in out
    entry = report(Settings(), results, interrupted=False)["results"][0]
    assert entry["matched_baseline_rounds"] == [1, 3]
    assert entry["matched_ratio_to_baseline"] == pytest.approx(1.25)


def test_the_probes_of_an_invocation_split_into_near_and_far_at_their_widest_gap() -> None:
    assert CORE_STATE_GAP == 1.5
    results = [
        series("vhostmap", [(10.0, CoreProbes(70.0, 92.0)), (5.0, CoreProbes(301.0, 330.0))]),
        series("dpdk", [(8.0, CoreProbes(81.0, 88.0)), (4.0, CoreProbes(318.0, 76.0))]),
    ]
    states = core_states(results)
    assert states == CoreStates(92.0, 301.0)
    assert states.of(CoreProbes(70.0, 92.0)) == "near"
    assert states.of(CoreProbes(301.0, 330.0)) == "far"
    assert states.of(CoreProbes(318.0, 76.0)) is None  # moved during the run
    assert states.of(CoreProbes(None, 76.0)) is None
    # One state only (the widest gap below the factor): no split, and no line for it.
    calm = [
        series("vhostmap", [(10.0, CoreProbes(80.0, 100.0))]),
        series("dpdk", [(8.0, CoreProbes(90.0, 110.0))]),
    ]
    assert core_states(calm) is None
    assert state_ratios(calm) == {}
    assert "by core state" not in table(calm, runs=1)


def test_runs_are_pooled_by_core_state_whatever_their_round() -> None:
    near, far = CoreProbes(NEAR, NEAR * 1.1), CoreProbes(FAR * 1.5, FAR * 1.6)
    results = [
        # Round 1 ours near / DPDK far, round 2 the other way round: no round matches, both states compare.
        series("vhostmap-link", [(12.0, near), (5.0, far), (14.0, near), (None, near)]),
        series("vhostmap-link@baseline", [(10.0, near), (10.0, near), (4.0, far), (11.0, near)]),
        series("dpdk", [(10.0, far), (20.0, near), (22.0, near), (9.0, far)]),
    ]
    assert matched_ratios(results)[("P1", 64, "vhostmap-link")].ratios == [pytest.approx(14 / 22)]
    near_ratio, far_ratio = state_ratios(results)[("P1", 64, "vhostmap-link")]
    assert (near_ratio.state, near_ratio.ours, near_ratio.theirs, near_ratio.samples) == (
        "near",
        13.0,
        21.0,
        (2, 2),
    )
    assert (far_ratio.state, far_ratio.ours, far_ratio.theirs, far_ratio.samples) == ("far", 5.0, 9.5, (1, 2))
    assert near_ratio.ratio == pytest.approx(13 / 21)
    base_near, base_far = state_baseline_ratios(results)[("P1", 64, "vhostmap-link")]
    assert (base_near.ours, base_near.theirs, base_far.ours, base_far.theirs) == (13.0, 10.0, 5.0, 4.0)
    out = table(results, runs=4)
    assert (
        "by core state, to DPDK: near (<=110 ns) 13.000 against 21.000 = 0.619x (2 and 2 samples); "
        "far (>=300 ns) 5.000 against 9.500 = 0.526x (1 and 2 samples)" in out
    )
    assert (
        "over the baseline by core state: near (<=110 ns) 13.000 against 10.000 = 1.300x (2 and 3 samples)"
        in out
    )
    got = report(Settings(), results, interrupted=False)
    assert got["core_probe"]["states"] == {"near_max": pytest.approx(NEAR * 1.1), "far_min": 300.0}
    entry = got["results"][0]
    assert entry["state_ratios_to_dpdk"]["near"] == {
        "median": 13.0,
        "reference_median": 21.0,
        "ratio": pytest.approx(13 / 21),
        "samples": [2, 2],
    }
    assert entry["state_ratios_to_baseline"]["far"]["ratio"] == pytest.approx(5 / 4)


def test_a_run_with_windows_is_pooled_window_by_window() -> None:
    """A run that began near and went far (the probes around it both near) counts in each state with the
    windows it spent there; the probes of the windows take part in the split into states."""
    near, far = CoreProbes(NEAR, NEAR), CoreProbes(FAR * 1.5, FAR * 1.5)
    moved = Rate(
        9.0,
        windows=(
            Window(14.0, near),
            Window(13.0, CoreProbes(NEAR, FAR * 1.5)),  # moved during this one: neither state
            Window(5.0, far),
            Window(4.0, CoreProbes(FAR * 1.5, NEAR)),
        ),
    )
    ours = Series("P3", 64, "vhostmap-link")
    ours.record(moved, cores=CoreProbes(NEAR, NEAR))
    dpdk = Series("P3", 64, "dpdk")
    dpdk.record(Rate(12.0, windows=(Window(12.0, near), Window(10.0, near))), cores=near)
    dpdk.record(Rate(7.0), cores=far)  # no windows: the run counts whole
    results = [ours, dpdk]
    assert core_states(results) == CoreStates(NEAR, FAR * 1.5)
    assert list(ours.samples()) == [(w.rate, w.cores) for w in moved.windows]
    near_ratio, far_ratio = state_ratios(results)[("P3", 64, "vhostmap-link")]
    assert (near_ratio.ours, near_ratio.theirs, near_ratio.samples) == (14.0, 11.0, (1, 2))
    assert (far_ratio.ours, far_ratio.theirs, far_ratio.samples) == (5.0, 7.0, (1, 1))
    entry = report(Settings(), results, interrupted=False)["results"][0]
    assert entry["windows"][0][2] == {"rate": 5.0, "before": FAR * 1.5, "after": FAR * 1.5}

"""The core-to-core probe (datapath/cpuprobe.c through vhostmap.lab.corelatency): a round trip of one cache
line between two pinned threads, in ns; the same CPU twice works too (the threads take turns); a CPU that is
not online is refused, in Python with its number and the online ones, in C with EINVAL; the caller's own
affinity is left as it was."""

from __future__ import annotations

import errno
import math
import os

import pytest

from vhostmap.datapath import ffi, lib
from vhostmap.lab import corelatency
from vhostmap.system.cpu import online_cpus

MISSING = max(online_cpus()) + 1  # a CPU this machine does not have
two_cpus = pytest.mark.skipif(not {0, 1} <= online_cpus(), reason="needs CPUs 0 and 1 online")


@two_cpus
@pytest.mark.parametrize(("cpu_a", "cpu_b"), [(0, 1), (1, 0), (0, 0)])
def test_a_round_trip_between_two_cpus_takes_a_positive_finite_time(cpu_a: int, cpu_b: int) -> None:
    ns = corelatency.round_trip_ns(cpu_a, cpu_b, round_trips=500)
    assert math.isfinite(ns) and ns > 0
    # Even a context switch each way, the slowest case, is far below a millisecond.
    assert ns < 1e6


@two_cpus
def test_the_median_of_several_probes_is_one_of_them_in_range() -> None:
    ns = corelatency.median_round_trip_ns(0, 1, samples=3, round_trips=500)
    assert math.isfinite(ns) and 0 < ns < 1e6


def test_the_callers_affinity_is_left_alone() -> None:
    before = os.sched_getaffinity(0)
    corelatency.round_trip_ns(min(before), max(before), round_trips=100)
    assert os.sched_getaffinity(0) == before


def test_a_cpu_that_is_not_online_is_refused_by_number() -> None:
    with pytest.raises(ValueError, match=rf"probe CPU {MISSING} does not exist \(online CPUs: "):
        corelatency.round_trip_ns(0, MISSING)
    with pytest.raises(ValueError, match=rf"probe CPU {MISSING} does not exist"):
        corelatency.median_round_trip_ns(MISSING, 0)


@pytest.mark.parametrize(("cpu_a", "cpu_b"), [(-1, 0), (0, 1 << 20), (0, MISSING)])
def test_the_compiled_probe_refuses_a_cpu_it_cannot_pin_with_einval(cpu_a: int, cpu_b: int) -> None:
    # Below the Python check: a number outside cpu_set_t, or one pthread_create cannot pin a thread to. Both
    # orders: the answering thread (on cpu_b) starts first, so the second call also covers the way out when
    # it runs and the other thread cannot start (it must be released, or this would hang).
    ns = ffi.new("double *", -1.0)
    assert lib.vhu_cpu_round_trip(cpu_a, cpu_b, 100, ns) == errno.EINVAL
    assert lib.vhu_cpu_round_trip(cpu_b, cpu_a, 100, ns) == errno.EINVAL
    assert ns[0] == -1.0  # nothing written


def test_no_round_trips_is_refused() -> None:
    with pytest.raises(ValueError, match="round trips must be"):
        corelatency.round_trip_ns(0, 0, round_trips=0)
    assert lib.vhu_cpu_round_trip(0, 0, 0, ffi.new("double *")) == errno.EINVAL

"""How far apart two CPUs are: the round trip of one cache line between them, measured by the compiled probe
(vhostmap/datapath/cpuprobe.cdef).

On a VM the distance between two vCPUs is the host's business and changes while we run: on the lab's 2-vCPU
guest a round trip takes 60-90 ns at some moments (the vCPUs on cores that share a cache) and 300-340 ns
at others. Everything the front-end and the back-end exchange crosses that distance, so the
benchmark (`vhostmap.lab.bench`) probes it around every run and compares only runs made at the same one.
A probe takes a few milliseconds and needs both CPUs idle: a task busy on either one is measured too.
"""

from __future__ import annotations

import errno
import math
import os
import statistics

from vhostmap.datapath import ffi, lib
from vhostmap.system.cpu import check_cpu

# Round trips of one probe: 0.3-1.4 ms between the lab's vCPUs (60-340 ns each), nothing beside a run of
# seconds; a probe that a preemption spoiled is outvoted in the median of SAMPLES.
ROUND_TRIPS = 4000
# Probes that `median_round_trip_ns` takes: an odd number, so that the median is one of them.
SAMPLES = 5


def round_trip_ns(cpu_a: int, cpu_b: int, round_trips: int = ROUND_TRIPS) -> float:
    """The mean nanoseconds of one round trip of a cache line between a thread pinned to ``cpu_a`` and one
    pinned to ``cpu_b``, over ``round_trips`` of them (the calling thread's own affinity is left alone; the
    GIL is released meanwhile).

    ``cpu_a == cpu_b`` measures two context switches instead (the threads take turns on the CPU). ValueError
    for a CPU that is not online or a count below 1; OSError when the threads could not be started on them
    (a CPU outside this process's cpuset)."""
    check_cpu(cpu_a, "probe CPU")
    check_cpu(cpu_b, "probe CPU")
    if not 1 <= round_trips <= 0xFFFFFFFF:
        raise ValueError(f"round trips must be 1..{0xFFFFFFFF}, not {round_trips}")
    ns = ffi.new("double *")
    err = lib.vhu_cpu_round_trip(cpu_a, cpu_b, round_trips, ns)
    if err:
        raise OSError(err, f"cannot probe CPUs {cpu_a} and {cpu_b}: {os.strerror(err)}")
    if not (math.isfinite(ns[0]) and ns[0] > 0):  # the clock cannot stand still over a round trip
        raise OSError(errno.EIO, f"the probe of CPUs {cpu_a} and {cpu_b} measured {ns[0]} ns")
    return float(ns[0])


def median_round_trip_ns(
    cpu_a: int, cpu_b: int, samples: int = SAMPLES, round_trips: int = ROUND_TRIPS
) -> float:
    """The median of ``samples`` probes (`round_trip_ns`) of ``cpu_a`` and ``cpu_b``, each in fresh
    threads: one probe a preemption spoiled does not move it."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    return statistics.median(round_trip_ns(cpu_a, cpu_b, round_trips) for _ in range(samples))

"""CPUs: which are online, CPU lists in the kernel's notation, and pinning a thread to one.

Used by the datapath worker (``--cpu``), the control thread (``--control-cpu``), configuration checks and the
benchmark, which all refuse a CPU that is not online before anything starts.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ONLINE_CPUS = Path("/sys/devices/system/cpu/online")


def parse_cpu_list(text: str) -> set[int]:
    """A kernel CPU list (``0-3,6,8-9``, as in sysfs and /proc/PID/status) -> the set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus() -> set[int]:
    """The CPUs this machine has online (sysfs; the CPU count if sysfs is not there)."""
    try:
        return parse_cpu_list(ONLINE_CPUS.read_text())
    except (OSError, ValueError):
        return set(range(os.cpu_count() or 1))


def check_cpu(cpu: int, what: str = "CPU") -> None:
    """Raise ValueError, naming ``what``, unless ``cpu`` is an online CPU of this machine."""
    if isinstance(cpu, bool) or not isinstance(cpu, int):
        raise ValueError(f"{what} must be a CPU number, not {cpu!r}")
    online = online_cpus()
    if cpu not in online:
        raise ValueError(f"{what} {cpu} does not exist (online CPUs: {format_cpu_list(online)})")


def format_cpu_list(cpus: set[int]) -> str:
    """The set of CPU numbers as a kernel CPU list (``0-3,6``)."""
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


def pin_current_thread(cpu: int, what: str = "thread") -> None:
    """Pin the calling thread (not its whole process) to ``cpu``; OSError with a clear message if refused.

    Threads made by this thread afterwards inherit the pinning.
    """
    check_cpu(cpu, f"{what} CPU")
    try:
        os.sched_setaffinity(threading.get_native_id(), {cpu})
    except OSError as e:
        # Online but not ours to use: a cpuset or a container's CPU limit.
        raise OSError(e.errno, f"cannot pin the {what} to CPU {cpu}: {e.strerror}") from None

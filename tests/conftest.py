"""Fixtures every test may use: a short directory for UNIX sockets, the lab's guest kernel, and a guard
that fails a test which leaves QEMU or dpdk-testpmd processes, or testpmd hugepage files, behind."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from vhostmap.lab.guestkernel import GuestKernel, GuestKernelMissing
from vhostmap.lab.testpmd import DPDK_RUNTIME, HUGEPAGES

LAB_PROGRAMS = ("qemu-system-x86", "dpdk-testpmd")  # /proc comm names (at most 15 characters)

# The suite's hypothesis tests draw the same examples on every run: a run passes or fails whatever examples
# it happened to draw, never by luck (a randomized run once found a test bug a rerun would not have). New
# examples are the fuzz targets' job (scripts/fuzz differential drives the same strategies), or a run's with
# HYPOTHESIS_PROFILE=explore. Loaded here, before the test modules make their settings from it.
settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory under /tmp with a short path: UNIX socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vhm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The guest kernel and initramfs built by scripts/guest-kernel (skips the test if it never ran)."""
    try:
        return GuestKernel.from_cache()
    except GuestKernelMissing as e:
        pytest.skip(str(e))


def _lab_processes() -> dict[int, str]:
    """Live QEMU and testpmd processes descended from this pytest process, by pid."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ")".
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":
            parents[int(entry.name)], names[int(entry.name)] = int(ppid), comm
    mine = {}
    for pid, comm in names.items():
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != os.getpid():
            ancestor = parents.get(ancestor)
        if ancestor == os.getpid() and comm in LAB_PROGRAMS:
            mine[pid] = comm
    return mine


def _lab_files() -> list[Path]:
    """Hugepage files and DPDK runtime directories of testpmds this process started (default prefixes)."""
    prefix = f"vhm{os.getpid()}t"
    return sorted([*HUGEPAGES.glob(f"{prefix}*"), *DPDK_RUNTIME.glob(f"{prefix}*")])


@pytest.fixture
def lab_guard() -> Iterator[None]:
    """Fail the test if it leaves lab processes or hugepage files behind (and clean them up)."""
    yield
    processes, files = _lab_processes(), _lab_files()
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    for path in files:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if processes or files:
        pytest.fail(
            "the test left lab state behind (now removed): "
            + ", ".join([f"{comm} pid {pid}" for pid, comm in processes.items()] + [str(p) for p in files])
        )

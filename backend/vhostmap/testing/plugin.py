"""The pytest plugin (entry point ``pytest11: vhostmap``): fixtures that build labs of QEMU guests around a
vhostmap daemon, reports that show what went wrong inside them, and a sweep of killed sessions' leftovers.

Fixtures (each function-scoped; everything a test made is torn down after it, pass or fail):

``vhostmap_lab``
    The test's `Lab`: its directory, subnet (``.names.subnet``), MACs, and every object below.
``vhostmap``
    ``vhostmap(ports, links=(), switches=None)`` starts ``vhostmap serve`` (`Lab.vhostmap`).
``guest``
    ``guest(name, nics, image="busybox", cmdline="", share=None, ...)`` boots a QEMU guest with a NIC on each
    port (`Lab.guest`); ``guest.run(cmd)`` returns ``.rc`` and ``.output``. ``image`` is "busybox",
    "python" or an `ImageSpec` adding Debian packages, wheels and files (``vhostmap image build``).
``testpmd``
    ``testpmd(ports, forward_mode="io", ...)`` runs dpdk-testpmd on the given ports (`Lab.testpmd`).
``netns``
    ``netns(name=None, address=None, tap=None)``: a namespace behind a veth, for a generic port, or around
    a port's TAP (`Lab.netns`).
``topology``
    ``topology(spec)`` builds a whole lab from a dict or TOML file (`vhostmap.testing.topology`).

When a test fails (in setup, call or teardown) its report gets a section per guest console and daemon log.
At session start, leftovers of killed sessions are removed (`vhostmap.testing.leftovers.sweep`) and listed
in the header; at the end, the guests' boot times are summarised. A test that needs a guest kernel that was
never built (scripts/guest-kernel) is skipped.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from vhostmap.lab.guestkernel import GuestKernelMissing
from vhostmap.testing.lab import Daemon, Guest, HostNamespace, Lab
from vhostmap.testing.leftovers import sweep
from vhostmap.testing.topology import Topology, build

LABS = pytest.StashKey[list[Lab]]()
REMOVED = pytest.StashKey[list[str]]()
BOOT_PROPERTY = "vhostmap_boot_seconds"


class _BootTally:
    """Collects guest boot times from every test report (xdist workers' too: user_properties travel with
    their reports) and prints them at the end."""

    def __init__(self) -> None:
        self.boots: list[float] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == BOOT_PROPERTY and isinstance(value, list):
                self.boots.extend(float(v) for v in value)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.boots:
            b = self.boots
            terminalreporter.write_line(
                f"vhostmap: {len(b)} guest boot(s): median {statistics.median(b):.1f} s, "
                f"min {min(b):.1f} s, max {max(b):.1f} s"
            )


def pytest_configure(config: pytest.Config) -> None:
    """Register the boot-time tally."""
    config.pluginmanager.register(_BootTally(), "vhostmap-boot-tally")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what killed sessions of the kit left behind (every xdist worker does too; it is safe)."""
    session.config.stash[REMOVED] = sweep()


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say what the session-start sweep removed, if anything."""
    removed = config.stash.get(REMOVED, [])
    if not removed:
        return None
    shown = ", ".join(removed[:8]) + (f", ... ({len(removed)} in all)" if len(removed) > 8 else "")
    return f"vhostmap.testing: removed leftovers of killed sessions: {shown}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Add the guest consoles and daemon logs to a failed test's report; note guest boot times."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    labs = item.stash.get(LABS, [])
    if report.failed:
        for lab in labs:
            for title, text in lab.report_sections():
                report.sections.append((f"vhostmap {lab.names.label}: {title}", text))
    if report.when == "call":
        boots = [s for lab in labs for s in lab.boot_seconds().values()]
        if boots:
            report.user_properties.append((BOOT_PROPERTY, boots))


@pytest.fixture
def vhostmap_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """This test's `Lab`; everything made through it goes when the test ends."""
    lab = Lab()
    request.node.stash.setdefault(LABS, []).append(lab)
    try:
        yield lab
    finally:
        lab.close()


def _skip_without_kernel(make: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(make)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return make(*args, **kwargs)
        except GuestKernelMissing as e:
            pytest.skip(str(e))

    return wrapped


@pytest.fixture
def vhostmap(vhostmap_lab: Lab) -> Callable[..., Daemon]:
    """Start ``vhostmap serve``: ``vhostmap(ports, links=(), switches=None)`` (`Lab.vhostmap`)."""
    return vhostmap_lab.vhostmap


@pytest.fixture
def guest(vhostmap_lab: Lab) -> Callable[..., Guest]:
    """Boot a guest: ``guest(name, nics, image="busybox", ...)`` (`Lab.guest`); skips without its kernel."""
    return _skip_without_kernel(vhostmap_lab.guest)


@pytest.fixture
def testpmd(vhostmap_lab: Lab) -> Callable[..., Any]:
    """Run dpdk-testpmd on ports: ``testpmd(ports, forward_mode="io", ...)`` (`Lab.testpmd`)."""
    return vhostmap_lab.testpmd


@pytest.fixture
def netns(vhostmap_lab: Lab) -> Callable[..., HostNamespace]:
    """A host namespace in the lab's subnet: ``netns(name=None, address=None, tap=None)`` (`Lab.netns`)."""
    return vhostmap_lab.netns


@pytest.fixture
def topology(vhostmap_lab: Lab) -> Callable[..., Topology]:
    """Build a lab from a dict or TOML file: ``topology(spec)`` (`vhostmap.testing.topology.build`)."""

    def make(spec: Any) -> Topology:
        return build(vhostmap_lab, spec)

    return _skip_without_kernel(make)

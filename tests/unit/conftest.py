"""A vhostmap daemon running inside the test process, with fake front-ends on its ports.

``start_daemon`` builds a configuration, runs ``Daemon.run`` on its own event loop in a thread, and on
teardown closes every front-end, stops the daemon, joins its thread and checks that nothing was left behind:
no exception in the daemon thread, no socket file, no file descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhostmap.control.client import call
from vhostmap.daemon.config import build_config
from vhostmap.daemon.daemon import Daemon
from vhostmap.datapath.choice import REFERENCE_ENV
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.netns import Tap, VethPair, disable_ipv6, ip, wait_transmitting
from vhostmap.lab.wait import wait_until
from vhostmap.vhost_user.device import VhostUserNetDevice
from vhostmap.vhost_user.server import Endpoint


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at: a table two reads in a row agree on.

    Other threads open and close fds meanwhile (the worker swaps its epoll set on every refresh, the control
    thread reads fdinfo), and a read that raced with that counts one too few or too many: a baseline one too
    low made the hostile tests flaky.
    """
    last = _read_fds()
    for _ in range(100):
        now = _read_fds()
        if now == last:
            break
        last = now
    return last


def _read_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


FRAME = bytes(range(60))


def exchange(x: FakeFrontend, y: FakeFrontend, n: int = 10) -> None:
    """``n`` frames from x to y, byte-exact."""
    frames = [bytes([k]) * 60 + FRAME for k in range(n)]
    y.post_receive_buffers(n)
    x.transmit(frames)
    assert y.receive(n) == frames


def still_serving(d: RunningDaemon, fc: FakeFrontend, fe: FakeFrontend) -> None:
    """While a peer misbehaves elsewhere: the link of ``fc`` and ``fe`` forwards both ways, and a fresh
    control connection is answered within 2 s."""
    exchange(fc, fe)
    exchange(fe, fc)
    assert "ports" in call(str(d.workdir / "control.sock"), "stats", timeout=2.0)


class RunningDaemon:
    """A started in-process daemon, the directory of its sockets, and the front-ends tests made."""

    def __init__(self, daemon: Daemon, workdir: Path, thread: threading.Thread) -> None:
        self.daemon = daemon
        self.workdir = workdir
        self.thread = thread
        self.frontends: list[FakeFrontend] = []
        self.error: BaseException | None = None

    def path(self, port: str) -> str:
        """The vhost-user socket of ``port``."""
        return self.daemon.config.port(port).path

    def device(self, port: str) -> VhostUserNetDevice:
        """The device state machine behind ``port``."""
        return self.daemon.ports[port].device

    def endpoint(self, port: str) -> Endpoint:
        """The socket endpoint of ``port``."""
        return next(ep for ep in self.daemon.endpoints if ep.handler.name == port)

    def frontend(
        self, port: str, *, negotiate: bool = True, mem_regions: int = 0, **kwargs: Any
    ) -> FakeFrontend:
        """A FakeFrontend connected to ``port`` (and negotiated, unless told not to); closed at teardown."""
        fe = FakeFrontend(self.path(port), **kwargs)
        self.frontends.append(fe)
        fe.connect()
        if negotiate:
            fe.negotiate(mem_regions=mem_regions)
        return fe

    def adopt(self, fe: FakeFrontend) -> FakeFrontend:
        """Close ``fe`` at teardown too."""
        self.frontends.append(fe)
        return fe

    def stats(self, port: str) -> dict[str, Any]:
        """The ``stats`` control command's counters of ``port``."""
        return self.daemon.stats({})["ports"][port]  # type: ignore[no-any-return]

    def totals(self, port: str) -> dict[str, int]:
        """The counters of ``port`` summed over its queues."""
        return self.stats(port)["totals"]  # type: ignore[no-any-return]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        """Wait for ``predicate`` with a deadline."""
        return wait_until(predicate, timeout, what, interval=0.01)

    def wait_broken(self, port: str) -> str:
        """Wait until the device of ``port`` is marked broken; its reason."""
        return self.wait(lambda: self.device(port).broken, f"port {port} to be marked broken")  # type: ignore[no-any-return]

    def close_frontends(self) -> None:
        """Disconnect every front-end made so far."""
        for fe in self.frontends:
            fe.close()
        self.frontends = []


StartDaemon = Callable[..., RunningDaemon]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember whether the test itself failed (``item.failed_call``), for fixtures' teardown checks."""
    report = yield
    if report.when == "call":
        item.failed_call = report.failed  # type: ignore[attr-defined]
    return report


@pytest.fixture
def start_daemon(
    sock_dir: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[StartDaemon]:
    """Start an in-process daemon: ``start_daemon({"a": "queues=4", "b": ""}, links=["a,b"])``; also
    ``switches=["vale0=a,b"]`` (``--switch`` values), ``other_ports`` (complete ``--port`` values), ``cpu``
    (``--cpu``: a list runs several datapath threads) and ``poll``.

    Port values are extra ``--port`` options (``mode=client``, ``queues=``, ``mac=``, ``mtu=``); every socket
    lives in ``sock_dir``. Teardown fails the test if the daemon thread raised, or if a socket file or a file
    descriptor outlives it.
    """
    fds_before = open_fds()
    running: list[RunningDaemon] = []

    def start(
        ports: Mapping[str, str],
        links: Sequence[str] = (),
        *,
        switches: Sequence[str] = (),
        other_ports: Sequence[str] = (),
        cpu: str | None = None,
        poll: bool | None = None,
        rxq_isolate: bool | None = None,
        metrics: str | None = None,
    ) -> RunningDaemon:
        flags = []
        for name, options in ports.items():
            flags.append(
                f"{name}=vhost-user,path={sock_dir}/{name}.sock" + (f",{options}" if options else "")
            )
        flags += other_ports  # complete --port values (generic ports)
        options = (("cpu", cpu), ("poll", poll), ("rxq_isolate", rxq_isolate), ("metrics", metrics))
        threads = {k: v for k, v in options if v is not None}
        config = build_config(
            None, flags, links, f"{sock_dir}/control.sock", switch_flags=switches, **threads
        )
        daemon = Daemon(config)

        def serve() -> None:
            try:
                asyncio.run(daemon.run(handle_signals=False))
            except BaseException as e:  # reported by the teardown
                rd.error = e
                daemon.ready.set()

        thread = threading.Thread(target=serve, name="vhostmap-daemon", daemon=True)
        rd = RunningDaemon(daemon, sock_dir, thread)
        running.append(rd)
        thread.start()
        assert daemon.ready.wait(5), "daemon did not become ready"
        if rd.error is not None:  # failed to start: nothing to stop
            thread.join(10)
            running.remove(rd)
            raise rd.error
        for options in ports.values():
            for option in options.split(","):
                key, _, tap = option.partition("=")
                if key == "host" and admin_up(tap):
                    # It got its carrier as the daemon opened it: what a test sends into it before the
                    # kernel attached its qdisc would be dropped.
                    wait_transmitting(tap)
        return rd

    yield start

    for rd in running:
        rd.close_frontends()
        rd.daemon.stop()
        rd.thread.join(10)
        assert not rd.thread.is_alive(), "daemon thread did not stop"
        assert rd.error is None, f"daemon thread raised {rd.error!r}"
    if running and not getattr(request.node, "failed_call", True):
        # (A failed test's traceback keeps the daemon and its mappings alive: nothing to learn there.)
        left = sorted(p.name for p in sock_dir.iterdir() if p.is_socket())
        assert not left, f"sockets left behind: {left}"
        # A mapping (and the fd Python's mmap keeps beside it) lives as long as a view of it does: the
        # daemon's ports hold views of the netmap memory until the daemon object itself goes.
        for rd in running:
            del rd.daemon
        running.clear()
        for when in ("setup", "call", "teardown"):
            # Records keep their arguments, and a logged exception keeps its traceback's frames.
            caplog.get_records(when).clear()
        gc.collect()
        leaked = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
        assert not leaked, f"file descriptors leaked: {leaked}"


@pytest.fixture(params=["compiled", "reference"])
def datapath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The datapath every switch and port a test makes runs, chosen as in production: by the environment
    (``pytestmark = pytest.mark.usefixtures("datapath")`` runs a module's tests with both)."""
    if request.param == "reference":
        monkeypatch.setenv(REFERENCE_ENV, "1")
    else:
        monkeypatch.delenv(REFERENCE_ENV, raising=False)
    return str(request.param)


def admin_up(dev: str) -> bool:
    """Whether interface ``dev`` exists here and was set up."""
    shown = ip("-j", "link", "show", "dev", dev, check=False)
    return shown.returncode == 0 and "UP" in json.loads(shown.stdout)[0]["flags"]


@pytest.fixture
def tap() -> Iterator[str]:
    """A persistent TAP with IPv6 off (the kernel sends nothing on it of its own), up; deleted afterwards.
    Request it before start_daemon, so that it outlives the daemon."""
    with Tap() as t:
        disable_ipv6(t.name)
        ip("link", "set", "dev", t.name, "up")
        yield t.name


@pytest.fixture
def veth() -> Iterator[VethPair]:
    """A veth pair, both ends up with IPv6 off; request it before start_daemon."""
    with VethPair() as v:
        for end in (v.name, v.peer):
            disable_ipv6(end)
            ip("link", "set", "dev", end, "up")
        for end in (v.name, v.peer):
            wait_transmitting(end)
        yield v

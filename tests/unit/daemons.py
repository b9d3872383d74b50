"""A vhostmap daemon running inside the test process, as unit tests use it: the handle ``start_daemon``
(conftest.py) gives them, and what they do with its fake front-ends.

A module of its own, not conftest.py: test modules import these by name, and ``conftest`` is also the name
of tests/integration's, which pytest may have imported under it first when a run names files of both.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhostmap.control.client import call
from vhostmap.daemon.daemon import Daemon
from vhostmap.lab.frontend import FakeFrontend
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

"""A vhostmap daemon running inside the test process, with fake front-ends on its ports.

``start_daemon`` builds a configuration, runs ``Daemon.run`` on its own event loop in a thread, and on
teardown closes every front-end, stops the daemon, joins its thread and checks that nothing was left behind:
no exception in the daemon thread, no socket file, no file descriptor.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from daemons import RunningDaemon, StartDaemon, open_fds

from vhostmap.daemon.config import build_config
from vhostmap.daemon.daemon import Daemon
from vhostmap.datapath.choice import REFERENCE_ENV
from vhostmap.lab.netns import Tap, VethPair, disable_ipv6, ip, wait_transmitting


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
    (``--cpu``: a list runs several datapath threads), ``control_cpu`` and ``poll``.

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
        cpu: int | str | None = None,
        control_cpu: int | None = None,
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
        options = (
            ("cpu", cpu),
            ("control_cpu", control_cpu),
            ("poll", poll),
            ("rxq_isolate", rxq_isolate),
            ("metrics", metrics),
        )
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

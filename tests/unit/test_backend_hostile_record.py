"""Hostile front-ends from DPDK's vhost-user CVE record, over the real socket: malformed sizes and indexes,
log and memory descriptions that overflow, fds where none belong, repeated ring setup, unsupported inflight
messages, disconnection in the middle of every message, and thousands of hostile connections.

Each is refused (a failure REPLY_ACK) or costs the attacker its connection, never the daemon: the fds it sent
are closed (the daemon runs in this process: /proc/self/fd counts them), and meanwhile an unrelated link
forwards and the control socket answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from daemons import RunningDaemon, StartDaemon, exchange, open_fds, still_serving

from vhostmap.lab.frontend import UVA_BASE, FakeFrontend
from vhostmap.vhost_user.messages import (
    HEADER,
    REQUESTS,
    U64,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    InflightDescriptor,
    LogDescriptor,
    MemoryRegion,
    MemoryTable,
    Request,
    VringFile,
    VringState,
)
from vhostmap.vhost_user.protocol import FrontendConnection, encode

ASK = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK


@pytest.fixture
def daemon(start_daemon: StartDaemon) -> tuple[RunningDaemon, FakeFrontend, FakeFrontend]:
    """A daemon with port a for the attacker and the link c-e, negotiated and forwarding."""
    d = start_daemon({"a": "", "c": "", "e": ""}, links=["c,e"])
    fc, fe = d.frontend("c"), d.frontend("e")
    exchange(fc, fe)
    return d, fc, fe


@dataclass(frozen=True)
class Hostile:
    """One malformed message: its bytes (given the attacking front-end) and the fds it carries."""

    name: str
    data: Callable[[FakeFrontend], bytes]
    fds: Callable[[FakeFrontend], tuple[int, ...]] = lambda fe: ()


def ask(req: Request, payload: object) -> Callable[[FakeFrontend], bytes]:
    return lambda fe: FrontendConnection.request(req, payload, need_reply=True)  # type: ignore[arg-type]


def table(*regions: MemoryRegion) -> Callable[[FakeFrontend], bytes]:
    return ask(Request.SET_MEM_TABLE, MemoryTable(regions))


HOSTILE = [
    Hostile(
        "payload-size-beyond-the-limit",
        lambda fe: HEADER.pack(Request.SET_FEATURES, ASK, VHOST_USER_MAX_PAYLOAD_SIZE + 1),
    ),
    Hostile("payload-size-2**32-1", lambda fe: HEADER.pack(Request.SET_FEATURES, ASK, 2**32 - 1)),
    Hostile("payload-truncated", lambda fe: encode(Request.SET_VRING_NUM, ASK, bytes(4))),
    Hostile("empty-payload-for-a-table", lambda fe: encode(Request.SET_MEM_TABLE, ASK, b"")),
    Hostile("bad-version", lambda fe: encode(Request.SET_FEATURES, 2 | VHOST_USER_NEED_REPLY_MASK, bytes(8))),
    Hostile("vring-index-out-of-range", ask(Request.SET_VRING_NUM, VringState(200, 256))),
    Hostile("vring-index-2**32-1", ask(Request.SET_VRING_BASE, VringState(2**32 - 1, 0))),
    Hostile("vring-size-too-large", ask(Request.SET_VRING_NUM, VringState(0, 2**31))),
    Hostile("vring-size-not-a-power-of-two", ask(Request.SET_VRING_NUM, VringState(0, 255))),
    Hostile("get-vring-base-out-of-range", ask(Request.GET_VRING_BASE, VringState(255, 0))),
    Hostile("kick-index-out-of-range", ask(Request.SET_VRING_KICK, VringFile(200)), lambda fe: (fe.memfd,)),
    Hostile(
        "log-base-size-overflow",
        ask(Request.SET_LOG_BASE, LogDescriptor(2**64 - 1, 0)),
        lambda fe: (fe.memfd,),
    ),
    Hostile(
        "log-base-offset-overflow",
        ask(Request.SET_LOG_BASE, LogDescriptor(4096, 2**64 - 4096)),
        lambda fe: (fe.memfd,),
    ),
    Hostile(
        "log-base-beyond-the-file",
        ask(Request.SET_LOG_BASE, LogDescriptor(1 << 40, 0)),
        lambda fe: (fe.memfd,),
    ),
    Hostile("fds-on-set-features", ask(Request.SET_FEATURES, U64(0)), lambda fe: (fe.memfd,) * 4),
    Hostile("fds-on-get-features", ask(Request.GET_FEATURES, None), lambda fe: (fe.memfd,) * 8),
    Hostile("fds-on-a-nofd-kick", ask(Request.SET_VRING_KICK, VringFile(0, True)), lambda fe: (fe.memfd,)),
    Hostile(
        "regions-overlap",
        table(MemoryRegion(0, 1 << 20, UVA_BASE, 0), MemoryRegion(1 << 19, 1 << 20, UVA_BASE + (1 << 21), 0)),
        lambda fe: (fe.memfd, fe.memfd),
    ),
    Hostile(
        "region-wraps-2**64",
        table(MemoryRegion(2**64 - 4096, 8192, UVA_BASE, 0)),
        lambda fe: (fe.memfd,),
    ),
    Hostile(
        "region-user-address-wraps",
        table(MemoryRegion(0, 8192, 2**64 - 4096, 0)),
        lambda fe: (fe.memfd,),
    ),
    Hostile(
        "region-offset-wraps",
        table(MemoryRegion(0, 8192, UVA_BASE, 2**64 - 4096)),
        lambda fe: (fe.memfd,),
    ),
    Hostile("region-without-its-fd", table(MemoryRegion(0, 8192, UVA_BASE, 0))),
    Hostile("get-inflight-fd", ask(Request.GET_INFLIGHT_FD, InflightDescriptor(1 << 20, 0, 2, 256))),
    Hostile(
        "set-inflight-fd",
        ask(Request.SET_INFLIGHT_FD, InflightDescriptor(1 << 20, 0, 2, 256)),
        lambda fe: (fe.memfd,),
    ),
    Hostile("postcopy-advise", ask(Request.POSTCOPY_ADVISE, None)),
]


def outcome(fe: FakeFrontend) -> str:
    """What the back-end made of the last message: "refused" (a failure ack or empty reply) or "dropped"."""
    try:
        reply = fe.recv_reply()
    except (ConnectionError, OSError):
        return "dropped"
    if isinstance(reply.payload, U64):
        assert reply.payload.value != 0, f"{reply.request.name} accepted"
    for fd in reply.fds:
        os.close(fd)
    return "refused"


@pytest.mark.parametrize("attack", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_message_is_refused_or_drops_only_its_port(
    daemon: tuple[RunningDaemon, FakeFrontend, FakeFrontend], attack: Hostile
) -> None:
    d, fc, fe = daemon
    fa = d.frontend("a")
    baseline = len(open_fds())
    fa.send_raw(attack.data(fa), attack.fds(fa))
    if outcome(fa) == "refused":
        assert fa.get_status()  # the same connection goes on
    else:
        d.wait(lambda: not d.endpoint("a").is_connected, "the attacker's connection to go")
        fa.close()
        fa = d.frontend("a")  # the port takes a new front-end
        baseline = len(open_fds())
    assert d.device("a").broken is None
    d.wait(lambda: len(open_fds()) <= baseline, "the fds of the hostile message to be closed")
    still_serving(d, fc, fe)


def test_regions_keep_no_fd_once_mapped(daemon: tuple[RunningDaemon, FakeFrontend, FakeFrontend]) -> None:
    d, fc, fe = daemon
    fa = d.frontend("a", negotiate=False)
    guest = os.fstat(fa.memfd).st_ino

    def guest_memory_fds() -> int:
        return sum(1 for fd in open_fds() if _inode(fd) == guest)

    ours = guest_memory_fds()  # the fake guest's memfd and the one its own mmap keeps
    fa.negotiate(mem_regions=8)
    assert guest_memory_fds() == ours  # the daemon closed all 8 it received once mapped
    still_serving(d, fc, fe)


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def test_repeated_ring_setup_holds_one_fd_per_ring(
    daemon: tuple[RunningDaemon, FakeFrontend, FakeFrontend],
) -> None:
    d, fc, fe = daemon
    fa = d.frontend("a")
    baseline = len(open_fds())
    q = fa.queues[0]
    for _ in range(300):
        fa.send(Request.SET_VRING_NUM, VringState(0, q.num))
        for req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL):
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fa.send(req, VringFile(0), (efd,))
            os.close(efd)
    fa.call(Request.GET_FEATURES)
    assert len(open_fds()) <= baseline  # each new kick/call fd replaced (and closed) the one before
    still_serving(d, fc, fe)


def wait_accepted_and_gone(d: RunningDaemon) -> None:
    d.wait(lambda: not d.endpoint("a").is_connected, "the front-end on a to be gone")


def test_disconnect_in_the_middle_of_every_message(
    daemon: tuple[RunningDaemon, FakeFrontend, FakeFrontend],
) -> None:
    d, fc, fe = daemon
    donor = d.frontend("a", negotiate=False)  # fds to attach; its socket goes at once
    assert donor.sock is not None
    donor.sock.close()
    donor.sock = None
    wait_accepted_and_gone(d)
    baseline = len(open_fds())
    for req, spec in REQUESTS.items():
        for cut in (HEADER.size // 2, HEADER.size + 4):
            size = max(spec.payload.LAYOUT.size if hasattr(spec.payload, "LAYOUT") else 8, 8)
            data = (HEADER.pack(req, VHOST_USER_VERSION, size) + bytes(size))[:cut]
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", donor.memfd))]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(d.path("a"))
                with contextlib.suppress(OSError):  # the daemon may hang up first
                    sock.sendmsg([data], fds)
            wait_accepted_and_gone(d)
    d.wait(lambda: len(open_fds()) <= baseline, "the fds of every cut message to be closed")
    d.frontend("a")
    still_serving(d, fc, fe)


def rss() -> int:
    """This process's resident set, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hostile_connections(d: RunningDaemon, n: int, efd: int) -> None:
    """``n`` connections to port a, each leaving a message unfinished with fds, or a fatal header."""
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", efd, efd))]
    bad = [
        HEADER.pack(Request.SET_MEM_TABLE, VHOST_USER_VERSION, 200) + bytes(10),
        HEADER.pack(Request.SET_FEATURES, VHOST_USER_VERSION, 2**32 - 1),
        encode(Request.GET_FEATURES, VHOST_USER_VERSION, b"")[:5],
    ]
    for k in range(n):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(d.path("a"))
            with contextlib.suppress(OSError):  # the daemon may hang up first
                sock.sendmsg([bad[k % len(bad)]], fds)


def settle(d: RunningDaemon) -> tuple[int, int]:
    """Once the daemon has served every connection before (a real front-end gets its turn), its open fds
    and RSS."""

    def negotiated() -> FakeFrontend | None:
        probe = FakeFrontend(d.path("a"))
        try:
            probe.connect()
            probe.negotiate()
        except (ConnectionError, OSError):
            probe.close()
            return None
        return probe

    probe = d.wait(negotiated, "a front-end to negotiate on a after the hostile ones", timeout=30)
    probe.close()
    wait_accepted_and_gone(d)
    return len(open_fds()), rss()


def test_ten_thousand_hostile_connections_cost_nothing(
    daemon: tuple[RunningDaemon, FakeFrontend, FakeFrontend], caplog: pytest.LogCaptureFixture
) -> None:
    d, fc, fe = daemon
    caplog.set_level(logging.CRITICAL, logger="vhostmap")  # no records piling up in the capture
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        hostile_connections(d, 10, efd)
        fds_10, rss_10 = settle(d)
        start = time.monotonic()
        hostile_connections(d, 10_000, efd)
        fds_10k, rss_10k = settle(d)
        elapsed = time.monotonic() - start
    finally:
        os.close(efd)
    print(f"after 10 connections: {fds_10} fds, RSS {rss_10 >> 10} KiB")
    print(f"after 10,000 more: {fds_10k} fds, RSS {rss_10k >> 10} KiB")
    print(f"10,000 hostile connections in {elapsed:.1f} s")
    assert fds_10k <= fds_10
    assert rss_10k - rss_10 < 8 << 20
    still_serving(d, fc, fe)

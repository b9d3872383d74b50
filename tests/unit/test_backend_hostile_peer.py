"""Hostile front-ends against the control thread: one peer never stops another port or the daemon.

Each attack runs over the real socket while an unrelated link keeps forwarding and the control socket keeps
answering; the attacker alone is disconnected (or refused), with a log line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import struct

import pytest
from daemons import RunningDaemon, StartDaemon, exchange, open_fds

from vhostmap.control.client import call, connect, request
from vhostmap.control.server import MAX_UNSENT_REPLY_BYTES as MAX_UNSENT_CONTROL
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.system.limits import raise_fd_limit
from vhostmap.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    U64,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_VERSION,
    Request,
)
from vhostmap.vhost_user.port import MAX_PENDING_ANNOUNCEMENTS
from vhostmap.vhost_user.protocol import FrontendConnection
from vhostmap.vhost_user.server import MAX_UNSENT_REPLY_BYTES


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Disconnections are logged at INFO: capture them."""
    caplog.set_level(logging.INFO, logger="vhostmap")


def control_answers(d: RunningDaemon) -> None:
    """A fresh control connection gets an answer within 2 s."""
    assert "ports" in call(str(d.workdir / "control.sock"), "stats", timeout=2.0)


def bystanders(d: RunningDaemon) -> tuple[FakeFrontend, FakeFrontend]:
    """Front-ends on the unrelated link c-e, negotiated and forwarding."""
    fc, fe = d.frontend("c"), d.frontend("e")
    exchange(fc, fe)
    return fc, fe


def raw(d: RunningDaemon, port: str) -> socket.socket:
    """A bare connection to ``port``'s vhost-user socket, closed at teardown with the front-ends."""
    fe = d.frontend(port, negotiate=False)
    assert fe.sock is not None
    d.wait(lambda: d.endpoint(port).is_connected, f"the daemon to accept a front-end on {port}")
    return fe.sock


def test_front_end_that_never_reads_its_replies_is_disconnected(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "c": "", "e": ""}, links=["c,e"])
    fc, fe = bystanders(d)
    sock = raw(d, "a")
    sock.setblocking(False)
    burst = FrontendConnection.request(Request.GET_FEATURES) * 1000
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        # Ask and never read. Between bursts the other link forwards and the control socket answers.
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                sock.send(burst)
            control_answers(d)
            exchange(fc, fe, 1)
            if not d.endpoint("a").is_connected:
                break
    d.wait(lambda: not d.endpoint("a").is_connected, "the front-end that does not read to be dropped")
    why = f"it does not read its replies: more than {MAX_UNSENT_REPLY_BYTES} bytes unsent"
    assert f"port a: front-end disconnected ({why})" in caplog.messages
    exchange(fc, fe)
    exchange(fe, fc)
    control_answers(d)
    fa = d.frontend("a")  # the port itself is usable again
    assert fa.get_status()


def test_control_client_that_never_reads_its_replies_is_disconnected(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"c": "", "e": ""}, links=["c,e"])
    fc, fe = bystanders(d)
    sock = connect(str(d.workdir / "control.sock"))
    try:
        sock.setblocking(False)
        burst = b'{"cmd": "stats"}\n' * 500
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(2000):
                with contextlib.suppress(BlockingIOError):
                    sock.send(burst)
                if any("control client" in m and "dropped" in m for m in caplog.messages):
                    break
                control_answers(d)
                exchange(fc, fe, 1)
                # The link's transmit chains back: a long attack (a loaded machine answers the flood
                # slowly) would use up fc's ring.
                fc.used(fc.queues[1])
        dropped = d.wait(
            lambda: [m for m in caplog.messages if "control client" in m and "dropped" in m],
            "the control client that does not read to be dropped",
        )
        assert f"more than {MAX_UNSENT_CONTROL}" in dropped[0]
    finally:
        sock.close()
    control_answers(d)
    exchange(fe, fc)


def test_fds_on_every_byte_of_an_unfinished_message_are_bounded(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "c": "", "e": ""}, links=["c,e"])
    fc, fe = bystanders(d)
    sock = raw(d, "a")
    sock.settimeout(2.0)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    before = len(open_fds())
    fds = struct.pack(f"{MAX_FDS}i", *[efd] * MAX_FDS)
    try:
        sock.send(HEADER.pack(Request.SET_FEATURES, VHOST_USER_VERSION, VHOST_USER_MAX_PAYLOAD_SIZE))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(VHOST_USER_MAX_PAYLOAD_SIZE):
                sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                if not d.endpoint("a").is_connected:
                    break
                # What the daemon holds for this peer stays bounded all along (the eventfd is ours).
                assert len(open_fds()) <= before + 2 * MAX_FDS
        d.wait(lambda: not d.endpoint("a").is_connected, "the fd-stuffing front-end to be dropped")
    finally:
        os.close(efd)
    assert any(f"more than any message takes ({MAX_FDS})" in m for m in caplog.messages)
    assert "port a: front-end disconnected (protocol error)" in caplog.messages
    exchange(fc, fe)
    control_answers(d)
    d.wait(lambda: len(open_fds()) <= before, "the daemon to hold no fd of the attacker")


def test_accept_without_fds_left_pauses_and_retries(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "c": "", "e": ""}, links=["c,e"])
    fc, fe = bystanders(d)
    control = connect(str(d.workdir / "control.sock"), timeout=2.0)
    # Answered once, so the daemon has accepted it: a connection still in the listen backlog when the fds
    # run out would wait for the daemon's accept like the front-end's (it failed once that way).
    assert "ports" in request(control, "status")[0]
    late = d.adopt(FakeFrontend(d.path("a")))  # its memory and eventfds now: no fd to spare later
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 64, hard))
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.dup(0))
        os.close(filler.pop())  # one for the front-end's socket, none for the daemon's accept()
        late.connect()
        d.wait(
            lambda: any("port a: cannot accept a front-end" in m for m in caplog.messages),
            "accept() to fail for want of fds",
        )
        # The daemon goes on serving everything it already has.
        exchange(fc, fe)
        assert "ports" in request(control, "stats")[0]
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        control.close()
    late.negotiate()  # accepted on a retry, once fds are free again
    exchange(fc, fe)
    errors = [r for r in caplog.records if r.getMessage().startswith("Exception in callback")]
    assert not errors


def test_daemon_raises_its_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        old, new = raise_fd_limit()
        assert old == min(256, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new >= old
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_repeated_rarp_while_ring_0_cannot_drain_is_bounded(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])
    fa, _ = d.frontend("a"), d.frontend("b")  # b posts no receive buffers: a's ring 0 fills, then stops
    fc, fe = bystanders(d)
    port = d.daemon.ports["a"]
    for k in range(3000):
        fa.send(Request.SEND_RARP, U64(0x020000000000 + k))
        if k % 500 == 0:
            control_answers(d)
    fa.call(Request.GET_FEATURES)  # every SEND_RARP before it was handled
    assert port.pending_announcements <= MAX_PENDING_ANNOUNCEMENTS
    assert any(
        "RARP announcements already wait for ring 0; dropping the oldest" in m for m in caplog.messages
    )
    exchange(fc, fe)
    control_answers(d)

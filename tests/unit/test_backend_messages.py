"""Malformed and unexpected vhost-user messages over the daemon's real socket: each is logged clearly,
answered with a failure ack where REPLY_ACK applies or ends the connection when the stream cannot be
trusted, and the daemon goes on serving new connections and its other ports."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.lab.frontend import FakeFrontend
from vhostmap.vhost_user.messages import (
    HEADER,
    U64,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    IotlbMsg,
    Request,
    VringFile,
    VringState,
)
from vhostmap.vhost_user.protocol import encode

V1 = VHOST_USER_VERSION
NEED_REPLY = V1 | VHOST_USER_NEED_REPLY_MASK
FRAMES = [bytes([k]) * 64 for k in range(8)]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("back-end closed the connection")
        data += chunk
    return data


def raw_reply(fe: FakeFrontend) -> tuple[int, int, bytes]:
    """The next reply as (request code, flags, payload), whatever its code."""
    assert fe.sock is not None
    code, flags, size = HEADER.unpack(recv_exact(fe.sock, HEADER.size))
    return code, flags, recv_exact(fe.sock, size)


def failure_ack(code: int) -> tuple[int, int, bytes]:
    return code, V1 | VHOST_USER_REPLY_MASK, U64(1).pack()


def wait_closed_by_peer(fe: FakeFrontend) -> None:
    """The back-end hung up: the next read sees end of stream (or a reset, if it left our bytes unread)."""
    assert fe.sock is not None
    with contextlib.suppress(ConnectionResetError):
        assert fe.sock.recv(1) == b""


def exchange(x: FakeFrontend, y: FakeFrontend) -> None:
    y.post_receive_buffers(len(FRAMES))
    x.transmit(FRAMES)
    assert y.receive(len(FRAMES)) == FRAMES


@pytest.fixture
def two_links(start_daemon: StartDaemon) -> RunningDaemon:
    return start_daemon({"a": "", "b": "", "c": "", "e": ""}, links=["a,b", "c,e"])


@dataclass(frozen=True)
class Malformed:
    name: str
    data: bytes
    nfds: int
    code: int
    log: str


MALFORMED = [
    Malformed(
        "bad-version",
        encode(Request.SET_VRING_ENABLE, 2 | VHOST_USER_NEED_REPLY_MASK, VringState(0, 1).pack()),
        0,
        Request.SET_VRING_ENABLE,
        "SET_VRING_ENABLE: version 2 in flags 0xa, expected 1",
    ),
    Malformed(
        "unknown-request-code",
        encode(99, NEED_REPLY, bytes(8)),
        0,
        99,
        "request code 99: unknown request code 99",
    ),
    Malformed(
        "payload-too-short",
        encode(Request.SET_VRING_NUM, NEED_REPLY, bytes(4)),
        0,
        Request.SET_VRING_NUM,
        "SET_VRING_NUM: vring state payload is 4 bytes, expected 8",
    ),
    Malformed(
        "payload-too-long",
        encode(Request.SET_FEATURES, NEED_REPLY, bytes(16)),
        0,
        Request.SET_FEATURES,
        "SET_FEATURES: u64 payload is 16 bytes, expected 8",
    ),
    Malformed(
        "missing-fd",
        encode(Request.SET_VRING_CALL, NEED_REPLY, VringFile(0).pack()),
        0,
        Request.SET_VRING_CALL,
        "SET_VRING_CALL: 0 fds attached, expected 1",
    ),
    Malformed(
        "two-fds-for-one",
        encode(Request.SET_VRING_KICK, NEED_REPLY, VringFile(0).pack()),
        2,
        Request.SET_VRING_KICK,
        "SET_VRING_KICK: 2 fds attached, expected 1",
    ),
    Malformed(
        "fd-on-a-request-without-fds",
        encode(Request.SET_VRING_NUM, NEED_REPLY, VringState(0, 256).pack()),
        1,
        Request.SET_VRING_NUM,
        "SET_VRING_NUM: 1 fds attached, expected 0",
    ),
    Malformed(
        "unsupported-request",
        encode(Request.SET_VRING_ENDIAN, NEED_REPLY, VringState(0, 0).pack()),
        0,
        Request.SET_VRING_ENDIAN,
        "SET_VRING_ENDIAN refused: not supported by this device",
    ),
]


@pytest.mark.parametrize("bad", MALFORMED, ids=[m.name for m in MALFORMED])
def test_malformed_message_gets_a_failure_ack_and_the_connection_goes_on(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture, bad: Malformed
) -> None:
    d = two_links
    fa, fb = d.frontend("a"), d.frontend("b")
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(bad.nfds))
    try:
        fa.send_raw(bad.data, fds)
    finally:
        for fd in fds:
            os.close(fd)  # the daemon got its own copies, and must close them (teardown checks)
    assert raw_reply(fa) == failure_ack(bad.code)
    prefix = "port a: " if "refused" in bad.log else "port a: malformed message: "
    assert prefix + bad.log in caplog.messages
    # The next message is read normally, and the device still works.
    assert fa.call(Request.GET_QUEUE_NUM).payload == U64(1)
    assert d.endpoint("a").is_connected
    exchange(fa, fb)
    exchange(fb, fa)


def test_many_fds_on_one_message_are_all_closed(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = two_links
    fa = d.frontend("a")
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(12))
    try:
        fa.send_raw(encode(Request.SET_VRING_CALL, NEED_REPLY, VringFile(0).pack()), fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert raw_reply(fa) == failure_ack(Request.SET_VRING_CALL)
    assert "port a: too many fds in one message, truncated by the kernel" in caplog.messages
    assert "port a: malformed message: SET_VRING_CALL: 8 fds attached, expected 1" in caplog.messages


def test_malformed_message_without_reply_ack_is_skipped_silently(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = two_links
    fa = d.frontend("a", negotiate=False)
    fa.send_raw(encode(Request.SET_VRING_NUM, NEED_REPLY, bytes(4)))
    assert fa.call(Request.GET_QUEUE_NUM).payload == U64(1)
    assert (
        "port a: malformed message: SET_VRING_NUM: vring state payload is 4 bytes, expected 8"
        in caplog.messages
    )


@pytest.mark.parametrize("whole", [True, False], ids=["with-payload", "header-only"])
def test_oversized_size_field_drops_the_connection_and_the_daemon_serves_on(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture, whole: bool
) -> None:
    caplog.set_level(logging.INFO)
    d = two_links
    fa, fb = d.frontend("a"), d.frontend("b")
    fc, fe = d.frontend("c"), d.frontend("e")
    size = 0x1000_0000
    fa.send_raw(
        HEADER.pack(Request.SET_FEATURES, NEED_REPLY, size)
        + (bytes(VHOST_USER_MAX_PAYLOAD_SIZE) if whole else b"")
    )
    # Only the header is needed to know the stream is lost: no waiting for payload that may never come.
    wait_closed_by_peer(fa)
    d.wait(lambda: "port a: front-end disconnected (protocol error)" in caplog.messages, "the drop")
    assert (
        f"port a: malformed message: SET_FEATURES: payload size {size} exceeds VHOST_USER_MAX_PAYLOAD_SIZE "
        f"({VHOST_USER_MAX_PAYLOAD_SIZE})"
    ) in caplog.messages
    # Another port never noticed; the same port takes a new front-end that works.
    exchange(fc, fe)
    fa2 = d.frontend("a")
    exchange(fa2, fb)
    exchange(fb, fa2)


@pytest.mark.parametrize(
    ("data", "log"),
    [
        (
            encode(Request.GET_FEATURES, V1, bytes(8)),
            "malformed message: GET_FEATURES: empty payload is 8 bytes, expected 0",
        ),
        (
            encode(Request.GET_QUEUE_NUM, 3, b""),
            "malformed message: GET_QUEUE_NUM: version 3 in flags 0x3, expected 1",
        ),
        (
            encode(Request.GET_VRING_BASE, V1, VringState(9, 0).pack()),
            "GET_VRING_BASE refused: queue 9 does not exist (device has 2)",
        ),
        (
            encode(Request.IOTLB_MSG, V1, IotlbMsg(0, 0, 0, 0, 0).pack()),
            "IOTLB_MSG refused: not supported by this device",
        ),
    ],
    ids=["malformed-get", "bad-version-get", "get-vring-base-of-no-queue", "unsupported-get"],
)
def test_a_request_that_cannot_be_answered_ends_the_connection(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture, data: bytes, log: str
) -> None:
    # The front-end waits for the answer of such a request forever: hanging up is the only honest reply.
    d = two_links
    fa, fb = d.frontend("a"), d.frontend("b")
    fa.send_raw(data)
    wait_closed_by_peer(fa)
    assert f"port a: {log}" in caplog.messages
    fa2 = d.frontend("a")
    exchange(fa2, fb)


def test_partial_message_with_an_fd_then_hang_up_leaks_nothing(two_links: RunningDaemon) -> None:
    d = two_links
    fa = d.frontend("a")
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fa.send_raw(encode(Request.SET_VRING_CALL, V1, VringFile(0).pack())[:-3], (fd,))
    finally:
        os.close(fd)
    assert fa.sock is not None
    fa.sock.close()
    fa.sock = None
    d.wait(lambda: not d.endpoint("a").is_connected, "a's connection to be dropped")
    # (The fixture checks that the daemon closed the fd it received.)


def test_resizing_a_running_ring_does_not_take_the_link_down(
    two_links: RunningDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = two_links
    fa, fb = d.frontend("a"), d.frontend("b")
    # SET_VRING_NUM on a started ring: the ring is mapped again at its new size, never read past the end
    # of its old mapping (its used_event and avail_event fields move with the size).
    assert fa.checked(Request.SET_VRING_NUM, VringState(1, 1024))
    assert fa.checked(Request.SET_VRING_NUM, VringState(0, 1024))
    fb.transmit(FRAMES[:1])  # the link runs: both of a's rings are looked at
    fb.wait_used(fb.queues[1], 1)
    # Whatever became of a's rings, the link serves a's next front-end, and the other link never noticed.
    fa.close()
    d.wait(lambda: d.totals("a")["tx_dropped"] == 1, "b's frame to be dropped with a gone")
    fa2 = d.frontend("a")
    exchange(fa2, fb)
    exchange(fb, fa2)
    exchange(d.frontend("c"), d.frontend("e"))
    assert not [m for m in caplog.messages if "removed from the datapath" in m]

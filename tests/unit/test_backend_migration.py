"""A live migration as QEMU drives it, with fake front-ends for the source and the destination guest on two
ports of a switch (docs/interop/vhost-user.rst, "Migration"): the source starts logging while its rings run
(SET_LOG_BASE, SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG on each running ring),
traffic flows, then QEMU 7.2's stop (SET_STATUS 0, GET_VRING_BASE); the destination gets the memory the
migration would have sent (the pages the guest wrote and the pages the back-end logged, nothing else) and
starts from the bases GET_VRING_BASE returned."""

from __future__ import annotations

import logging

import pytest
from daemons import StartDaemon

from vhostmap.lab.frontend import PAGE, UVA_BASE, FakeFrontend, FakeQueue
from vhostmap.vhost_user.memory import VHOST_LOG_PAGE
from vhostmap.vhost_user.messages import U64, VHOST_VRING_F_LOG, Request, VringAddr
from vhostmap.virtio.spec import VHOST_F_LOG_ALL, bit

pytestmark = pytest.mark.usefixtures("datapath")  # with the compiled and the reference datapath

GUEST, PEER = "02:00:00:00:00:0a", "02:00:00:00:00:02"


def frame(dst: str, src: str, seq: int) -> bytes:
    head = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5"
    return head + seq.to_bytes(4, "big") + bytes([seq % 256]) * 60


def to_peer(first: int, n: int) -> list[bytes]:
    return [frame(PEER, GUEST, k) for k in range(first, first + n)]


def to_guest(first: int, n: int) -> list[bytes]:
    return [frame(GUEST, PEER, k) for k in range(first, first + n)]


def used_idx(fe: FakeFrontend, fq: FakeQueue) -> int:
    return int.from_bytes(fe.mem[fq.used + 2 : fq.used + 4], "little")


def tx_heads(fe: FakeFrontend, n: int) -> list[int]:
    """The heads of the last ``n`` chains the guest made available on its transmit queue."""
    tx = fe.queues[1]
    slots = [(tx.avail_idx - n + k) % tx.num for k in range(n)]
    return [int.from_bytes(fe.mem[tx.avail + 4 + 2 * s : tx.avail + 6 + 2 * s], "little") for s in slots]


def guest_written_pages(fe: FakeFrontend) -> set[int]:
    """Pages the guest itself writes (QEMU tracks those): descriptor tables, available rings, transmit
    buffers. Used rings and receive buffers are written by the back-end alone."""
    pages: set[int] = set()
    for fq in fe.queues:
        pages.update(range(fq.desc // PAGE, (fq.used - 1) // PAGE + 1))
    tx = fe.queues[1]
    pages.update(range(tx.buffers // PAGE, (tx.buffers + tx.num * 4096 - 1) // PAGE + 1))
    return pages


def test_a_guest_migrated_with_the_dirty_log_resumes_exactly_where_its_source_stopped(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    d = start_daemon({"m0": "", "m1": "", "p": ""}, switches=["vale0=m0,m1,p"])
    peer = d.frontend("p")
    src = d.frontend("m0")
    peer.post_receive_buffers(128)
    src.post_receive_buffers(128)
    src.transmit(to_peer(0, 5))
    assert peer.receive(5) == to_peer(0, 5)
    peer.transmit(to_guest(0, 5))
    assert src.receive(5) == to_guest(0, 5)
    before = bytes(src.mem)

    # Migration starts: logging is switched on under running rings (QEMU: vhost_dev_set_log).
    bitmap = src.set_log_base()
    try:
        src.sync(Request.SET_FEATURES, U64(src.features | bit(VHOST_F_LOG_ALL)))
        for fq in src.queues:
            addr = VringAddr(
                fq.index,
                1 << VHOST_VRING_F_LOG,
                UVA_BASE + fq.desc,
                UVA_BASE + fq.used,
                UVA_BASE + fq.avail,
                fq.used,
            )
            src.sync(Request.SET_VRING_ADDR, addr)
        src.transmit(to_peer(5, 20))
        peer.transmit(to_guest(5, 20))
        assert peer.receive(20) == to_peer(5, 20)
        assert src.receive(20) == to_guest(5, 20)
        # Used entries the guest has not read yet when the source stops: the destination finds them.
        src.transmit(to_peer(25, 3))
        peer.transmit(to_guest(25, 3))
        rx, tx = src.queues
        d.wait(lambda: used_idx(src, rx) == (rx.last_used + 3) & 0xFFFF, "the source to receive 3 frames")
        d.wait(lambda: used_idx(src, tx) == tx.avail_idx, "the source to send every frame")
        src.sync(Request.SET_STATUS, U64(0))  # QEMU before 8.1 resets the status first
        bases = [src.stop_queue(fq) for fq in src.queues]
        logged = {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))}
    finally:
        bitmap.close()
    assert VHOST_LOG_PAGE == PAGE

    # What the destination gets: the memory as it was, plus every page the guest or the back-end dirtied.
    dst = d.frontend("m1", negotiate=False)
    mem = bytearray(before)
    for page in logged | guest_written_pages(src):
        mem[page * PAGE : (page + 1) * PAGE] = src.mem[page * PAGE : (page + 1) * PAGE]
    dst.mem[:] = bytes(mem)
    for s, t in zip(src.queues, dst.queues, strict=True):
        t.avail_idx, t.last_used, t.in_flight, t.next_desc, t.base = (
            s.avail_idx,
            s.last_used,
            s.in_flight,
            s.next_desc,
            s.base,
        )
    src.close()
    dst.negotiate()
    device = d.device("m1")
    assert [vq.used_idx for vq in device.vqs] == bases  # nothing in flight: used->idx met the base
    assert peer.receive(3) == to_peer(25, 3)
    # The transmit chains the guest had not taken back yet come back once each, from the migrated memory.
    sent = dst.used(dst.queues[1])
    assert len(sent) == 28 and [h for h, _ in sent[-3:]] == tx_heads(dst, 3)
    # The guest reads what the source delivered last from the migrated memory, then traffic goes on.
    dst.transmit(to_peer(28, 5))
    assert peer.receive(5) == to_peer(28, 5)
    peer.transmit(to_guest(28, 5))
    assert dst.receive(8) == to_guest(25, 3) + to_guest(28, 5)
    assert device.broken is None
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

"""Passthrough ports (netmap/passthrough.py) behind their ivshmem server (vhostmap.ivshmem), driven by an
in-process guest (pt_guest.FakePtGuest): the region it is handed and nothing else, exact frames both ways
through a link, a hostile guest reinitialised while another link forwards, a guest leaving and another taking
the port, a second guest refused, and a guest that never reads its socket."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from daemons import FRAME, RunningDaemon, StartDaemon, exchange, still_serving
from pt_guest import FakePtGuest, read_messages
from test_netmap_client import receive as app_receive
from test_netmap_client import send as app_send
from test_switch_daemon import frame, mac

from vhostmap.apps import client
from vhostmap.ivshmem import server as ivshmem_server
from vhostmap.ivshmem.protocol import DAEMON_PEER_ID, GUEST_ID, ClientConnection, PeerGone
from vhostmap.netmap.abi import PT_MAGIC, PT_VERSION, NetmapIfView
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.passthrough import SPARE_GUEST_BUFFERS, PassthroughPort

# Every test runs over the compiled syncs and over their Python references.
pytestmark = pytest.mark.usefixtures("datapath")

SLOTS = 256


def pt_port(sock_dir: Path, name: str = "pt0", options: str = "") -> str:
    return f"{name}=passthrough,path={sock_dir}/{name}.sock,slots={SLOTS}" + (
        f",{options}" if options else ""
    )


def port(d: RunningDaemon, name: str = "pt0") -> PassthroughPort:
    return d.daemon.passthrough[name]


def frames(n: int, tag: int = 0) -> list[bytes]:
    return [(bytes([tag]) + k.to_bytes(2, "big")) * 20 + FRAME[: k % 40] for k in range(n)]


@pytest.fixture
def guests() -> list[FakePtGuest]:
    made: list[FakePtGuest] = []
    yield made
    for g in made:
        g.close()


def connect(d: RunningDaemon, guests: list[FakePtGuest], name: str = "pt0") -> FakePtGuest:
    g = FakePtGuest(d.daemon.config.port(name).path)
    guests.append(g)
    d.wait(lambda: port(d, name).guest is not None, f"{name} to be handed to the guest")
    return g


def test_guest_gets_a_region_of_its_port_alone(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({"a": ""}, ["pt0,a"], other_ports=[pt_port(sock_dir, options="rings=2")])
    g = connect(d, guests)
    h = g.view.header
    assert (bytes(h.magic), h.version, g.peer) == (PT_MAGIC, PT_VERSION, DAEMON_PEER_ID)
    assert (h.doorbell_peer, h.doorbell_vector, h.generation) == (DAEMON_PEER_ID, 0, 1)
    assert g.parser.client_id == GUEST_ID
    assert (h.num_tx_rings, h.num_rx_rings, h.num_tx_slots, h.num_rx_slots) == (2, 2, SLOTS, SLOTS)
    # The BAR is a power of two holding the region; the region holds this port's if, 4 rings and their
    # buffers, nothing of the daemon's allocator (a different file, far smaller).
    bar = os.fstat(g.shm).st_size
    assert bar & (bar - 1) == 0 and h.region_size <= bar < 2 * h.region_size
    assert h.nbufs == 4 * SLOTS + SPARE_GUEST_BUFFERS
    assert os.fstat(g.shm).st_ino != os.fstat(d.daemon.memory.fd).st_ino
    assert bar < d.daemon.memory.size // 8
    nifp = NetmapIfView(g.region, int(h.nifp_offset))
    assert (nifp.name, len(nifp.tx_rings), len(nifp.rx_rings)) == ("pt0", 2, 2)
    assert (nifp.host_tx_rings, nifp.host_rx_rings) == (0, 0)
    # Every CSB entry starts where the rings are: TX rings owned by the guest but one slot, RX rings empty.
    for csb in g.view.tx_csb:
        assert (csb.ktoa.hwcur, csb.ktoa.hwtail, csb.ktoa.kern_need_kick) == (0, SLOTS - 1, 1)
    for csb in g.view.rx_csb:
        assert (csb.ktoa.hwcur, csb.ktoa.hwtail) == (0, 0)
    status = d.daemon.status({})["ports"]["pt0"]
    assert status["type"] == "passthrough" and status["connected"] and status["rings"] == 2


def test_frames_cross_a_link_both_ways_exactly(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({"a": ""}, ["pt0,a"], other_ports=[pt_port(sock_dir)])
    fe = d.frontend("a")
    g = connect(d, guests)
    # Three times what a guest ring holds, so that both directions wrap (the front-end's queues hold 256
    # chains: batches of 128).
    out, back = frames(3 * SLOTS, tag=1), frames(3 * SLOTS, tag=2)
    sent: list[bytes] = []
    received: list[bytes] = []
    for k in range(0, len(out), 128):
        fe.post_receive_buffers(128)
        g.send(out[k : k + 128])
        sent += fe.receive(128)
        fe.transmit(back[k : k + 128])
        received += g.receive(128)
        assert len(fe.wait_used(fe.queues[1], 128)) == 128
    assert sent == out
    assert received == back
    # Counted exactly, frames and bytes, on the port's side of the copies.
    q = d.stats("pt0")["queues"][0]
    assert (q["rx_packets"], q["rx_bytes"]) == (len(out), sum(map(len, out)))
    assert (q["tx_packets"], q["tx_bytes"]) == (len(back), sum(map(len, back)))
    assert (q["rx_dropped"], q["tx_dropped"], q["errors"]) == (0, 0, 0)
    counters = d.stats("pt0")["passthrough"]
    assert counters["attached"] and counters["guest_reinits"] == 0
    # The guest kicked far less than once per frame (only when the daemon was idle on its TX ring).
    assert g.kicks < len(out) // 4

    # Interrupts: none while the guest does not ask (appl_need_kick 0), one when it sleeps on its RX ring.
    rx, csb = g.rx[0], g.view.rx_csb[0]
    before = d.stats("pt0")["passthrough"]["interrupts"]
    hwtail = csb.read_hw()[1]
    fe.transmit(frames(5, tag=6))
    d.wait(lambda: csb.read_hw()[1] == (hwtail + 5) % SLOTS, "5 frames in the guest's RX ring")
    assert d.stats("pt0")["passthrough"]["interrupts"] == before
    assert g.receive(5) == frames(5, tag=6)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(g.irq)  # an interrupt left from the receives above
    csb.atok.appl_need_kick = 1
    g.sync(rx)
    assert rx.empty()
    fe.transmit(frames(1, tag=7))
    assert select.select([g.irq], [], [], 5.0)[0], "no interrupt for a guest sleeping on its RX ring"
    os.eventfd_read(g.irq)
    csb.atok.appl_need_kick = 0
    assert g.receive(1) == frames(1, tag=7)
    assert d.stats("pt0")["passthrough"]["interrupts"] == before + 1
    assert len(fe.wait_used(fe.queues[1], 6)) == 6


def test_an_application_holding_the_port_exchanges_frames_with_the_guest(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({}, other_ports=[pt_port(sock_dir)])
    g = connect(d, guests)
    with client.open("pt0", str(d.workdir / "control.sock")) as app:
        out = frames(300, tag=8)
        got: list[bytes] = []
        for k in range(0, len(out), 100):
            g.send(out[k : k + 100])
            got += app_receive(app, 100)
        assert got == out
        back = frames(300, tag=9)
        received: list[bytes] = []
        for k in range(0, len(back), 100):
            app_send(app, back[k : k + 100])
            received += g.receive(100)
        assert received == back


def test_frames_cross_a_switch_both_ways_exactly(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({"a": "", "b": ""}, switches=["vale0=pt0,a,b"], other_ports=[pt_port(sock_dir)])
    fa, fb = d.frontend("a"), d.frontend("b")
    g = connect(d, guests)
    guest, a = mac(1), mac(10)
    # a announces itself (a broadcast reaches the guest and b); then each side sends to the other's address.
    hello = frame("ff:ff:ff:ff:ff:ff", a)
    fb.post_receive_buffers(1)
    fa.transmit([hello])
    assert g.receive(1) == [hello]
    assert fb.receive(1) == [hello]
    out = [frame(a, guest, 60 + k, seq=k) for k in range(100)]
    fa.post_receive_buffers(len(out))
    g.send(list(out))
    assert fa.receive(len(out)) == out
    back = [frame(guest, a, 1514 - k, seq=k) for k in range(100)]
    fb.post_receive_buffers(len(back))  # room for a flood that must not happen
    fa.transmit(back)
    assert g.receive(len(back)) == back
    assert len(fa.wait_used(fa.queues[1], 101)) == 101
    assert fb.used(fb.queues[0]) == [], "unicast to the guest flooded to b"


def test_hostile_guest_is_reinitialised_while_another_link_forwards(
    start_daemon: StartDaemon,
    sock_dir: Path,
    guests: list[FakePtGuest],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Kring, "REINIT_LOG_INTERVAL", 0.0)  # every reinit logged, for the lines below
    d = start_daemon({"a": "", "b": "", "c": ""}, ["pt0,a", "b,c"], other_ports=[pt_port(sock_dir)])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    g = connect(d, guests)
    pt = port(d)
    tx, csb = g.tx[0], g.view.tx_csb[0]

    def reinits() -> int:
        return int(d.stats("pt0")["passthrough"]["guest_reinits"])

    def attack(what: str, act: object) -> None:
        before = reinits()
        assert callable(act)
        act()
        os.eventfd_write(g.doorbell, 1)  # kick whatever kern_need_kick says
        d.wait(lambda: reinits() > before, f"a reinit after {what}")
        still_serving(d, fb, fc)

    caplog.set_level(logging.WARNING)
    # head beyond the ring; an RX head past what was received; cur before head.
    attack("head out of range", lambda: csb.write_head_cur(SLOTS + 5, SLOTS + 5))
    attack("RX head past hwtail", lambda: g.view.rx_csb[0].write_head_cur(5, 5))
    attack("cur before head", lambda: csb.write_head_cur(3, 1))

    # A slot handed over with a reserved buffer, and one with a buffer past the pool.
    def bad_slot(buf_idx: int) -> None:
        i = tx.head
        tx.slots["buf_idx"][i], tx.slots["len"][i] = buf_idx, 60
        tx.advance(1)
        csb.write_head_cur(tx.head, tx.cur)

    attack("a reserved buffer", lambda: bad_slot(1))
    attack("a buffer past the pool", lambda: bad_slot(10**6))
    # Garbage over the whole CSB entry of the guest's TX and RX rings, flags included.
    rng = np.random.default_rng(7)

    def garbage() -> None:
        for entry in (g.view.tx_csb[0], g.view.rx_csb[0]):
            start = entry.offset
            g.region.array[start : start + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
            g.region.array[start + 64 : start + 128] = rng.integers(0, 256, 64, dtype=np.uint8)

    attack("CSB garbage", garbage)
    # The nonsense stays in the CSB: the daemon waits for the next kick instead of coming back for it.
    settled = reinits()
    still_serving(d, fb, fc)
    assert reinits() - settled <= 2, "the datapath keeps reinitialising a ring nobody kicked"
    # Kicks during the garbage reach a daemon that may also find the RX ring's: both count.
    assert reinits() >= 6
    lines = [r.getMessage() for r in caplog.records if "ring reinit" in r.getMessage()]
    assert any("pt0 guest TX0" in line and "head 261 >= num_slots" in line for line in lines), lines
    assert any("pt0 guest RX0" in line and "head 5 outside" in line for line in lines), lines
    assert any("cur 1 outside" in line for line in lines), lines
    assert any("buf_idx 1 is reserved" in line for line in lines), lines
    assert pt.broken is None

    # The guest's driver starts again from what the reinit wrote into its rings; the port works.
    for ring in (g.tx[0], g.rx[0]):
        c = g.csb(ring)
        c.atok.appl_need_kick = c.atok.sync_flags = 0
        hwcur, hwtail = c.read_hw()
        ring.view.head = ring.view.cur = hwcur
        ring.view.tail = hwtail
        g.sync(ring)
    out = frames(20, tag=3)
    fa.post_receive_buffers(len(out))
    g.send(list(out))
    assert fa.receive(len(out)) == out
    exchange(fb, fc)


def test_a_guest_leaving_releases_the_port_and_the_next_one_gets_a_fresh_region(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({"a": ""}, ["pt0,a"], other_ports=[pt_port(sock_dir)])
    fe = d.frontend("a")
    first = connect(d, guests)
    inode = os.fstat(first.shm).st_ino
    first.send(frames(5))
    fe.post_receive_buffers(5)
    assert fe.receive(5) == frames(5)
    # Frames the port took for a guest that leaves are dropped once it is gone, not kept for the next one.
    # (Taken first: frames still in the front-end's ring when the next guest comes are that one's.)
    fe.transmit(frames(3, tag=9))
    assert len(fe.wait_used(fe.queues[1], 3)) == 3
    first.close()
    guests.remove(first)
    d.wait(lambda: port(d).guest is None, "pt0 to be released")
    assert not d.stats("pt0")["passthrough"]["attached"]

    second = connect(d, guests)
    assert second.view.header.generation == 2
    assert os.fstat(second.shm).st_ino != inode
    out = frames(40, tag=4)
    fe.transmit(out)
    got = second.receive(len(out))
    assert len(fe.wait_used(fe.queues[1], 40)) == 40
    assert got == out, "frames meant for the guest that left reached the next one"
    second.send(frames(7, tag=5))
    fe.post_receive_buffers(7)
    assert fe.receive(7) == frames(7, tag=5)


def test_frames_waiting_for_room_in_a_leaving_guest_never_reach_the_next_one(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    """More frames than the first guest's receive ring holds (it reads none): the rest wait in the port's TX
    kring, and go when the guest goes, whether or not a sync runs before the next guest comes."""
    d = start_daemon({"a": ""}, ["pt0,a"], other_ports=[pt_port(sock_dir)])
    fe = d.frontend("a")
    first = connect(d, guests)
    for n in (200, 100):
        fe.transmit(frames(n, tag=9))
        assert len(fe.wait_used(fe.queues[1], n)) == n
    tx = port(d).tx_rings[0]
    d.wait(lambda: tx.pending() == 300 - (SLOTS - 1), "the guest's ring to be full, the rest waiting")
    first.close()
    guests.remove(first)
    d.wait(lambda: port(d).guest is None, "pt0 to be released")
    assert (tx.pending(), tx.dropped) == (0, 300 - (SLOTS - 1))
    second = connect(d, guests)
    out = frames(40, tag=4)
    fe.transmit(out)
    assert second.receive(len(out)) == out


def test_a_second_guest_is_refused_and_the_first_keeps_the_port(
    start_daemon: StartDaemon,
    sock_dir: Path,
    guests: list[FakePtGuest],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = start_daemon({"a": ""}, ["pt0,a"], other_ports=[pt_port(sock_dir)])
    fe = d.frontend("a")
    g = connect(d, guests)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder:
        intruder.connect(d.daemon.config.port("pt0").path)
        # Refused before anything was sent: the stream ends without a byte.
        assert read_messages(intruder, ClientConnection(), 5.0) == [None]
    assert any("refusing a second guest" in r.getMessage() for r in caplog.records)
    assert d.daemon.pt_endpoints[0].refused == 1
    g.send(frames(4))
    fe.post_receive_buffers(4)
    assert fe.receive(4) == frames(4)


def test_a_guest_that_never_reads_blocks_nothing(start_daemon: StartDaemon, sock_dir: Path) -> None:
    d = start_daemon({"b": "", "c": ""}, ["b,c"], other_ports=[pt_port(sock_dir)])
    fb, fc = d.frontend("b"), d.frontend("c")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        silent.connect(d.daemon.config.port("pt0").path)
        d.wait(lambda: port(d).guest is not None, "pt0 to be handed to the silent guest")
        # It sends junk and never reads: the daemon discards it and serves everyone else.
        silent.sendall(b"\xff" * 100_000)
        still_serving(d, fb, fc)
    d.wait(lambda: port(d).guest is None, "pt0 to be released when the silent guest hangs up")


def test_a_guest_whose_messages_cannot_be_queued_is_dropped_and_the_port_released(
    start_daemon: StartDaemon,
    sock_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A welcome is 5 messages; with room for 3 unsent the guest is dropped before it read anything.
    monkeypatch.setattr(ivshmem_server, "MAX_QUEUED_MESSAGES", 3)
    caplog.set_level(logging.INFO, logger="vhostmap.ivshmem.server")
    d = start_daemon({}, other_ports=[pt_port(sock_dir)])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as guest:
        guest.connect(d.daemon.config.port("pt0").path)
        assert read_messages(guest, ClientConnection(), 5.0) == [None]
    d.wait(lambda: port(d).guest is None and port(d).generation == 1, "pt0 to be released")
    assert any("does not read its socket" in r.getMessage() for r in caplog.records)


def test_the_daemon_stopping_tells_the_guest_its_peer_is_gone(
    start_daemon: StartDaemon, sock_dir: Path, guests: list[FakePtGuest]
) -> None:
    d = start_daemon({}, other_ports=[pt_port(sock_dir)])
    g = connect(d, guests)
    d.daemon.stop()
    deadline = time.monotonic() + 5
    seen: list[object] = []
    while None not in seen and time.monotonic() < deadline:
        seen += read_messages(g.sock, g.parser, 5.0)
    assert seen == [PeerGone(DAEMON_PEER_ID), None]

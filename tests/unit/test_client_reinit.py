"""A netmap application that writes a bad buf_idx into its TX ring gets the ring reinitialised, and after that
traffic flows both ways again with every frame delivered: the reinit gives every slot a valid buffer (no
buffer 0 left behind), and the allocator gets every buffer back when the port closes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from daemons import RunningDaemon, StartDaemon
from test_netmap_client import open_port, receive, send
from test_switch_daemon import frame, mac

from vhostmap.apps.client import ClientPort
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.netmap.abi import NM_RESERVED_BUFS, RING_HEADER_SIZE, SLOT_DTYPE
from vhostmap.netmap.kring import Kring


def corrupt_and_reinit(
    port: ClientPort, d: RunningDaemon, caplog: pytest.LogCaptureFixture, bad: int
) -> None:
    """Hand the daemon a TX slot naming buffer ``bad``; wait for the reinit and its log line."""
    ring = port.tx_rings[0]
    ring.slots["buf_idx"][ring.cur] = bad
    ring.slots["len"][ring.cur] = 60
    ring.advance(1)
    port.txsync()
    d.wait(lambda: port.stats()[0]["reinits"] == 1, "the ring to be reinitialised")
    assert "ring reinit" in caplog.text
    # Every slot of the ring holds a usable buffer again, and no two slots share one.
    bufs = ring.slots["buf_idx"]
    assert (bufs >= NM_RESERVED_BUFS).all() and len(set(bufs.tolist())) == ring.num_slots


@pytest.mark.parametrize("bad", [0xFFFFFF, 1])
def test_guest_port_opened_by_an_application(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, bad: int
) -> None:
    caplog.set_level(logging.WARNING)
    d = start_daemon({"g": ""})
    guest = d.frontend("g")
    before = d.daemon.memory.stats()["netmap_buf"]["objfree"]
    with open_port(d, "g") as port:
        corrupt_and_reinit(port, d, caplog, bad)
        # Well over a ring's worth each way: every TX slot, the repaired one included, carries a frame.
        out = [frame(mac(0x10), mac(0x20), 100, k) for k in range(2 * port.tx_rings[0].num_slots)]
        for k in range(0, len(out), 256):
            guest.post_receive_buffers(256)
            send(port, out[k : k + 256])
            assert guest.receive(256) == out[k : k + 256]
        back = [frame(mac(0x20), mac(0x10), 90, k) for k in range(200)]
        guest.transmit(back)
        assert receive(port, 200) == back
        assert d.totals("g")["tx_dropped"] == 0
    d.wait(lambda: d.daemon.serving["g"].name == "sink g", "the port to go back to its sink")
    assert d.daemon.memory.stats()["netmap_buf"]["objfree"] == before


def test_two_applications_on_a_switch(start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    d = start_daemon({}, switches=[])
    before = d.daemon.memory.stats()["netmap_buf"]["objfree"]
    with open_port(d, "vale0:bad") as bad, open_port(d, "vale0:a") as a:
        corrupt_and_reinit(bad, d, caplog, 0xFFFFFF)
        n = 2 * bad.tx_rings[0].num_slots
        out = [frame(mac(0xA), mac(0xBA), 80, k) for k in range(n)]
        for k in range(0, n, 128):
            send(bad, out[k : k + 128])
            assert receive(a, 128) == out[k : k + 128]
        back = [frame(mac(0xBA), mac(0xA), 80, k) for k in range(n)]
        for k in range(0, n, 128):
            send(a, back[k : k + 128])
            assert receive(bad, 128) == back[k : k + 128]
    d.wait(lambda: "vale0:bad" not in d.daemon.adapters, "the ports to go")
    d.wait(lambda: "vale0:a" not in d.daemon.adapters, "the ports to go")
    assert d.daemon.memory.stats()["netmap_buf"]["objfree"] == before


def stream(x: FakeFrontend, y: FakeFrontend, n: int) -> None:
    """``n`` frames from x to y in bursts of 128, every one delivered, byte-exact."""
    for k in range(0, n, 128):
        frames = [bytes([j % 256]) * 60 + k.to_bytes(4, "big") for j in range(128)]
        y.post_receive_buffers(128)
        x.transmit(frames)
        assert y.receive(128) == frames
        x.wait_used(x.queues[1], 128)  # the transmit descriptors back, for the next burst


@pytest.mark.usefixtures("datapath")
def test_a_link_whose_tx_ring_was_reinitialised_delivers_again(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An application (every port's rings live in the region it maps) writes bad buffer indexes into the next
    # free slots of a linked port's RX ring: the link swaps them into b's TX ring, whose prologue refuses it
    # and reinitialises it. After that both directions deliver every frame, and no buffer is lost.
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(Kring, "REINIT_LOG_INTERVAL", 3600.0, raising=False)
    d = start_daemon({"a": "", "b": "", "x": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    stream(fa, fb, 128)
    a_rx, b_tx = d.daemon.ports["a"].rx_rings[0], d.daemon.ports["b"].tx_rings[0]
    ring = a_rx.ring
    with open_port(d, "x") as app:
        slots = np.frombuffer(
            app.region.mm, dtype=SLOT_DTYPE, count=ring.num_slots, offset=ring.offset + RING_HEADER_SIZE
        )
        slots["buf_idx"][a_rx.nr_hwtail : a_rx.nr_hwtail + 4] = [0xFFFF_FF00, 1, 0xFFFF_FF00, 1]
        del slots
        fa.transmit([bytes([k]) * 60 for k in range(4)])  # into the scratch buffer: dropped
        fa.wait_used(fa.queues[1], 4)
        d.wait(lambda: b_tx.reinits == 1, "b's TX ring to be reinitialised")
        # More than a whole ring each way: every slot of both rings carries frames again.
        stream(fa, fb, 3 * ring.num_slots)
        stream(fb, fa, 3 * ring.num_slots)
        reinit_lines = [m for m in caplog.messages if "ring reinit" in m]
        assert len(reinit_lines) <= len(d.daemon.adapters) * 2  # at most one per ring: not one per frame
        with d.daemon.worker.lock:
            assert not d.daemon.memory._lost().any()
            for port in ("a", "b"):
                for k in d.daemon.ports[port].tx_rings + d.daemon.ports[port].rx_rings:
                    assert (k.ring.slots["buf_idx"] >= NM_RESERVED_BUFS).all(), k.name

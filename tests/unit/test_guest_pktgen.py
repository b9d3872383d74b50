"""The guest's pkt-gen and mode selection, on the host: its loops over an in-process port, its command line,
and "auto"/"native"/"generic" over a veth pair (which has no virtio device, so native mode is unavailable).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vhostmap.apps.pktgen import Limits
from vhostmap.lab.netns import VethPair, set_up, wait_transmitting
from vhostmap.netmap.abi import NR_REG_ALL_NIC
from vhostmap.netmap.adapter import LoopbackAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.packets import Addresses, udp_frame
from vhostmap_guest import open as guest_open
from vhostmap_guest.driver import NativeUnavailable
from vhostmap_guest.pktgen import (
    SEQ_OFFSET,
    build_parser,
    interface_name,
    main,
    numbered,
    receive_checked,
    transmit_numbered,
)
from vhostmap_guest.port import AdapterPort

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates veth pairs (needs root)")
FRAME = udp_frame(60, Addresses(bytes.fromhex("020000000001")))


@pytest.fixture
def loopback() -> Iterator[AdapterPort]:
    """A port whose TX ring i comes back on RX ring i (zero copy), two ring pairs."""
    mem = NetmapMemory(AllocatorParams(if_num=1, ring_num=6, ring_size=256 + 16 * 1024, buf_num=8192))
    adapter = LoopbackAdapter("lo0", mem, num_rings=2)

    def release() -> None:
        adapter.close()
        mem.close()

    port = AdapterPort("lo0", adapter.register(NR_REG_ALL_NIC), wait=None, release=release, mode="test")
    yield port
    port.close()


def test_numbers_go_at_the_start_of_the_udp_payload() -> None:
    f = numbered(FRAME, 0x01020304)
    assert len(f) == len(FRAME) and f[SEQ_OFFSET : SEQ_OFFSET + 4] == b"\x01\x02\x03\x04"
    assert f[:SEQ_OFFSET] == FRAME[:SEQ_OFFSET] and f[SEQ_OFFSET + 4 :] == FRAME[SEQ_OFFSET + 4 :]


def test_numbered_frames_spread_over_rings_and_are_received_exactly(loopback: AdapterPort) -> None:
    sent = transmit_numbered(loopback, FRAME, Limits(count=900), batch=64)
    assert sent.packets == 900
    assert all(r.space() == r.num_slots - 1 for r in loopback.tx_rings)  # everything reclaimed
    loopback.rxsync()
    assert all(not r.empty() for r in loopback.rx_rings), "one batch per ring: both rings carry frames"
    got, check = receive_checked(loopback, FRAME, Limits(count=900, duration=5), seq=True)
    assert got.packets == 900
    assert check.__dict__ == {"mismatched": 0, "missing": 0, "duplicates": 0, "reordered": 0}


def test_a_corrupted_frame_is_found_and_its_number_missed(loopback: AdapterPort) -> None:
    transmit_numbered(loopback, FRAME, Limits(count=10), batch=10)
    loopback.rxsync()
    ring = loopback.rx_rings[0]
    ring.buffers[ring.slots["buf_idx"][ring.cur + 3], 20] ^= 0xFF  # one byte of frame 3's IP header
    _, check = receive_checked(loopback, FRAME, Limits(count=10, duration=0.5), seq=True)
    assert check.mismatched == 1 and check.missing == 1 and check.duplicates == 0


def test_a_receiver_with_idle_stops_once_frames_stop_coming(loopback: AdapterPort) -> None:
    transmit_numbered(loopback, FRAME, Limits(count=100), batch=50)
    start = time.monotonic()
    # 300 asked, 100 come: --idle ends the run soon after the last instead of at -D.
    got, check = receive_checked(loopback, FRAME, Limits(count=300, duration=30), seq=True, idle=0.2)
    assert got.packets == 100 and check.missing == 200 and check.mismatched == 0
    assert time.monotonic() - start < 10, "the receiver waited for -D despite --idle"


def test_command_line_defaults_and_limits() -> None:
    args = build_parser().parse_args(["-i", "eth0", "-f", "tx"])
    assert (args.mode, args.length, args.count, args.batch) == ("auto", 60, 0, 1024)
    assert main(["-i", "eth0", "-f", "tx", "-l", "20"]) == 2
    assert main(["-i", "eth0", "-f", "tx", "-b", "0"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-i", "eth0", "-f", "tx", "--mode", "fast"])


@pytest.mark.parametrize(
    ("name", "ifname"),
    [("eth0", "eth0"), ("eth0-1", "eth0"), ("eth0^", "eth0"), ("0000:00:02.0", "0000:00:02.0")],
)
def test_interface_names_follow_nm_open(name: str, ifname: str) -> None:
    assert interface_name(name) == ifname


def test_a_guest_has_no_switches() -> None:
    with pytest.raises(ValueError, match="switch"):
        guest_open("vale0:a")
    with pytest.raises(ValueError, match="mode"):
        guest_open("eth0", "fast")  # type: ignore[arg-type]


# --- over a veth pair -------------------------------------------------------------------------------------
@pytest.fixture
def veth() -> Iterator[VethPair]:
    with VethPair() as pair:
        for name in (pair.name, pair.peer):
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
            set_up(name)
        for name in (pair.name, pair.peer):
            wait_transmitting(name)
        yield pair


def peer_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((ifname, 3))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    return s


@needs_root
def test_auto_mode_falls_back_to_generic_and_native_mode_refuses(veth: VethPair) -> None:
    with pytest.raises(NativeUnavailable):
        guest_open(veth.name, "native")
    with guest_open(veth.name) as port:
        assert port.mode == "generic"
        assert len(port.tx_rings) == len(port.rx_rings) == 1


@needs_root
def test_generic_mode_sends_and_receives_exactly(veth: VethPair) -> None:
    peer = peer_socket(veth.peer)
    try:
        with guest_open(veth.name, "generic") as port:
            result = transmit_numbered(port, FRAME, Limits(count=300), batch=50)
            assert result.packets == 300
            got = []
            while len(got) < 300 and select.select([peer], [], [], 2.0)[0]:
                got.append(peer.recv(4096))
            assert got == [numbered(FRAME, i) for i in range(300)]

            for i in range(300):
                peer.send(numbered(FRAME, i))
            rx, check = receive_checked(port, FRAME, Limits(count=300, duration=5), seq=True)
            assert rx.packets == 300 and check.__dict__ == {
                "mismatched": 0,
                "missing": 0,
                "duplicates": 0,
                "reordered": 0,
            }
    finally:
        peer.close()


@needs_root
def test_socket_mode_sends_numbered_frames_one_by_one(
    veth: VethPair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = peer_socket(veth.peer)
    got: list[bytes] = []

    def capture() -> None:
        while len(got) < 100 and select.select([peer], [], [], 2.0)[0]:
            got.append(peer.recv(4096))

    t = threading.Thread(target=capture)
    t.start()
    try:
        src = "--src-mac=02:00:00:00:00:01"
        rc = main(["-i", veth.name, "-f", "tx", "-n", "100", "--mode", "socket", "--seq", src, "--json"])
        t.join(10)
    finally:
        peer.close()
    assert rc == 0 and '"driver": "socket"' in capsys.readouterr().out
    assert got == [numbered(FRAME, i) for i in range(100)]


def test_received_data_is_a_copy(loopback: AdapterPort) -> None:
    loopback.tx_rings[0].send([FRAME])
    loopback.txsync()
    loopback.rxsync()
    b = loopback.rx_rings[0].receive()
    data = b.data(60)
    data[:] = 0
    assert np.array_equal(b.data(60)[0], np.frombuffer(FRAME, np.uint8))

"""Live capture (`vhostmap capture`): the compiled tap against its Python reference, and captures of running
ports over the real control socket: every frame both ways on a link (the one-copy pass included) and on an
application's switch port (the Python syncs), a slow reader that loses captured frames but never traffic, a
reader that corrupts its ring or tries to resize it, and the command line's pcapng read back by tshark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from daemons import RunningDaemon, StartDaemon
from hypothesis import given
from hypothesis import strategies as st
from test_netmap_client import open_port, receive, send
from test_switch_daemon import BROADCAST, frame, mac, needs_root, packet_socket, recv_frames

from vhostmap.apps import capture
from vhostmap.apps.capture import CapturedFrame, CaptureReader
from vhostmap.control import client as control
from vhostmap.datapath import ffi
from vhostmap.lab.netns import VethPair
from vhostmap.netmap.abi import NR_RX, NS_MOREFRAG, SLOT_DTYPE, RingView
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.capture import (
    CAP_HEADER,
    MIN_RING_BYTES,
    RING_HEADER_DTYPE,
    CaptureRings,
    TapState,
    tap_commit_reference,
    tap_stage_reference,
)
from vhostmap.netmap.kring import Kring

N = 16
BUF = 2048
SIZE = MIN_RING_BYTES


@pytest.fixture(scope="module")
def kring() -> Iterator[Kring]:
    """An RX kring of N slots whose buffers hold recognisable bytes (buffer b: bytes b, b + 1, ...)."""
    with NetmapMemory(AllocatorParams(if_num=2, ring_num=2, ring_size=1024, buf_num=64)) as mem:
        layout = mem.create_if("t", 1, 1, N, N, 0, 0)
        r = layout.rx_rings[0]
        view = RingView(mem.region, r.offset, r.num_slots, buf_ofs=mem.buffers_offset - r.offset)
        k = Kring(view, direction=NR_RX, ring_id=0, port="t", nbufs=mem.nbufs, buf_size=BUF)
        for b in range(mem.nbufs):
            view.buf(b)[:] = (np.arange(BUF) + b) % 251
        yield k


slot_arrays = st.lists(
    st.tuples(
        st.one_of(st.integers(2, 63), st.integers(64, 1 << 20), st.integers(0, 1)),
        st.one_of(st.integers(1, BUF), st.just(0), st.integers(BUF + 1, 0xFFFF)),
        st.sampled_from([0, 0, NS_MOREFRAG, NS_MOREFRAG, 1]),
    ),
    min_size=N,
    max_size=N,
)


@given(
    slots=slot_arrays,
    first=st.integers(0, N + 1),
    count=st.integers(0, N + 1),
    sent=st.integers(0, N),
    snaplen=st.one_of(st.integers(1, 128), st.integers(1, 4 * BUF)),
    start=st.integers(0, 3 * SIZE // 16).map(lambda k: 16 * k),
    behind=st.one_of(st.integers(0, SIZE), st.integers(-(1 << 40), 1 << 40)),
    ts=st.integers(0, 1 << 63),
)
def test_compiled_tap_agrees_with_the_reference(
    kring: Kring,
    slots: list[tuple[int, int, int]],
    first: int,
    count: int,
    sent: int,
    snaplen: int,
    start: int,
    behind: int,
    ts: int,
) -> None:
    arr = np.zeros(N, dtype=SLOT_DTYPE)
    arr["buf_idx"], arr["len"], arr["flags"] = zip(*slots, strict=True)
    kring.ring.slots[:] = arr
    got = CaptureRings([(kring, "t", "in")], SIZE, snaplen)
    want = CaptureRings([(kring, "t", "in")], SIZE, snaplen)
    try:
        tap = got.taps[0]
        tap.c.head = tap.c.published = start
        tail = (start - behind) % (1 << 64)  # a reader behind by `behind` bytes, or one writing nonsense
        state = TapState(head=start, published=start)
        ring = np.frombuffer(want.region.mm, dtype=RING_HEADER_DTYPE, count=1)[0]
        data = want.region.array[CAP_HEADER:]
        for rings in (got, want):
            np.frombuffer(rings.region.mm, dtype=RING_HEADER_DTYPE, count=1)[0]["tail"] = tail
        staged = tap.stage(first, count, ts)
        assert staged == tap_stage_reference(state, ring, data, kring, first, count, ts)
        assert tap.commit(sent) == tap_commit_reference(state, ring, sent)
        assert (tap.frames, tap.dropped, int(tap.c.published)) == (
            state.frames,
            state.dropped,
            state.published,
        )
        assert got.region.array.tobytes() == want.region.array.tobytes()
    finally:
        got.close()
        want.close()


def control_path(d: RunningDaemon) -> str:
    return str(d.workdir / "control.sock")


def read_until(cap: CaptureReader, n: int, what: str, d: RunningDaemon) -> list[CapturedFrame]:
    """Read until ``n`` frames came (waiting on the daemon's counters first), in order."""
    d.wait(lambda: cap.counts()["frames"] >= n, f"{n} frames {what} to be captured")
    return cap.read()


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("size", [60, 1500, 5000])
def test_a_link_captured_both_ways_frame_for_frame(start_daemon: StartDaemon, size: int) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000"}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    there = [frame(mac(2), mac(1), size, k) for k in range(40)]
    back = [frame(mac(1), mac(2), size, k) for k in range(30)]
    with capture.open("a", control_path(d)) as cap:
        assert cap.interfaces == ["a"]
        fb.post_receive_buffers(2 * len(there))
        fa.transmit(there)
        assert fb.receive(len(there)) == there
        fa.post_receive_buffers(2 * len(back))
        fb.transmit(back)
        assert fa.receive(len(back)) == back
        got = read_until(cap, len(there) + len(back), "on a", d)
        assert [f.data for f in got if f.direction == "in"] == there
        assert [f.data for f in got if f.direction == "out"] == back
        assert all(f.iface == "a" and f.length == size for f in got)
        assert [f.ts_ns for f in got] == sorted(f.ts_ns for f in got)
        assert cap.counts() == {"frames": 70, "dropped": 0}
        assert d.daemon.status({})["captures"] == [
            {"port": "a", "pid": os.getpid(), "frames": 70, "dropped": 0}
        ]
    d.wait(lambda: not d.daemon.captures, "the capture to end with its connection")
    assert all(k.tap is None and k.c.tap == ffi.NULL for k in d.daemon.adapters["a"].rx_rings)


@pytest.mark.usefixtures("datapath")
def test_an_application_switch_port_captured_through_the_python_syncs(start_daemon: StartDaemon) -> None:
    d = start_daemon({"g": ""}, switches=["vale0=g"])
    guest = d.frontend("g")
    with open_port(d, "vale0:app") as app, capture.open("vale0:app", control_path(d)) as cap:
        # The pipe's master end is the switch port: its rxsync brings the application's frames in, its
        # txsync swaps the guest's into the application's ring (the tap reads them before the swap).
        out = [frame(mac(0x10), mac(0xA), 100, k) for k in range(200)]
        guest.post_receive_buffers(len(out))
        send(app, out)
        assert guest.receive(len(out)) == out
        back = [frame(mac(0xA), mac(0x10), 90, k) for k in range(150)]
        guest.transmit(back)
        assert receive(app, len(back)) == back
        got = read_until(cap, 350, "on vale0:app", d)
        assert [f.data for f in got if f.direction == "in"] == out
        assert [f.data for f in got if f.direction == "out"] == back
        assert {f.iface for f in got} == {"vale0:app"}


def test_a_slow_reader_loses_captured_frames_never_traffic(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    frames = [frame(mac(2), mac(1), 1000, k) for k in range(200)]
    with capture.open("a", control_path(d), direction="in", snaplen=1500, ring_bytes=SIZE) as cap:
        fb.post_receive_buffers(len(frames))
        fa.transmit(frames)  # nobody reads the capture meanwhile
        assert fb.receive(len(frames)) == frames
        d.wait(lambda: sum(cap.counts().values()) == len(frames), "every frame to be written or dropped")
        counts = cap.counts()
        assert 0 < counts["frames"] < len(frames) and counts["dropped"] == len(frames) - counts["frames"]
        # What was written is whole: the first frames, before the ring filled.
        assert [f.data for f in cap.read()] == frames[: counts["frames"]]
        # Room again: the next frames are captured.
        fb.post_receive_buffers(5)
        fa.transmit(frames[:5])
        assert fb.receive(5) == frames[:5]
        assert [f.data for f in read_until(cap, counts["frames"] + 5, "after reading", d)] == frames[:5]
    assert d.totals("a")["rx_packets"] == 205 and d.totals("b")["tx_dropped"] == 0


def test_a_reader_that_corrupts_its_ring_or_resizes_it_hurts_only_its_capture(
    start_daemon: StartDaemon,
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    with control.connect(control_path(d)) as sock:
        reply, fds = control.request(sock, "capture", port="a", direction="in")
        [memfd] = fds
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(memfd, 4096)  # sealed: the daemon's mapping stays whole
            with pytest.raises(control.ControlError, match="another capture runs on a RX0"):
                capture.open("a", control_path(d))
            [ring] = reply["rings"]
            with open(f"/proc/self/fd/{memfd}", "r+b", buffering=0) as f:
                f.seek(ring["offset"] + 8)  # struct nm_cap_ring.tail
                f.write((1 << 63).to_bytes(8, "little"))
            frames = [frame(mac(2), mac(1), 60, k) for k in range(20)]
            fb.post_receive_buffers(len(frames))
            fa.transmit(frames)
            assert fb.receive(len(frames)) == frames
            status = d.daemon.status({})["captures"]
            assert status == [{"port": "a", "pid": os.getpid(), "frames": 0, "dropped": 20}]
        finally:
            os.close(memfd)
    d.wait(lambda: not d.daemon.captures, "the capture to end with its connection")
    with capture.open("a^", control_path(d)) as cap:
        assert cap.interfaces == ["a^"]
    for bad, error in (
        ({"port": "nosuch"}, "no port named 'nosuch'"),
        ({"port": "a", "direction": "up"}, "direction 'up'"),
        ({"port": "a", "snaplen": 0}, "snaplen 0"),
        ({"port": "a", "ring_bytes": 1000}, "a power of two"),
    ):
        with pytest.raises(control.ControlError, match=error):
            control.call(control_path(d), "capture", **bad)
    exchange_ok = [frame(mac(2), mac(1), 60, 99)]
    fb.post_receive_buffers(1)
    fa.transmit(exchange_ok)
    assert fb.receive(1) == exchange_ok


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is installed by scripts/setup")
def test_the_command_streams_pcapng_that_tshark_reads(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fields = ["frame.interface_name", "frame.packet_flags_direction", "eth.src", "frame.len"]
    argv = [sys.executable, "-m", "vhostmap.cli", "capture", "a", "-c", "6", "-w", "-", "--control"]
    with subprocess.Popen([*argv, control_path(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as cap:
        assert cap.stdout is not None and cap.stderr is not None
        with subprocess.Popen(
            ["tshark", "-r", "-", "-T", "json", *(a for f in fields for a in ("-e", f))],
            stdin=cap.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as tshark:
            cap.stdout.close()  # tshark's now
            d.wait(lambda: d.daemon.captures, "the capture to start")
            there = [frame(mac(2), mac(1), 60, k) for k in range(4)]
            fb.post_receive_buffers(4)
            fa.transmit(there)
            assert fb.receive(4) == there
            back = [frame(mac(1), mac(2), 60, k) for k in range(2)]
            fa.post_receive_buffers(2)
            fb.transmit(back)
            assert fa.receive(2) == back
            out, _ = tshark.communicate(timeout=30)
        assert cap.wait(10) == 0
        assert b"6 packets captured" in cap.stderr.read()
    rows = [p["_source"]["layers"] for p in json.loads(out)]
    assert [(r["frame.interface_name"][0], int(r["frame.packet_flags_direction"][0], 16)) for r in rows] == [
        ("a", 1)
    ] * 4 + [("a", 2)] * 2
    assert [r["eth.src"][0] for r in rows] == [mac(1)] * 4 + [mac(2)] * 2
    assert [r["frame.len"][0] for r in rows] == ["60"] * 6


@needs_root
def test_a_generic_port_and_a_tap_behind_host_rings_captured(
    tap: str, veth: VethPair, start_daemon: StartDaemon
) -> None:
    d = start_daemon(
        {"a": f"host={tap}"}, switches=["vale0=a,up"], other_ports=[f"up=generic,ifname={veth.name}"]
    )
    d.frontend("a")
    with capture.open("up", control_path(d)) as up, capture.open("a^", control_path(d)) as host:
        with packet_socket(veth.peer) as far, packet_socket(tap) as stack:
            from_far = frame(BROADCAST, mac(0xD), seq=1)
            far.send(from_far)  # into up, flooded to a and to a's host stack
            assert recv_frames(stack, 1) == [from_far]
            from_stack = frame(mac(0xD), mac(0xC), seq=2)
            stack.send(from_stack)  # into a^, forwarded to up (mac 0xD learnt there)
            assert recv_frames(far, 1) == [from_stack]
        got_up = read_until(up, 2, "on up", d)
        got_host = read_until(host, 2, "on a^", d)
    assert [(f.direction, f.data) for f in got_up] == [("in", from_far), ("out", from_stack)]
    assert [(f.direction, f.data) for f in got_host] == [("out", from_far), ("in", from_stack)]
    assert {f.iface for f in got_host} == {"a^"}


def test_without_w_the_command_prints_a_line_per_frame(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    argv = [sys.executable, "-m", "vhostmap.cli", "capture", "a", "-c", "2", "--direction", "in"]
    with subprocess.Popen([*argv, "--control", control_path(d)], stdout=subprocess.PIPE, text=True) as cap:
        d.wait(lambda: d.daemon.captures, "the capture to start")
        sent = [frame(mac(2), mac(1), 60, k) for k in range(2)]
        fb.post_receive_buffers(2)
        fa.transmit(sent)
        assert fb.receive(2) == sent
        out, _ = cap.communicate(timeout=30)
    assert cap.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(
        line.split(" ", 1)[1] == "a in  60 bytes 02:00:00:00:00:01 > 02:00:00:00:00:02 ethertype 0x88b5"
        for line in lines
    ), lines

"""netmap's pkt-gen loops over any `NetmapPort`: a daemon's port through the client library (the ``vhostmap
pkt-gen`` command, pktgen_cli.py) or a guest's NIC (vhostmap_guest.pktgen).

Modes (``-f``): ``tx`` sends copies of one UDP frame as fast as allowed (``-R`` pps), ``rx`` counts what
arrives, ``ping`` sends ICMP echo requests one at a time and measures the round trip of each reply (answered
by ``pong``, or by dpdk-testpmd's icmpecho mode), ``pong`` answers echo requests. Stops after ``-n`` frames
or ``-D`` seconds, whichever comes first, and prints packets, pps, bit rate (and round-trip percentiles),
with ``--json`` as one JSON object.

The loops work a batch at a time over `NetmapPort` (so they run over a guest's NIC too): a TX batch is one
head move over slots whose buffers were filled once (`UserRing.prefill`; a buffer the port swapped for
another, NS_BUF_CHANGED, is filled again), an RX batch is counted from the slot lengths with numpy, pong
rewrites a whole batch of requests into replies with numpy.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.abi import NS_BUF_CHANGED
from vhostmap.netmap.checksum import inet_checksum
from vhostmap.netmap.user import POLLIN, POLLOUT, NetmapPort, UserRing
from vhostmap.packets import (
    ETH_HLEN,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IP_HLEN,
    IPPROTO_ICMP,
    Addresses,
    ether_header,
    ipv4_header,
)

PING_PAYLOAD = struct.Struct("!QI")  # send time (ns, monotonic) and pkt-gen's run id
DEFAULT_BATCH = 512


def echo_request(length: int, seq: int, ident: int, sent_ns: int, run_id: int, addr: Addresses) -> bytes:
    """An ICMP echo request frame of ``length`` bytes carrying its send time."""
    icmp_len = length - ETH_HLEN - IP_HLEN
    body = PING_PAYLOAD.pack(sent_ns, run_id).ljust(icmp_len - 8, b"\0")
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF) + body
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    return ether_header(addr) + ipv4_header(addr, IPPROTO_ICMP, icmp_len, seq & 0xFFFF) + icmp


@dataclass
class Result:
    """What a run did. ``rtt_us`` holds round-trip statistics (ping mode)."""

    mode: str
    port: str
    packets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    lost: int = 0
    rtt_us: dict[str, float] = field(default_factory=dict)

    @property
    def pps(self) -> float:
        """Packets per second."""
        return self.packets / self.seconds if self.seconds > 0 else 0.0

    @property
    def bps(self) -> float:
        """Bits per second on the wire (frame bytes + 24: preamble, FCS, inter-frame gap), as pkt-gen."""
        return (self.bytes + 24 * self.packets) * 8 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """For --json."""
        return {**asdict(self), "pps": round(self.pps, 1), "bps": round(self.bps, 1)}

    def summary(self) -> str:
        """One line for people (two with round trips)."""
        line = (
            f"{self.mode} {self.port}: {self.packets} packets, {self.bytes} bytes in {self.seconds:.3f} s: "
            f"{self.pps / 1e6:.3f} Mpps, {self.bps / 1e9:.3f} Gbit/s"
        )
        if self.rtt_us:
            r = self.rtt_us
            line += (
                f"\nround trip (us): min {r['min']:.1f} p50 {r['p50']:.1f} p90 {r['p90']:.1f} "
                f"p99 {r['p99']:.1f} max {r['max']:.1f}; lost {self.lost}"
            )
        return line


class Limits:
    """When a run ends (``count`` frames, ``duration`` seconds, 0 = no limit) and how fast it may send."""

    def __init__(self, count: int = 0, duration: float = 0.0, rate: float = 0.0) -> None:
        self.count, self.duration, self.rate = count, duration, rate
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.start

    def left(self, done: int) -> int | None:
        """Frames still to go (None: unlimited)."""
        return None if not self.count else max(0, self.count - done)

    def over(self, done: int) -> bool:
        """Whether the run is over after ``done`` frames."""
        return (self.count > 0 and done >= self.count) or (0 < self.duration <= self.elapsed())

    def allowed(self, done: int) -> int | None:
        """Frames the rate limit allows now (None: no limit)."""
        return None if self.rate <= 0 else max(0, int(self.rate * self.elapsed()) - done)


def _fill_changed(ring: UserRing, n: int, frame: npt.NDArray[np.uint8]) -> None:
    """Refill the buffers of the next ``n`` slots that the port swapped for others (NS_BUF_CHANGED)."""
    idx = ring.indexes(n)
    changed = idx[(ring.slots["flags"][idx] & NS_BUF_CHANGED) != 0]
    if changed.size:
        ring.buffers[ring.slots["buf_idx"][changed], : len(frame)] = frame


def transmit(
    port: NetmapPort, frame: bytes, limits: Limits, batch: int = DEFAULT_BATCH, report: Reporter | None = None
) -> Result:
    """Send copies of ``frame`` on every TX ring of ``port`` until ``limits`` say stop; then wait (up to 5 s)
    for the port to have taken every slot, so that the count is what left."""
    data = np.frombuffer(frame, np.uint8)
    for ring in port.tx_rings:
        ring.prefill(data)
    sent = 0
    while not limits.over(sent):
        budget = min(x for x in (batch, limits.left(sent), limits.allowed(sent)) if x is not None)
        if budget == 0:
            if limits.allowed(sent) == 0:
                time.sleep(min(0.001, 1 / limits.rate))  # pacing, not synchronisation
            continue
        moved = 0
        for ring in port.tx_rings:
            n = min(budget - moved, ring.space())
            if n:
                _fill_changed(ring, n, data)
                moved += ring.send_template(n, data, write=False)
        sent += moved
        port.txsync()
        if report:
            report(sent, len(frame))
        if moved == 0:
            port.poll(POLLOUT, 1.0)
    seconds = limits.elapsed()
    left = _drain(port)
    if left:
        # Frames still in a TX ring when the port closes are discarded (as netmap's are): they did not leave.
        print(f"pkt-gen: {left} frames still in the TX rings after the wait: not counted", file=sys.stderr)
        sent -= left
    return Result("tx", getattr(port, "name", "?"), sent, sent * len(frame), seconds)


def _drain(port: NetmapPort, timeout: float = 5.0) -> int:
    """Wait up to ``timeout`` seconds for the port to take every TX slot; how many it has not taken."""
    deadline = time.monotonic() + timeout
    while (left := sum(r.num_slots - 1 - r.space() for r in port.tx_rings)) and time.monotonic() < deadline:
        port.txsync()
        port.poll(POLLOUT, 0.05)
    return left


def receive(port: NetmapPort, limits: Limits, report: Reporter | None = None) -> Result:
    """Count frames arriving on every RX ring until ``limits`` say stop (or -n frames arrived)."""
    got = nbytes = 0
    first: float | None = None
    while not limits.over(got):
        wait = 1.0 if not limits.duration else max(0.0, min(1.0, limits.duration - limits.elapsed()))
        if not port.poll(POLLIN, wait):
            continue
        for ring in port.rx_rings:
            b = ring.receive()
            if len(b):
                first = first if first is not None else time.monotonic()
                got += b.frame_count
                nbytes += b.byte_count
                ring.advance(len(b))
        port.rxsync()
        if report:
            report(got, nbytes // max(got, 1))
    # The rate counts from the first frame: a receiver is usually started before the sender.
    seconds = time.monotonic() - first if first is not None else 0.0
    return Result("rx", getattr(port, "name", "?"), got, nbytes, seconds)


def ping(port: NetmapPort, length: int, limits: Limits, addr: Addresses, timeout: float = 1.0) -> Result:
    """Send echo requests one at a time and time each reply; a request unanswered in ``timeout`` is lost."""
    run_id = int(time.monotonic_ns() & 0xFFFFFFFF)
    ident = run_id & 0xFFFF
    tx = port.tx_rings[0]
    rtts: list[int] = []
    lost = seq = 0
    while not limits.over(seq):
        sent_ns = time.monotonic_ns()
        while tx.send([echo_request(length, seq, ident, sent_ns, run_id, addr)]) == 0:
            port.poll(POLLOUT, timeout)
        port.txsync()
        deadline = time.monotonic() + timeout
        answered = False
        while not answered and time.monotonic() < deadline:
            if not port.poll(POLLIN, max(0.0, deadline - time.monotonic())):
                break
            for ring in port.rx_rings:
                b = ring.receive()
                for f in b.frames():
                    if _is_reply(f, ident, seq, run_id):
                        rtts.append(time.monotonic_ns() - sent_ns)
                        answered = True
                ring.advance(len(b))
            port.rxsync()
        lost += not answered
        seq += 1
    seconds = limits.elapsed()
    result = Result("ping", getattr(port, "name", "?"), len(rtts), len(rtts) * length, seconds, lost)
    if rtts:
        us = np.array(rtts, dtype=np.float64) / 1000
        result.rtt_us = {
            "min": float(us.min()),
            "mean": float(us.mean()),
            "p50": float(np.percentile(us, 50)),
            "p90": float(np.percentile(us, 90)),
            "p99": float(np.percentile(us, 99)),
            "max": float(us.max()),
        }
    return result


def _is_reply(f: bytes, ident: int, seq: int, run_id: int) -> bool:
    off = ETH_HLEN + IP_HLEN
    if len(f) < off + 8 + PING_PAYLOAD.size or f[12:14] != b"\x08\x00" or f[ETH_HLEN + 9] != IPPROTO_ICMP:
        return False
    kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", f, off)
    _, rrun = PING_PAYLOAD.unpack_from(f, off + 8)
    return kind == ICMP_ECHO_REPLY and rid == ident and rseq == seq & 0xFFFF and rrun == run_id


def echo_replies(frames: npt.NDArray[np.uint8], lens: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
    """Turn the ICMP echo requests among ``frames`` (one per row) into replies, in place, a batch at a time:
    MAC and IP addresses swapped, type 0, checksum adjusted (RFC 1624). The mask of rows that were requests.
    """
    if frames.shape[1] < ETH_HLEN + IP_HLEN + 8:
        return np.zeros(len(frames), dtype=bool)
    ip, icmp = ETH_HLEN, ETH_HLEN + IP_HLEN
    mask = (
        (lens >= icmp + 8)
        & (frames[:, 12] == 0x08)
        & (frames[:, 13] == 0x00)
        & (frames[:, ip] == 0x45)
        & (frames[:, ip + 9] == IPPROTO_ICMP)
        & (frames[:, icmp] == ICMP_ECHO_REQUEST)
    )
    r = frames[mask]
    r[:, 0:6], r[:, 6:12] = frames[mask, 6:12], frames[mask, 0:6]
    r[:, ip + 12 : ip + 16], r[:, ip + 16 : ip + 20] = (
        frames[mask, ip + 16 : ip + 20],
        frames[mask, ip + 12 : ip + 16],
    )
    r[:, icmp] = ICMP_ECHO_REPLY
    csum = r[:, icmp + 2].astype(np.uint32) << 8 | r[:, icmp + 3]
    csum += 0x0800  # the type word went down by 0x0800: its one's complement sum goes up as much
    csum = (csum & 0xFFFF) + (csum >> 16)
    r[:, icmp + 2], r[:, icmp + 3] = csum >> 8, csum & 0xFF
    frames[mask] = r
    return mask


def pong(port: NetmapPort, limits: Limits) -> Result:
    """Answer ICMP echo requests arriving on RX ring 0 from TX ring 0, a batch at a time."""
    tx, rx = port.tx_rings[0], port.rx_rings[0]
    answered = nbytes = 0
    while not limits.over(answered):
        wait = 1.0 if not limits.duration else max(0.0, min(1.0, limits.duration - limits.elapsed()))
        if not port.poll(POLLIN, wait):
            continue
        b = rx.receive(tx.space())
        if len(b):
            data = b.data()
            mask = echo_replies(data, b.lens)
            if mask.any():
                tx.send(data[mask], b.lens[mask])
                answered += int(mask.sum())
                nbytes += int(b.lens[mask].sum())
            rx.advance(len(b))
            port.txsync()
        port.rxsync()
        if not tx.space():
            port.poll(POLLOUT, 1.0)
    return Result("pong", getattr(port, "name", "?"), answered, nbytes, limits.elapsed())


Reporter = Callable[[int, int], None]


def periodic_reporter(every: float, mode: str, out: Any = sys.stderr) -> Reporter:
    """A progress callback printing the rate over the last ``every`` seconds."""
    state = {"t": time.monotonic(), "n": 0}

    def report(total: int, size: int) -> None:
        now = time.monotonic()
        if now - state["t"] >= every:
            pps = (total - state["n"]) / (now - state["t"])
            print(f"{mode}: {pps / 1e6:.3f} Mpps ({total} so far, {size}-byte frames)", file=out, flush=True)
            state["t"], state["n"] = now, total

    return report

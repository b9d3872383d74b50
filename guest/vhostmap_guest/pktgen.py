"""``python -m vhostmap_guest.pktgen``: netmap's pkt-gen for a guest's NIC: native, generic, socket, or a
vhostmap passthrough port.

    python -m vhostmap_guest.pktgen -i eth0 -f tx -l 60 -n 100000 --mode native --json
    python -m vhostmap_guest.pktgen -i eth0 -f rx -n 100000 -D 30 --mode generic --check --seq
    python -m vhostmap_guest.pktgen -i pt:0 -f tx -n 100000 --mode passthrough

Modes: ``native``, ``generic`` and ``passthrough`` open the port with `vhostmap_guest.open` (``auto`` picks
between the first two as it does);
``socket`` is the guest kernel's plain path, one AF_PACKET send() or recv() per frame, for comparison. On the
host, ``vhostmap pkt-gen`` runs the same loops over a daemon's port (the guest package never reaches the
daemon's control socket). The frames are vhostmap pkt-gen's UDP frames (`vhostmap.packets.udp_frame`).

The loops are the host's `vhostmap.apps.pktgen.transmit` and `receive`, which know only the NetmapPort API:
buffers are filled once (`UserRing.prefill`) and every batch is one head move. ``--seq`` numbers the frames
(a big-endian u32 at the start of the UDP payload, written into the batch's buffers with one numpy store)
and spreads batches over every TX ring; ``--check`` makes the receiver compare every frame with the
expected one (the number aside) and count missing and duplicated numbers. Stops after ``-n`` frames or
``-D`` seconds, whichever comes first; prints one line, or with ``--json`` one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vhostmap import ethernet
from vhostmap.apps.pktgen import Limits, Result, receive, transmit
from vhostmap.ethernet import ETH_HLEN, ETH_P_ALL
from vhostmap.netmap.abi import NS_BUF_CHANGED, NS_MOREFRAG, PT_HEARTBEAT_TIMEOUT
from vhostmap.netmap.user import POLLIN, POLLOUT, NetmapPort
from vhostmap.packets import IP_HLEN, MAX_FRAME, MIN_FRAME, Addresses, udp_frame
from vhostmap_guest.passthrough import PassthroughPort, PassthroughUnavailable

MODES = ("auto", "native", "generic", "passthrough", "socket")
# Where --seq puts the frame number: the first 4 bytes of the UDP payload.
SEQ_OFFSET = ETH_HLEN + IP_HLEN + 8
SEQ = struct.Struct(">I")
# Frames per head move: as many as a ring takes (ring room bounds a batch anyway).
DEFAULT_BATCH = 1024
# The socket receiver's queue (SO_RCVBUFFORCE, asm-generic/socket.h; Python's socket module lacks the name).
SO_RCVBUFFORCE = 33
SOCKET_RCVBUF = 32 << 20


@dataclass
class Check:
    """What a checking receiver found: frames unlike the expected one, and (with numbers) the numbers
    never seen, seen more than once, or seen out of order within a ring."""

    mismatched: int = 0
    missing: int = 0
    duplicates: int = 0
    reordered: int = 0


def parse_mac(text: str) -> bytes:
    """``52:54:00:00:00:01`` -> 6 bytes (an argparse type)."""
    try:
        return ethernet.parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_ip(text: str) -> bytes:
    """``10.0.0.1`` -> 4 bytes."""
    try:
        return socket.inet_aton(text)
    except OSError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def interface_mac(ifname: str) -> bytes | None:
    """The MAC address of a network interface, if it exists."""
    try:
        return parse_mac(Path(f"/sys/class/net/{ifname}/address").read_text().strip())
    except (OSError, argparse.ArgumentTypeError):
        return None


def interface_name(name: str) -> str:
    """The interface (or PCI address) an nm_open-style name refers to."""
    from vhostmap_guest import port_spec  # as open_port does

    try:
        return port_spec(name).port
    except ValueError:
        return name


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m vhostmap_guest.pktgen", description="Send or receive frames as fast as the guest can."
    )
    p.add_argument("-i", "--interface", required=True, help="interface (nm_open syntax: eth0, eth0-1)")
    p.add_argument("-f", "--function", choices=("tx", "rx"), required=True)
    p.add_argument("-l", "--length", type=int, default=60, help="frame length without FCS (60..2048)")
    p.add_argument("-n", "--count", type=int, default=0, help="stop after this many frames (0: no limit)")
    p.add_argument("-D", "--duration", type=float, default=0.0, help="stop after this many seconds (0: none)")
    p.add_argument("-b", "--batch", type=int, default=DEFAULT_BATCH, help="frames per head move")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--pairs", type=int, default=None, help="native: queue pairs to run (default all)")
    p.add_argument(
        "--busy", action="store_true", help="native, passthrough: busy-poll instead of sleeping on interrupts"
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=PT_HEARTBEAT_TIMEOUT,
        help="passthrough: seconds of a still daemon heartbeat before giving up (default %(default)s)",
    )
    p.add_argument("--seq", action="store_true", help="tx: number the frames; rx (with --check): expect them")
    p.add_argument("--check", action="store_true", help="rx: compare every frame with the one expected")
    p.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="rx --check: stop once frames came and then none for this long",
    )
    p.add_argument("--ready", type=Path, help="create this file once the port is open (for scripts)")
    p.add_argument("--src-mac", type=parse_mac, help="default: the interface's")
    p.add_argument("--dst-mac", type=parse_mac, default=b"\xff" * 6)
    p.add_argument("--src-ip", type=parse_ip, default=parse_ip("10.0.0.1"))
    p.add_argument("--dst-ip", type=parse_ip, default=parse_ip("10.1.0.1"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def expected_frame(args: argparse.Namespace, src_mac: bytes) -> bytes:
    """The frame the run sends (or expects), number 0."""
    return udp_frame(args.length, Addresses(src_mac, args.dst_mac, args.src_ip, args.dst_ip))


def numbered(frame: bytes, seq: int) -> bytes:
    """``frame`` carrying number ``seq``."""
    return frame[:SEQ_OFFSET] + SEQ.pack(seq & 0xFFFFFFFF) + frame[SEQ_OFFSET + SEQ.size :]


# --- netmap loops (any NetmapPort) --------------------------------------------------------------------------
def transmit_numbered(port: NetmapPort, frame: bytes, limits: Limits, batch: int = DEFAULT_BATCH) -> Result:
    """Like `vhostmap.apps.pktgen.transmit`, with frame numbers 0, 1, ... and each batch spread over every TX
    ring: the numbers of a batch are one numpy store into its (prefilled) buffers; a buffer the port
    swapped for another (NS_BUF_CHANGED) is filled again first."""
    data = np.frombuffer(frame, np.uint8)
    rings = list(port.tx_rings)
    for ring in rings:
        ring.prefill(data)
    sent = 0
    share = max(1, batch // len(rings))
    while not limits.over(sent):
        left = limits.left(sent)
        moved = 0
        for ring in rings:
            n = min(share, ring.space(), (left - moved) if left is not None else share)
            if n <= 0:
                continue
            idx = ring.indexes(n)
            bufs = ring.slots["buf_idx"][idx]
            changed = (ring.slots["flags"][idx] & NS_BUF_CHANGED) != 0
            if changed.any():  # the port swapped these buffers for others: fill them
                ring.buffers[bufs[changed], : len(data)] = data
            seqs = (sent + moved + np.arange(n, dtype=np.uint64)).astype(">u4")
            ring.buffers[bufs, SEQ_OFFSET : SEQ_OFFSET + SEQ.size] = seqs.view(np.uint8).reshape(n, SEQ.size)
            moved += ring.send_template(n, data, write=False)
        sent += moved
        port.txsync()
        if moved == 0:
            port.poll(POLLOUT, 1.0)
    seconds = limits.elapsed()
    drain(port)
    return Result("tx", port.name, sent, sent * len(frame), seconds)


def drain(port: NetmapPort, timeout: float = 5.0) -> None:
    """Wait (up to ``timeout``) until the port has taken every slot handed to it."""
    deadline = time.monotonic() + timeout
    while any(r.space() < r.num_slots - 1 for r in port.tx_rings) and time.monotonic() < deadline:
        port.poll(POLLOUT, 0.05)
        port.txsync()


def receive_checked(
    port: NetmapPort, frame: bytes, limits: Limits, seq: bool, idle: float = 0.0
) -> tuple[Result, Check]:
    """Receive until ``limits`` say stop (or, with ``idle``, once frames came and then none for ``idle``
    seconds), comparing every frame with ``frame`` (its number aside with ``seq``); only matching frames
    count towards ``-n``. The rate is over the time from the first frame to the last."""
    expected = np.frombuffer(frame, np.uint8)
    length = len(frame)
    compare = np.ones(length, dtype=bool)
    if seq:
        compare[SEQ_OFFSET : SEQ_OFFSET + SEQ.size] = False
    seen = np.zeros(limits.count, dtype=np.int64) if seq and limits.count else None
    check = Check()
    good = nbytes = 0
    last = [-1] * len(port.rx_rings)  # frames keep their order within a ring (a queue), not across rings
    first: float | None = None
    latest = 0.0  # when the last frame came
    while not limits.over(good):
        wait = 1.0 if not limits.duration else max(0.0, min(1.0, limits.duration - limits.elapsed()))
        if idle and first is not None:
            wait = min(wait, idle)
        if not port.poll(POLLIN, wait):
            if idle and first is not None and time.monotonic() - latest >= idle:
                break
            continue
        for r, ring in enumerate(port.rx_rings):
            b = ring.receive()
            if not len(b):
                continue
            latest = time.monotonic()
            first = first if first is not None else latest
            data = b.data(length)
            whole = (b.flags & NS_MOREFRAG) == 0  # a frame in one slot (others cannot match anyway)
            ok = (b.lens == length) & whole & (data[:, compare] == expected[compare]).all(axis=1)
            check.mismatched += int(np.count_nonzero(~ok))
            good += int(np.count_nonzero(ok))
            nbytes += int(b.lens[ok].sum())
            if seen is not None and ok.any():
                nums = (
                    data[ok, SEQ_OFFSET : SEQ_OFFSET + SEQ.size].copy().view(">u4").ravel().astype(np.int64)
                )
                inside = nums < len(seen)
                check.mismatched += int(np.count_nonzero(~inside))
                np.add.at(seen, nums[inside], 1)
                order = np.concatenate(([last[r]], nums))
                check.reordered += int(np.count_nonzero(np.diff(order) < 0))
                last[r] = int(nums[-1])
            ring.advance(len(b))
        port.rxsync()
    if seen is not None:
        check.missing = int(np.count_nonzero(seen == 0))
        check.duplicates = int((seen[seen > 1] - 1).sum())
    seconds = latest - first if first is not None else 0.0
    return Result("rx", port.name, good, nbytes, seconds), check


# --- the kernel's socket path -------------------------------------------------------------------------------
def socket_transmit(ifname: str, frame: bytes, limits: Limits, seq: bool) -> Result:
    """One AF_PACKET send() per frame (retrying when the qdisc is full): the guest kernel's plain path."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((ifname, 0))
        buf = bytearray(frame)
        sent = 0
        send, pack = s.send, SEQ.pack_into
        while not limits.over(sent):
            if seq:
                pack(buf, SEQ_OFFSET, sent & 0xFFFFFFFF)
            try:
                send(buf)
            except OSError as e:
                if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise
                time.sleep(0.0002)  # the device queue is full: let it drain (pacing, not synchronisation)
                continue
            sent += 1
        return Result("tx", ifname, sent, sent * len(frame), limits.elapsed())


def socket_receive(
    ifname: str, frame: bytes, limits: Limits, check: bool, seq: bool, ready: Path | None = None
) -> tuple[Result, Check]:
    """One AF_PACKET recv() per frame, counting (and with ``check`` comparing) what arrives; ``ready`` is
    created once the socket is bound (frames sent before that never reach it)."""
    result = Check()
    length = len(frame)
    head, tail = frame[:SEQ_OFFSET], frame[SEQ_OFFSET + SEQ.size :] if seq else frame[SEQ_OFFSET:]
    seen = np.zeros(limits.count, dtype=np.int64) if check and seq and limits.count else None
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((ifname, ETH_P_ALL))
        # The kernel fills the socket far faster than one recv() per frame empties it (TCG guests above all):
        # a queue that holds a run's burst instead of dropping it (FORCE: beyond rmem_max, as root).
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_RCVBUF)
        if ready is not None:
            ready.touch()
        s.settimeout(0.5)
        buf = bytearray(MAX_FRAME + 64)
        got = nbytes = 0
        first: float | None = None
        while not limits.over(got):
            try:
                n, addr = s.recvfrom_into(buf)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            first = first if first is not None else time.monotonic()
            if check:
                ok = n == length and buf[:SEQ_OFFSET] == head and buf[n - len(tail) : n] == tail
                if not ok:
                    result.mismatched += 1
                    continue
                if seen is not None:
                    (num,) = SEQ.unpack_from(buf, SEQ_OFFSET)
                    if num < len(seen):
                        seen[num] += 1
                    else:
                        result.mismatched += 1
            got += 1
            nbytes += n
        if seen is not None:
            result.missing = int(np.count_nonzero(seen == 0))
            result.duplicates = int((seen[seen > 1] - 1).sum())
        seconds = time.monotonic() - first if first is not None else 0.0
        return Result("rx", ifname, got, nbytes, seconds), result


# --- main ---------------------------------------------------------------------------------------------------
def open_port(args: argparse.Namespace) -> tuple[NetmapPort, str]:
    """The port ``args`` ask for, and the mode it was opened in."""
    import vhostmap_guest

    port = vhostmap_guest.open(
        args.interface,
        args.mode,
        pairs=args.pairs,
        interrupts=not args.busy,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    return port, port.mode


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the generator; returns the result as a dict (what --json prints)."""
    ifname = interface_name(args.interface)
    src_mac = args.src_mac or interface_mac(ifname) or bytes.fromhex("020000000001")
    frame = expected_frame(args, src_mac)
    limits_args = (args.count, args.duration)
    check: Check | None = None
    extra: dict[str, Any] = {}
    if args.mode == "socket":
        limits = Limits(*limits_args)
        if args.function == "tx":
            if args.ready:
                args.ready.touch()
            result = socket_transmit(ifname, frame, limits, args.seq)
        else:
            result, check = socket_receive(ifname, frame, limits, args.check, args.seq, args.ready)
        mode = "socket"
    else:
        port, mode = open_port(args)
        with port:
            if args.function == "rx":
                port.rxsync()  # receive buffers are posted: the sender may start
            if args.ready:
                args.ready.touch()
            limits = Limits(*limits_args)
            if args.function == "tx":
                if args.seq:
                    result = transmit_numbered(port, frame, limits, args.batch)
                else:
                    result = transmit(port, frame, limits, args.batch)
            elif args.check:
                result, check = receive_checked(port, frame, limits, args.seq, args.idle)
            else:
                result = receive(port, limits)
        if isinstance(port, PassthroughPort):
            # Whether the driver slept on the device's interrupt (vfio-pci) or busy-polled, and why.
            extra = {"sleeps": port.sleeps, "interrupt_problem": port.interrupt_problem}
    out = {**result.as_dict(), "driver": mode, "length": args.length, **extra}
    if check is not None:
        out["check"] = check.__dict__
    return out


def summary(out: dict[str, Any]) -> str:
    """One line for people."""
    line = (
        f"{out['mode']} {out['driver']} {out['port']}: {out['packets']} frames of {out['length']} B in "
        f"{out['seconds']:.3f} s: {out['pps'] / 1e3:.1f} Kpps"
    )
    if "check" in out:
        line += "; " + ", ".join(f"{k} {v}" for k, v in out["check"].items())
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 0 when the run reached -n (or had no -n) and every check passed."""
    args = build_parser().parse_args(argv)
    if not MIN_FRAME <= args.length <= MAX_FRAME:
        print(f"pktgen: -l {args.length} outside {MIN_FRAME}..{MAX_FRAME}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.count < 0 or args.duration < 0:
        print("pktgen: -b must be >= 1, -n and -D >= 0", file=sys.stderr)
        return 2
    if not args.count and not args.duration:
        args.duration = 10.0
    try:
        out = run(args)
    except KeyboardInterrupt:
        return 130
    except PassthroughUnavailable as e:  # no such port, or its daemon stopped: say so, no traceback
        print(f"pktgen: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else summary(out), flush=True)
    ok = not args.count or out["packets"] >= args.count
    if "check" in out:
        ok = ok and out["check"]["mismatched"] == 0 and out["check"]["missing"] == 0
        ok = ok and out["check"]["duplicates"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

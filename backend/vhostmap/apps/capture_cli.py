"""``vhostmap capture``: a port of the running daemon into a pcapng file or stream (``-w FILE``, ``-w -``), or
one line per frame; tcpdump's summary at the end (frames captured, frames the daemon dropped)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from vhostmap.apps.capture import CapturedFrame, CaptureReader, PcapngStream
from vhostmap.control.client import ControlError
from vhostmap.ethernet import ETH_HLEN, format_mac

#: Seconds a reader with nothing to read waits before it looks again.
POLL_INTERVAL = 0.005


def run(args: argparse.Namespace) -> int:
    """Run ``vhostmap capture`` until -c frames were written, Ctrl-C or SIGTERM, the reader of ``-w -`` went
    away, or the daemon did."""
    if args.count < 0:
        print("vhostmap capture: -c must be >= 0", file=sys.stderr)
        return 2
    try:
        reader = CaptureReader(
            args.port,
            args.control,
            direction=args.direction,
            snaplen=args.snaplen,
            ring_bytes=args.buffer_size * 1024,
        )
    except (ControlError, ValueError, OSError) as e:
        print(f"vhostmap capture: {e}", file=sys.stderr)
        return 1
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    written, rc = 0, 0
    with reader, contextlib.ExitStack() as files:
        print(f"vhostmap capture: listening on {args.port}, {', '.join(reader.interfaces)}", file=sys.stderr)
        try:
            out = _output(args.write, reader, files)
            while not stopping:
                frames = reader.read()
                if args.count:
                    frames = frames[: args.count - written]
                if frames:
                    out(frames)
                    written += len(frames)
                    if args.count and written >= args.count:
                        break
                elif not reader.wait(POLL_INTERVAL):
                    print("vhostmap capture: the daemon closed the connection", file=sys.stderr)
                    rc = 1
                    break
        except BrokenPipeError:
            # The reader of -w - (tcpdump -c, head) has gone: stop as tcpdump does, quietly (and let nothing
            # be flushed into the broken pipe at exit).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        counts = reader.counts()
    print(f"{written} packets captured", file=sys.stderr)
    print(f"{counts['dropped']} packets dropped by vhostmap (reader too slow)", file=sys.stderr)
    return rc


def _output(
    write: str | None, reader: CaptureReader, files: contextlib.ExitStack
) -> Callable[[list[CapturedFrame]], None]:
    """Where frames go: a pcapng file (closed by ``files``), pcapng on stdout (``-``), or summary lines."""
    if write is None:
        return _print_lines
    stream: BinaryIO = sys.stdout.buffer if write == "-" else files.enter_context(open(write, "wb"))  # noqa: SIM115
    return PcapngStream(stream, reader.interfaces, reader.snaplen).write


def _print_lines(frames: list[CapturedFrame]) -> None:
    for f in frames:
        stamp = time.strftime("%H:%M:%S", time.localtime(f.ts_ns // 1_000_000_000))
        line = f"{stamp}.{f.ts_ns % 1_000_000_000:09d} {f.iface} {f.direction:<3} {f.length} bytes"
        if len(f.data) >= ETH_HLEN:
            ethertype = int.from_bytes(f.data[12:14], "big")
            line += f" {format_mac(f.data[6:12])} > {format_mac(f.data[0:6])} ethertype {ethertype:#06x}"
        print(line, flush=True)

"""``vhostmap pkt-gen``: the pkt-gen loops (pktgen.py) over a port of a running daemon, opened through the
client library; prints packets, pps and bit rate (and ping's round-trip percentiles), or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from vhostmap.apps import client
from vhostmap.apps.pktgen import (
    PING_PAYLOAD,
    Limits,
    periodic_reporter,
    ping,
    pong,
    receive,
    transmit,
)
from vhostmap.control.client import ControlError
from vhostmap.netmap.user import NetmapPort
from vhostmap.packets import ETH_HLEN, IP_HLEN, MAX_FRAME, MIN_FRAME, Addresses, udp_frame


def run(args: argparse.Namespace, port: NetmapPort | None = None) -> int:
    """Run ``vhostmap pkt-gen`` (``port``: an already opened port, else ``args.port`` through the daemon)."""
    if not MIN_FRAME <= args.length <= MAX_FRAME:
        print(f"vhostmap pkt-gen: -l {args.length} outside {MIN_FRAME}..{MAX_FRAME}", file=sys.stderr)
        return 2
    if args.batch < 1:
        print(f"vhostmap pkt-gen: -b {args.batch} must be >= 1", file=sys.stderr)
        return 2
    addr = Addresses(args.src_mac, args.dst_mac, args.src_ip, args.dst_ip)
    if port is None:
        try:
            opened: NetmapPort = client.open(args.port, args.control)
        except (ControlError, ValueError) as e:
            print(f"vhostmap pkt-gen: {e}", file=sys.stderr)
            return 1
    else:
        opened = port
    report = periodic_reporter(args.report, args.function) if args.report > 0 and not args.json else None
    limits = Limits(args.count, args.duration, args.rate)
    try:
        with opened as port:
            if args.function == "tx":
                result = transmit(port, udp_frame(args.length, addr), limits, args.batch, report)
            elif args.function == "rx":
                result = receive(port, limits, report)
            elif args.function == "ping":
                result = ping(
                    port, max(args.length, ETH_HLEN + IP_HLEN + 8 + PING_PAYLOAD.size), limits, addr
                )
            else:
                result = pong(port, limits)
    except KeyboardInterrupt:
        return 130
    except ConnectionError as e:
        print(f"vhostmap pkt-gen: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    return 0

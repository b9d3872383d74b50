"""The ``vhostmap`` command line: ``serve`` runs the backend daemon, the other commands talk to it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from vhostmap import __version__
from vhostmap.control.client import DEFAULT_CONTROL_SOCKET, ControlError, call
from vhostmap.ethernet import parse_mac
from vhostmap.vm import add_vm_parser, run_vm


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``vhostmap`` subcommand."""
    parser = argparse.ArgumentParser(
        prog="vhostmap",
        description="netmap for virtual machines: a vhost-user virtio-net backend of netmap ports",
    )
    parser.add_argument("--version", action="version", version=f"vhostmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the backend daemon")
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with [ports.NAME] and [switches.NAME] tables and [[links]]",
    )
    serve.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME=TYPE,key=value,...",
        help="a port, e.g. vm0=vhost-user,path=/run/vhostmap/vm0.sock,mode=server,queues=4,mtu=9000",
    )
    serve.add_argument("--link", action="append", default=[], metavar="A,B", help="cross-connect two ports")
    serve.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="NAME=PORT,...",
        help="a learning switch and its ports, e.g. vale0=vm0,vm1,uplink (option aging=SECONDS, default 300)",
    )
    serve.add_argument("--control", metavar="SOCK", help=f"control socket (default {DEFAULT_CONTROL_SOCKET})")
    serve.add_argument("--socket-owner", metavar="USER", help="owner of the sockets vhostmap listens on")
    serve.add_argument("--socket-group", metavar="GROUP", help="group of the sockets vhostmap listens on")
    serve.add_argument(
        "--socket-mode", metavar="MODE", help="their permission bits, e.g. 0660 (default with a group: 0660)"
    )
    serve.add_argument(
        "--poll",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="busy-poll the datapath instead of sleeping on kicks (burns a core; pin it with --cpu)",
    )
    serve.add_argument(
        "--cpu",
        metavar="LIST",
        help="one datapath thread pinned to each CPU of LIST (N, or a list like 0-1 or 2,4-5; "
        "receive queues round-robin over them unless a port pins them with rxq_affinity=QUEUE:CPU,...)",
    )
    serve.add_argument("--control-cpu", type=int, metavar="N", help="pin the control (main) thread to CPU N")
    serve.add_argument(
        "--metrics",
        metavar="[ADDR:]PORT",
        help="serve Prometheus metrics over HTTP there (ADDR 127.0.0.1 unless given)",
    )
    serve.add_argument(
        "--no-rxq-isolate",
        dest="rxq_isolate",
        action="store_false",
        default=None,
        help="let threads that serve pinned queues (rxq_affinity) take round-robin queues too",
    )
    serve.add_argument(
        "--user",
        metavar="USER[:GROUP]",
        help="become USER with no privilege left once the sockets and TAPs exist (start as root)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="log connections and negotiation too")

    stats = sub.add_parser("stats", help="per-port and per-queue counters of the running daemon")
    stats.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    inspect = sub.add_parser(
        "inspect", help="a port's virtqueues and rings as they are now, and why traffic stands still"
    )
    inspect.add_argument("port", metavar="PORT")
    inspect.add_argument("--queue", type=int, metavar="N", help="only queue pair N")
    inspect.add_argument(
        "--descriptors",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="K",
        help="walk the first K chains waiting in each virtqueue (default 8) and show their buffers",
    )
    inspect.add_argument("--watch", action="store_true", help="show it again every second, until Ctrl-C")
    inspect.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    top = sub.add_parser("top", help="live rates per port and queue, and the datapath load (Ctrl-C ends it)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between views (1)")
    top.add_argument("--once", action="store_true", help="print one view (over one interval) and exit")
    top.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")

    capture = sub.add_parser(
        "capture",
        help="the frames crossing a port, live, as pcapng (-w FILE, -w - for tcpdump -r -) or one line each",
        description="Taps a port of the running daemon without stopping its traffic. PORT: a port (vm1), its "
        "host rings (vm1^), both (vm1*), or an application's switch port (vale0:app). Direction: in, the "
        "frames the port's peer (guest, NIC, host stack, application) sent; out, those delivered to it. "
        "When the reader falls behind, the daemon drops frames from the capture (counted), never traffic.",
    )
    capture.add_argument("port", metavar="PORT")
    capture.add_argument("-w", "--write", metavar="FILE", help="write pcapng to FILE, or to stdout with -")
    capture.add_argument("--direction", choices=("in", "out", "both"), default="both", help="(both)")
    capture.add_argument("-c", "--count", type=int, default=0, metavar="N", help="stop after N frames")
    capture.add_argument(
        "-s", "--snaplen", type=int, default=65535, metavar="BYTES", help="keep at most BYTES of a frame"
    )
    capture.add_argument(
        "-B", "--buffer-size", type=int, default=1024, metavar="KiB", help="room per ring in KiB (1024)"
    )
    capture.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")

    status = sub.add_parser("status", help="ports, sockets and connections of the running daemon")
    status.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")

    switch = sub.add_parser("switch", help="attach ports to switches, detach them, list switches (vale-ctl)")
    switch_ops = switch.add_subparsers(dest="op", metavar="OP", required=True)
    for op, what in (("attach", "attach PORT to SWITCH (made if missing)"), ("detach", "detach PORT")):
        p = switch_ops.add_parser(op, help=what)
        p.add_argument("switch", metavar="SWITCH")
        p.add_argument("port", metavar="PORT")
        p.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")
    listing = switch_ops.add_parser("list", help="switches, their ports, counters and learnt addresses")
    listing.add_argument("switch", metavar="SWITCH", nargs="?", help="only this switch")
    listing.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    add_vm_parser(sub)
    _add_image_parser(sub)
    _add_pktgen_parser(sub)
    return parser


def _add_image_parser(sub: Any) -> None:
    image = sub.add_parser(
        "image", help="guest images for tests: the lab's, with your packages, wheels, files"
    )
    ops = image.add_subparsers(dest="op", metavar="OP", required=True)
    build = ops.add_parser(
        "build",
        help="make (or find in the cache) an image; prints its path",
        description="Extend the lab's busybox or Python guest image with Debian packages, wheels and files. "
        "Images are cached by content hash ($VHOSTMAP_CACHE/userimages): the same request costs nothing "
        "the next time. Prints the image's path (boot it with the lab's vmlinux).",
    )
    build.add_argument(
        "--base",
        choices=["busybox", "python"],
        help="the image to extend (default: python with packages or wheels, else busybox)",
    )
    build.add_argument(
        "--packages", default="", metavar="PKG,...", help="Debian packages, e.g. iperf3,tcpdump"
    )
    build.add_argument(
        "--wheel", nargs="+", action="extend", default=[], metavar="WHEEL", help="wheels to add"
    )
    build.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="LOCAL:REMOTE",
        help="a file or directory to copy to REMOTE, an absolute path in the guest (repeatable)",
    )
    build.add_argument("--boot", action="store_true", help="boot the image once and print the boot time")


def _image(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vhostmap.lab.guestkernel import GuestKernelMissing
    from vhostmap.lab.userimage import ImageBuildError, ImageSpec, boot_seconds, build

    packages = tuple(p for p in args.packages.split(",") if p)
    try:
        spec = ImageSpec(
            base=args.base or ("python" if packages or args.wheel else "busybox"),
            packages=packages,
            wheels=tuple(Path(w) for w in args.wheel),
            files=tuple(ImageSpec.parse_file(f) for f in args.file),
        )
        kernel = build(spec)
        if args.boot:
            seconds = boot_seconds(kernel, spec.base)
            print(f"vhostmap image: booted in {seconds:.1f} s", file=sys.stderr)
    except (ValueError, ImageBuildError, GuestKernelMissing) as e:
        print(f"vhostmap image build: {e}", file=sys.stderr)
        return 1
    print(kernel.initrd)
    return 0


def _mac(text: str) -> bytes:
    try:
        return parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ipv4(text: str) -> bytes:
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address")
    return bytes(int(p) for p in parts)


def _add_pktgen_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pkt-gen",
        help="send, receive, ping or answer pings on a port of the daemon (netmap's pkt-gen)",
        description="netmap's pkt-gen over a port of the running daemon, through the netmap client library. "
        "tx sends copies of one UDP frame, rx counts what arrives, ping measures ICMP echo round trips "
        "(answered by pong or by dpdk-testpmd's icmpecho), pong answers them.",
    )
    p.add_argument(
        "-i", "--port", required=True, metavar="NAME", help="vm0, vm0-1 (ring 1), vm0^, vale0:app..."
    )
    p.add_argument("-f", "--function", choices=("tx", "rx", "ping", "pong"), default="tx", help="mode (tx)")
    p.add_argument("-l", "--length", type=int, default=60, help="frame length without FCS (60)")
    p.add_argument("-n", "--count", type=int, default=0, help="stop after N frames (0: no limit)")
    p.add_argument("-D", "--duration", type=float, default=0.0, help="stop after S seconds (0: no limit)")
    p.add_argument("-R", "--rate", type=float, default=0.0, help="tx: at most PPS frames per second")
    p.add_argument("-b", "--batch", type=int, default=512, help="tx: frames per sync (512)")
    p.add_argument("--src-mac", type=_mac, default="02:00:00:00:00:01", metavar="MAC")
    p.add_argument("--dst-mac", type=_mac, default="ff:ff:ff:ff:ff:ff", metavar="MAC")
    p.add_argument("-s", "--src-ip", type=_ipv4, default="10.0.0.1", metavar="IP")
    p.add_argument("-d", "--dst-ip", type=_ipv4, default="10.1.0.1", metavar="IP")
    p.add_argument("-T", "--report", type=float, default=1.0, metavar="S", help="progress every S s (0: off)")
    p.add_argument("--timeout", type=float, default=1.0, help="ping: seconds before a request counts as lost")
    p.add_argument("--control", metavar="SOCK", default=DEFAULT_CONTROL_SOCKET, help="control socket")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _serve(args: argparse.Namespace) -> int:
    # The datapath imports numpy and the compiled kernels (the configuration checks against its limits):
    # only when serving.
    from vhostmap.daemon.config import ConfigError, build_config, load_toml
    from vhostmap.daemon.daemon import Daemon
    from vhostmap.system.service import journal_handler, stderr_is_journal
    from vhostmap.system.unixsock import EndpointError

    # Under systemd, into the journal with each record's fields; else lines on stderr.
    journal = journal_handler() if stderr_is_journal() else None
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        # The journal keeps the time, the priority and the logger (LOGGER) itself.
        format="%(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[journal] if journal else None,
    )
    try:
        config = build_config(
            load_toml(args.config) if args.config else None,
            args.port,
            args.link,
            args.control,
            socket_group=args.socket_group,
            socket_mode=args.socket_mode,
            switch_flags=args.switch,
            socket_owner=args.socket_owner,
            poll=args.poll,
            cpu=args.cpu,
            control_cpu=args.control_cpu,
            rxq_isolate=args.rxq_isolate,
            metrics=args.metrics,
            user=args.user,
        )
    except ConfigError as e:
        print(f"vhostmap serve: {e}", file=sys.stderr)
        return 2
    if not config.ports:
        print("vhostmap serve: no ports: give --port or --config", file=sys.stderr)
        return 2
    try:
        daemon = Daemon(config)
        asyncio.run(daemon.run())
    except (EndpointError, ConfigError, OSError) as e:
        print(f"vhostmap serve: {e}", file=sys.stderr)
        return 1
    return 0


def _format_stats(reply: dict[str, Any]) -> str:
    lines = [
        f"{'port':<12} {'queue':>5} {'rx pkts':>12} {'rx bytes':>14} {'tx pkts':>12} {'tx bytes':>14} "
        f"{'drops':>10} {'errors':>8}"
    ]
    for name, port in reply["ports"].items():
        for q in port["queues"]:
            lines.append(
                f"{name:<12} {q['queue']:>5} {q['rx_packets']:>12} {q['rx_bytes']:>14} {q['tx_packets']:>12} "
                f"{q['tx_bytes']:>14} {q['rx_dropped'] + q['tx_dropped']:>10} {q['errors']:>8}"
            )
    return "\n".join(lines)


def _top(args: argparse.Namespace) -> int:
    from vhostmap.control import top  # rich: only when needed

    if args.interval <= 0:
        print("vhostmap top: --interval must be positive", file=sys.stderr)
        return 2
    try:
        top.run(args.control, args.interval, args.once)
    except ControlError as e:
        print(f"vhostmap top: {e}", file=sys.stderr)
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"port": args.port, "chains": args.descriptors}
    if args.queue is not None:
        request["queue"] = args.queue
    try:
        while True:
            try:
                reply = call(args.control, "inspect", **request)
            except ControlError as e:
                print(f"vhostmap inspect: {e}", file=sys.stderr)
                return 1
            reply.pop("ok", None)
            text = json.dumps(reply, indent=2) if args.json else _format_inspect(reply)
            if not args.watch:
                print(text)
                return 0
            print("\033[H\033[2J" + text, flush=True)  # clear the terminal, as watch(1) does
            time.sleep(1)  # the refresh period itself
    except KeyboardInterrupt:
        return 0


def _format_inspect(reply: dict[str, Any]) -> str:
    features = ", ".join(reply["features"]) or "none"
    broken = f"broken: {reply['broken']}" if reply["broken"] else "not broken"
    ring = reply.get("ring", "split")
    lines = [
        f"port {reply['port']}: status {reply['status']:#04x}, {broken}, {ring} rings",
        f"  features: {features}",
    ]
    for q in reply["queues"]:
        lines.append(f"queue pair {q['queue']}")
        for key in ("guest_receive", "guest_transmit"):
            vq = q[key]
            state = ", ".join(k for k in ("started", "enabled", "mapped", "faulted") if vq[k])
            line = f"  vq {vq['index']} ({vq['direction']}): size {vq['size']}, {state or 'stopped'}"
            if vq["mapped"] and vq.get("layout") == "packed" and "pending" in vq:
                line += (
                    f"; next avail {vq['last_avail_idx']} wrap {vq['avail_wrap_counter']}"
                    f", waiting {vq['pending']}; next used {vq['used_idx']} wrap {vq['used_wrap_counter']}"
                    f"; driver event {vq['driver_event_flags']:#x}/{vq['driver_event_off_wrap']:#x}"
                    f" device event {vq['device_event_flags']:#x}/{vq['device_event_off_wrap']:#x}"
                )
            elif vq["mapped"] and vq.get("layout") != "packed":
                line += (
                    f"; avail idx {vq['avail_idx']}, taken {vq['last_avail_idx']}, waiting {vq['pending']}"
                    f"; used idx {vq['used_idx']}"
                    f"; flags avail {vq['avail_flags']:#x} used {vq['used_flags']:#x}"
                )
                if "used_event" in vq:
                    line += f"; used_event {vq['used_event']} avail_event {vq['avail_event']}"
            lines.append(line)
            for chain in vq.get("chains", ()):
                if "fault" in chain:
                    lines.append(f"    chain {chain['head']}: FAULT {chain['fault']}")
                else:
                    segs = " ".join(f"{a:#x}+{n}" for a, n in chain["segments"])
                    lines.append(f"    chain {chain['head']}: {chain['length']} bytes: {segs}")
        for key in ("rx_kring", "tx_kring"):
            k = q[key]
            lines.append(
                f"  {k['name']}: head {k['head']} cur {k['cur']} tail {k['tail']}, hwcur {k['hwcur']} "
                f"hwtail {k['hwtail']}, {k['slots']} slots, reinits {k['reinits']}"
            )
        lines += [f"  STALLED: {why}" for why in q["stalled"]] or ["  moving (nothing stands still)"]
    return "\n".join(lines)


def _switch(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": args.op}
    if args.switch is not None:
        request["switch"] = args.switch
    if args.op != "list":
        request["port"] = args.port
    try:
        reply = call(args.control, "switch", **request)
    except ControlError as e:
        print(f"vhostmap switch {args.op}: {e}", file=sys.stderr)
        return 1
    if args.op == "list":
        print(json.dumps(reply["switches"], indent=2) if args.json else _format_switches(reply["switches"]))
    else:
        print(f"{args.op}ed {args.port} {'to' if args.op == 'attach' else 'from'} {args.switch}")
    return 0


def _format_switches(switches: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, sw in switches.items():
        lines.append(
            f"{name}: {len(sw['ports'])} port(s), {len(sw['addresses'])} address(es), aging {sw['aging']:g} s"
        )
        lines.append(
            f"  {'port':<14} {'rx frames':>10} {'forwarded':>10} {'flooded':>10} {'filtered':>9} "
            f"{'dropped':>9} {'tx frames':>10} {'tx dropped':>10}"
        )
        for port, s in sw["ports"].items():
            lines.append(
                f"  {port:<14} {s['rx_frames']:>10} {s['forwarded']:>10} {s['flooded']:>10} "
                f"{s['filtered']:>9} {s['dropped']:>9} {s['tx_frames']:>10} {s['tx_dropped']:>10}"
            )
        for entry in sw["addresses"]:
            lines.append(f"  {entry['mac']} on {entry['port']} (seen {entry['age']:.0f} s ago)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vhostmap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "vm":
        return run_vm(args)
    if args.command == "switch":
        return _switch(args)
    if args.command == "image":
        return _image(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "top":
        return _top(args)
    if args.command == "capture":
        from vhostmap.apps.capture_cli import run as run_capture  # numpy and the kernels: only when needed

        return run_capture(args)
    if args.command == "pkt-gen":
        from vhostmap.apps.pktgen_cli import (
            run as run_pktgen,  # numpy and the client library: only when needed
        )

        return run_pktgen(args)
    try:
        reply = call(args.control, args.command)
    except ControlError as e:
        print(f"vhostmap {args.command}: {e}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    if args.command == "stats" and not args.json:
        print(_format_stats(reply))
    else:
        print(json.dumps(reply, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

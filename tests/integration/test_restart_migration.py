"""vhostmap killed and restarted under running front-ends, and a QEMU guest live-migrated between two of its
ports, with the times measured.

Restart: vhostmap dies by SIGKILL (a crash: no GET_VRING_BASE, nothing flushed) and a new process starts with
the same configuration and socket paths. The time from the new daemon being ready (`VhostmapDaemon.restart`:
its control socket answers, its endpoints are listening or connecting) until traffic flows again is measured
and printed; frames may be lost during the outage, but none may reach an application twice.

Why none can (vhost_user/kernels.py, datapath/virtio.c vq_complete): a batch taken from a guest's transmit
queue is marked used (entries, then used->idx with a release store) inside the same call that copied it out,
before any of its frames is handed to a forwarder. A front-end that lost its back-end without GET_VRING_BASE
resumes from used->idx (QEMU: virtio_queue_restore_last_avail_idx; DPDK's virtio-user: SET_VRING_BASE 0,
which vhostmap, like DPDK's vhost library, replaces by used->idx at SET_VRING_ADDR), so a frame the old daemon
may have handed on is never offered to the new one; a frame copied out but not yet marked used was never
handed on either. On the receive side a frame counts once the guest sees used->idx move past it, so one the
old daemon wrote but did not publish is simply lost, and its buffer is reused.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vhostmap.control.client import call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.netns import Netns, ip, namespace_behind_veth
from vhostmap.lab.qemu import MigrationLostMemory, Nic, QemuGuest
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

RESTARTS = 3  # restarts per test run, each measured
RECOVERY_LIMIT = 1.0  # seconds from a cause we control to traffic flowing again
GUEST_MAC = "52:54:00:00:00:0a"
GUEST_ADDR, PEER_ADDR = "10.0.0.1", "10.0.0.2"
# testpmd's lcores share CPU 0, leaving CPU 1 to vhostmap.
TESTPMD_CPU = 0
PING_STATS = re.compile(r"(\d+) packets transmitted, (\d+) packets received(?:, (\d+) duplicates)?")


def _since(start: float) -> float:
    return time.monotonic() - start


def _measure(condition: Callable[[], object], what: str, timeout: float = 15.0) -> float:
    """Poll ``condition`` every few milliseconds until it holds; the time.monotonic() at which it did."""
    wait_until(condition, timeout, what, interval=0.005)
    return time.monotonic()


def _report(title: str, rows: list[dict[str, float]]) -> str:
    lines = [title]
    for i, row in enumerate(rows, 1):
        lines.append(f"  restart {i}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row.items()))
    return "\n".join(lines)


# --- 1a: dpdk-testpmd front-ends listening, vhostmap connects and reconnects --------------------------------


def test_restart_under_testpmd_traffic_resumes_within_a_second(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """testpmd txonly (port a) -> link -> testpmd rxonly (port b); both virtio-user ports listen (server=1)
    and vhostmap, in client mode, connects to them. Killed and restarted, it is connected again and delivers
    frames into the receiver's ring within a second of the new daemon being ready; the receiver never gets
    more than was sent, and the new daemon delivers exactly what it takes in."""
    ports = [f"{n}=vhost-user,path={sock_dir}/{n}.sock,mode=client" for n in ("a", "b")]
    rows = []
    with ExitStack() as stack:
        # virtio-user with server=1 blocks in accept() until its back-end connects: vhostmap comes first.
        daemon = stack.enter_context(VhostmapDaemon(sock_dir, ports, ["a,b"]))
        rx = stack.enter_context(
            Testpmd(
                [VirtioUserPort(sock_dir / "b.sock", server=True)], forward_mode="rxonly", cpu=TESTPMD_CPU
            )
        )
        tx = stack.enter_context(
            Testpmd(
                [VirtioUserPort(sock_dir / "a.sock", server=True)], forward_mode="txonly", cpu=TESTPMD_CPU
            )
        )
        rx.start()
        tx.start()
        rx.wait_for_packets(10_000, timeout=30)
        for _ in range(RESTARTS):
            daemon.kill()
            # Whatever vhostmap had delivered is counted by now (rxonly polls without pause), and nothing
            # more can arrive: the receiver's count can only move again through the new daemon.
            received = rx.stats()[0].rx_packets
            ready = daemon.restart()

            def delivering() -> bool:
                # Frames the new daemon put into the receiver's ring: read from the daemon, not from testpmd's
                # console, whose answers a loaded machine delays by up to seconds (a run at load 5 measured
                # 1006 ms that way).
                return daemon.stats()["b"]["totals"]["tx_packets"] > 0

            connected = _measure(
                lambda: all(p["connected"] for p in daemon.status()["ports"].values()),
                "vhostmap to be connected to both testpmds again",
            )
            flowing = _measure(delivering, "the new daemon to deliver frames into testpmd's receiver")
            rows.append({"connected": connected - ready, "flowing": flowing - ready})
            assert flowing - ready < RECOVERY_LIMIT, _report("too slow:", rows)
            # And the receiver takes them: its count moves on from where the old daemon left it.
            rx.wait_for_packets(received + 10_000, timeout=30)
        # Quiesce: the sender stops, the receiver takes the last frames the daemon delivers.
        sent = tx.stop()[0].tx_packets

        def settled() -> dict[str, int] | None:
            a, b = (daemon.stats()[n]["totals"] for n in ("a", "b"))
            # A link never drops, but a frame that finds no receive queue running (the daemon connects to
            # the sender before the receiver's queue starts) is dropped as a NIC without carrier drops.
            return (
                {"in": a["rx_packets"], "out": b["tx_packets"], "no carrier": b["tx_dropped"]}
                if a["rx_packets"] == b["tx_packets"] + b["tx_dropped"]
                else None
            )

        wait_until(
            settled,
            30,
            "the new daemon to deliver or drop everything it took from the sender",
            details=lambda: str(daemon.stats()),
        )
        got = rx.stop()[0].rx_packets
        assert daemon.stats()["a"]["totals"]["errors"] == daemon.stats()["b"]["totals"]["errors"] == 0
        assert got <= sent, f"the receiver got {got} frames, {got - sent} more than were sent"
    with capsys.disabled():
        print("\n" + _report("testpmd (vhostmap in client mode), from the new daemon ready:", rows))
        print(f"  sent {sent}, received {got}, lost during the outages {sent - got}")


# --- 1b: QEMU guests connecting with reconnect=1, vhostmap listens -----------------------------------------


@dataclass(frozen=True)
class GuestNic:
    """One NIC of a guest: vhost-user port ``port`` (packed rings or split) and a namespace behind a veth
    whose address is ``peer``; ``addr`` is the guest's (ethN, in the order of NICS)."""

    port: str
    mac: str
    addr: str
    peer: str
    packed: bool = False

    def nic_options(self) -> tuple[str, ...]:
        return ("packed=on",) if self.packed else ()

    def port_options(self) -> str:
        return ",packed=on" if self.packed else ""


# The guest's two NICs: split rings on port a, packed ones on port p (virtio-net-pci,packed=on), each linked
# to its own namespace, so that one boot covers both ring layouts.
SPLIT = GuestNic("a", GUEST_MAC, GUEST_ADDR, PEER_ADDR)
PACKED = GuestNic("p", "52:54:00:00:00:0b", "10.0.1.1", "10.0.1.2", packed=True)
NICS = (SPLIT, PACKED)


@contextmanager
def guest_behind_vhostmap(
    kernel: GuestKernel, workdir: Path, *, reconnect: int | None = None
) -> Iterator[tuple[VhostmapDaemon, QemuGuest]]:
    """vhostmap listening on ports a and p, NICs eth0 and eth1 of a QEMU guest (10.0.0.1, 10.0.1.1), each
    linked to a generic port on a veth whose peer is in a namespace of its own (10.0.0.2, 10.0.1.2); both
    ends know the other's MAC for good (no ARP during the outages)."""
    with ExitStack() as stack:
        peers = [stack.enter_context(namespace_behind_veth(f"{nic.peer}/24")) for nic in NICS]
        ports, links = [], []
        for nic, (_ns, veth) in zip(NICS, peers, strict=True):
            up = f"up{nic.port}"
            ports.append(
                f"{nic.port}=vhost-user,path={workdir}/{nic.port}.sock,mode=server{nic.port_options()}"
            )
            ports.append(f"{up}=generic,ifname={veth.name}")
            links.append(f"{nic.port},{up}")
        daemon = stack.enter_context(VhostmapDaemon(workdir, ports, links))
        devices = [
            Nic(
                workdir / f"{nic.port}.sock",
                nic.mac,
                reconnect=reconnect,
                ip=f"{nic.addr}/24",
                options=nic.nic_options(),
            )
            for nic in NICS
        ]
        guest = stack.enter_context(QemuGuest(devices, kernel=kernel, workdir=workdir / "qa"))
        guest.wait_ready()
        for i, (nic, (ns, veth)) in enumerate(zip(NICS, peers, strict=True)):
            guest.wait_carrier(f"eth{i}")
            peer_mac = ns.run(["cat", f"/sys/class/net/{veth.peer}/address"]).stdout.strip()
            guest.run(f"arp -i eth{i} -s {nic.peer} {peer_mac}", check=True)  # permanent
            ip(
                "neigh",
                "replace",
                nic.addr,
                "lladdr",
                nic.mac,
                "dev",
                veth.peer,
                "nud",
                "permanent",
                netns=ns.name,
            )
        yield daemon, guest
        guest.poweroff()


def _ring_positions(daemon: VhostmapDaemon, port: str) -> list[int]:
    """The next available position of each of ``port``'s virtqueues as a count of descriptors since the
    ring started, modulo 2**16 for a split ring, and for a packed one (wrap counter 1, 0, 1, ...) modulo two
    laps: within the first two laps it is exact."""
    positions = []
    for pair in call(daemon.control, "inspect", port=port)["queues"]:
        for vq in (pair["guest_receive"], pair["guest_transmit"]):
            lap = vq["size"] if vq["layout"] == "packed" and vq["avail_wrap_counter"] == 0 else 0
            positions.append(vq["last_avail_idx"] + lap)
    return positions


def test_restart_under_a_qemu_guest_resumes_and_delivers_no_echo_twice(
    guest_kernel: GuestKernel, sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guest pings two namespaces every 20 ms all along, one through a NIC with split rings, one through a
    NIC with packed rings (numbered frames both ways: ICMP sequence numbers, and busybox ping reports any
    reply it gets twice); vhostmap is killed and restarted three times. QEMU (``reconnect=1``) connects
    again, and both directions flow on both NICs within a second of that; its retry timer alone may add up
    to a second after the daemon is ready, which is QEMU's, so the total is bounded by the reconnect period
    plus that second. After every restart each ring goes on from where it was.

    Packed rings: QEMU keeps no packed ring state, so it starts the new daemon's rings from their reset
    positions (0, wrap counters 1) wherever the guest is; the device resumes where the descriptors say
    (`VhostUserNetDevice._resume_packed`). The first restart comes in those rings' second lap, where both
    wrap counters are 0."""
    rows = []
    names = [nic.port for nic in NICS]
    with guest_behind_vhostmap(guest_kernel, sock_dir, reconnect=1) as (daemon, guest):
        status = daemon.status()["ports"]
        assert [status[nic.port]["ring"] for nic in NICS] == ["split", "packed"]
        for nic in NICS:
            assert guest.ping(nic.peer, count=2) == 0.0
        # Past the first lap of the packed rings (256 descriptors) and not through the second.
        guest.run(f"ping -q -c 300 -i 0.002 {PACKED.peer}", check=True, timeout=60)
        boot_id = guest.run("cat /proc/sys/kernel/random/boot_id", check=True).output
        for nic in NICS:
            log_file, pid_file = f"/tmp/ping-{nic.port}.log", f"/tmp/ping-{nic.port}.pid"
            guest.run(f"ping -i 0.02 {nic.peer} > {log_file} 2>&1 & echo $! > {pid_file}", check=True)

        def replied() -> bool:
            stats = daemon.stats()
            return all(stats[name]["totals"]["tx_packets"] >= 20 for name in names)

        wait_until(replied, 30, "replies to the guest's pings on both NICs")
        for restart in range(RESTARTS):
            before = {name: _ring_positions(daemon, name) for name in names}
            ready = daemon.restart()
            connected = _measure(
                lambda: all(daemon.status()["ports"][name]["connected"] for name in names),
                "QEMU to connect both NICs again",
                timeout=10,
            )

            def both_ways() -> bool:
                stats = daemon.stats()
                # rx: echo requests from the guest; tx: the namespace's replies delivered into the guest.
                return all(
                    stats[n]["totals"]["rx_packets"] and stats[n]["totals"]["tx_packets"] for n in names
                )

            flowing = _measure(both_ways, "echo requests and replies on both NICs through the new daemon")
            rows.append(
                {
                    "QEMU connected": connected - ready,
                    "flowing": flowing - ready,
                    "flowing after connect": flowing - connected,
                }
            )
            assert flowing - connected < RECOVERY_LIMIT, _report("too slow:", rows)
            assert flowing - ready < 1 + RECOVERY_LIMIT, _report("too slow:", rows)
            for name in names:
                after = _ring_positions(daemon, name)
                # The new daemon goes on from where the old one was (maybe a few chains back: the old one's
                # last batch, taken and not used, runs again); with a packed ring, in the same lap.
                for queue, (was, now) in enumerate(zip(before[name], after, strict=True)):
                    assert 0 <= now - was < 256, f"{name} queue {queue} resumed at {now}, it was at {was}"
            if restart == 0:
                assert all(256 <= at < 512 for at in before[PACKED.port]), f"not in the second lap: {before}"
            wait_until(replied, 30, "more replies on both NICs")
        pings = {}
        for nic in NICS:
            log_file = f"/tmp/ping-{nic.port}.log"
            pid = f"$(cat /tmp/ping-{nic.port}.pid)"
            assert guest.run(f"kill -0 {pid}").rc == 0, (
                f"the guest's ping to {nic.peer} ended during the restarts"
            )
            guest.run(f"kill -INT {pid}", check=True)  # ping prints its statistics and exits
            stats = wait_until(
                lambda f=log_file: PING_STATS.search(guest.run(f"cat {f}").output),
                30,
                f"ping's statistics in {log_file}",
            )
            log = guest.run(f"cat {log_file}").output
            sent, received = int(stats.group(1)), int(stats.group(2))
            duplicates = int(stats.group(3) or 0)
            assert duplicates == 0 and "DUP!" not in log, (
                f"replies received twice on {nic.port}:\n{stats.group(0)}"
            )
            # Echoes are lost only while the daemon is away (about two seconds per restart at 50 a second).
            assert 0 < received <= sent, stats.group(0)
            pings[nic.port] = stats.group(0)
        # The same guest all along: it never rebooted.
        assert guest.run("cat /proc/sys/kernel/random/boot_id", check=True).output == boot_id
    with capsys.disabled():
        print("\n" + _report("QEMU guest (reconnect=1, vhostmap listens), from the new daemon ready:", rows))
        for name, line in pings.items():
            print(f"  guest ping through port {name} ({status[name]['ring']} rings): {line}")


# --- 2: live migration of a guest between two ports of a switch, a download running -------------------------

# Streams TOTAL bytes of numbered 8-byte records over HTTP/1.0 at RATE bytes/s, from the namespace.
STREAMER = r"""
import socket, struct, sys, time
total, rate, port = map(int, sys.argv[1:4])
body = b"".join(struct.pack("!Q", i) for i in range(total // 8))
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
conn.recv(4096)
conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
start = time.monotonic()
for offset in range(0, total, 4096):
    delay = start + offset / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    conn.sendall(body[offset : offset + 4096])
conn.close()
print("sent", total, flush=True)
"""
# One stream per NIC, each half the bytes and the rate of the single one this test had: the guest is as busy
# as it was (QEMU's TCG migration loses memory more often the busier the guest), for as long (16 s).
STREAM_BYTES, STREAM_RATE, STREAM_PORT = 3 * 2**20, 192 * 2**10, 9000
STREAM_ARGS = (STREAM_BYTES, STREAM_RATE, STREAM_PORT)


def _stream_body() -> bytes:
    return b"".join(struct.pack("!Q", i) for i in range(STREAM_BYTES // 8))


@contextmanager
def streamer(ns: Netns) -> Iterator[subprocess.Popen[str]]:
    """The STREAMER in ``ns``, once it listens; ended on exit."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", STREAMER, *map(str, STREAM_ARGS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "listening\n", line + proc.stdout.read()
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def daemon_log_on_failure(daemon: VhostmapDaemon, lines: int = 120) -> Iterator[None]:
    """Add the tail of the daemon's log to whatever fails inside: it lives in the test's temporary directory,
    which is gone once the test ends, and a guest's failure is often the back-end's doing."""
    try:
        yield
    except Exception as e:
        e.add_note(daemon.diagnostics(lines))
        raise


# The destination kernel panicked in 2 of 8 migrations under TCG (rb_insert_color in an interrupt taken in
# amd_e400_idle, the idle routine qemu64's AMD model selects); with plain HLT idling it did not in any run.
# It still did now and then, and the guest's virtio_net once saw "output.0:id 0 is not a head!": QEMU 7.2's
# TCG migration itself loses guest memory. Compared before the destination runs (QemuGuest.migrate's
# check_memory), the source's RAM and the destination's differ by a few to a few dozen pages in more than half
# the migrations of a busy guest with no NIC at all (private or shared memory, one or several TCG threads),
# and in about 1 in 6 of this test's (about half of a dozen runs with a load average of 5 on 2 CPUs):
# kernel stacks and per-CPU data, written by the vCPU, never by a back-end. The destination then
# crashed within milliseconds, before its vhost-user rings moved at all. Such a migration proves nothing about
# vhostmap, so the test gives up on it (xfail) instead of failing.
MIGRATION_CMDLINE = "idle=halt"
MIGRATION_ATTEMPTS = 3  # migrations QEMU may spoil before the test gives up (xfail)


def test_live_migration_between_two_ports_of_a_switch_keeps_a_download_intact(
    guest_kernel: GuestKernel, sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guest with two NICs, split rings on port a0 of switch vale0 and packed rings on port p0 of switch
    vale1, downloads a paced, numbered stream through each from a namespace (ports upa, upp) and is
    live-migrated meanwhile into a QEMU whose NICs are on ports a1 and p1: the migration completes, the
    destination runs the same guest (same boot id), both downloads complete byte for byte, and the switches
    have learnt the guest's MACs on a1 and p1 (QEMU's SEND_RARP or the guest's own announcement). Then
    vhostmap is killed and restarted under the destination, whose QEMU knows the rings only as the
    migration left them: both NICs work again."""
    with ExitStack() as stack:
        peers = {}
        ports = []
        for nic in NICS:
            ns, veth = stack.enter_context(namespace_behind_veth(f"{nic.peer}/24"))
            # One MSS per frame from the namespace's TCP: the generic port drops frames larger than a buffer.
            ip("link", "set", "dev", veth.peer, "gso_max_segs", "1", netns=ns.name)
            peers[nic.port] = ns
            for side in "01":
                ports.append(f"{nic.port}{side}=vhost-user,path={sock_dir}/{nic.port}{side}.sock,mode=server")
                ports[-1] += nic.port_options()
            ports.append(f"up{nic.port}=generic,ifname={veth.name}")
        switches = [f"vale{i}={n.port}0,{n.port}1,up{n.port}" for i, n in enumerate(NICS)]
        daemon = stack.enter_context(
            VhostmapDaemon(sock_dir, ports, extra_args=[a for sw in switches for a in ("--switch", sw)])
        )
        stack.enter_context(daemon_log_on_failure(daemon))

        def guest(side: str, workdir: str, incoming: bool = False) -> QemuGuest:
            devices = [
                Nic(
                    sock_dir / f"{n.port}{side}.sock",
                    n.mac,
                    ip=f"{n.addr}/24",
                    reconnect=1,
                    options=n.nic_options(),
                )
                for n in NICS
            ]
            return stack.enter_context(
                QemuGuest(
                    devices,
                    kernel=guest_kernel,
                    workdir=sock_dir / workdir,
                    cmdline=MIGRATION_CMDLINE,
                    incoming=incoming,
                )
            )

        source = guest("0", "src")
        source.wait_ready()
        for i in range(len(NICS)):
            source.wait_carrier(f"eth{i}")
        status = daemon.status()["ports"]
        assert [status[f"{n.port}0"]["ring"] for n in NICS] == ["split", "packed"]

        def new_destination(attempt: int) -> QemuGuest:
            destination = guest("1", f"dst{attempt}", incoming=True)
            for n in NICS:
                daemon.wait_connected(f"{n.port}1")
            return destination

        destination = new_destination(0)
        for i, n in enumerate(NICS):
            assert source.ping(n.peer, count=2) == 0.0
            assert daemon.learnt_port(f"vale{i}", n.mac) == f"{n.port}0"
        boot_id = source.run("cat /proc/sys/kernel/random/boot_id", check=True).output
        feeds = {n.port: stack.enter_context(streamer(peers[n.port])) for n in NICS}
        for n in NICS:
            source.run(
                f"wget -q -O /tmp/stream-{n.port} http://{n.peer}:{STREAM_PORT}/stream "
                f"> /tmp/wget-{n.port}.log 2>&1 &",
                check=True,
            )

        def received(guest: QemuGuest, port: str) -> int:
            out = guest.run(f"wc -c < /tmp/stream-{port} 2>/dev/null || echo 0").output.strip()
            return int(out or 0)

        def downloads_go_on(guest: QemuGuest) -> None:
            at = {n.port: received(guest, n.port) for n in NICS}
            for n in NICS:
                wait_until(
                    lambda p=n.port: received(guest, p) > at[p], 30, f"the download through {n.port} to go on"
                )

        before = {
            n.port: wait_until(
                lambda p=n.port: (k := received(source, p)) >= 128 * 1024 and k,
                30,
                f"the download through {n.port} to be under way",
            )
            for n in NICS
        }
        lost: list[str] = []
        while True:
            started = time.monotonic()
            try:
                info = source.migrate(destination, timeout=60, check_memory=True)
                break
            except MigrationLostMemory as e:
                # QEMU's fault, not vhostmap's (see MIGRATION_CMDLINE): as an operator would, give up on
                # that destination, resume the source (whose ports take their rings back) and migrate again.
                lost.append(str(e))
                if len(lost) == MIGRATION_ATTEMPTS:
                    pytest.xfail(f"QEMU's TCG migration lost guest memory {len(lost)} times: {lost}")
                destination.close()
                wait_until(
                    lambda: not any(daemon.status()["ports"][f"{n.port}1"]["connected"] for n in NICS),
                    15,
                    "a1 and p1 to lose QEMU",
                )
                source.resume()
                downloads_go_on(source)
                destination = new_destination(len(lost))
        migrated = _since(started)
        after = {n.port: received(destination, n.port) for n in NICS}
        assert destination.run_state() == "running"
        source.close()  # the source QEMU is paused after the migration; its ports go away
        assert destination.run("cat /proc/sys/kernel/random/boot_id", check=True).output == boot_id
        for i, n in enumerate(NICS):
            wait_until(
                lambda i=i, n=n: daemon.learnt_port(f"vale{i}", n.mac) == f"{n.port}1",
                15,
                f"vale{i} to learn {n.mac} on {n.port}1",
            )
        body = hashlib.md5(_stream_body()).hexdigest()
        for n in NICS:
            wait_until(
                lambda p=n.port: received(destination, p) >= STREAM_BYTES,
                60,
                f"the download through {n.port} to complete",
            )
            feed = feeds[n.port]
            wait_until(lambda f=feed: f.poll() is not None, 15, f"the streamer behind {n.port} to finish")
            assert feed.stdout is not None
            assert feed.stdout.read() == f"sent {STREAM_BYTES}\n"
            digest = destination.run(f"md5sum /tmp/stream-{n.port}", check=True).output.split()[0]
            assert digest == body, f"the download through {n.port} arrived damaged"
        early = [n.port for n in NICS if after[n.port] >= STREAM_BYTES]
        if early:
            # Only a retry (MigrationLostMemory, QEMU's fault) can make a migration outlast the downloads.
            assert lost, f"the downloads through {early} finished before the migration did: it proved nothing"
            pytest.xfail(f"the downloads through {early} finished during the retries after: {lost}")
        stats = daemon.stats()
        for n in NICS:
            assert stats[f"{n.port}1"]["broken"] is None and stats[f"{n.port}1"]["totals"]["tx_packets"] > 0
            assert daemon.status()["ports"][f"{n.port}1"]["ring"] == ("packed" if n.packed else "split")
            assert destination.ping(n.peer, count=3) == 0.0
        # vhostmap dies under the migrated guest: QEMU starts the new daemon's rings from the bases the
        # migration carried (GET_VRING_BASE on the source), stale by now; both NICs work again.
        daemon.restart()
        for n in NICS:
            daemon.wait_connected(f"{n.port}1")
        for n in NICS:
            wait_until(
                lambda n=n: destination.ping(n.peer, count=1) == 0.0,
                30,
                f"pings through {n.port}1 after vhostmap's restart",
                details=daemon.diagnostics,
            )
            assert daemon.status()["ports"][f"{n.port}1"]["ring"] == ("packed" if n.packed else "split")
        destination.poweroff()
    with capsys.disabled():
        print(
            f"\nlive migration a0, p0 -> a1, p1: {migrated:.2f} s (QEMU: total {info.get('total-time')} ms, "
            f"downtime {info.get('downtime')} ms, {info['ram']['transferred'] // 2**20} MiB sent); downloads "
            + ", ".join(
                f"through {n.port} at {before[n.port] // 1024} KiB when it began, "
                f"{after[n.port] // 1024} KiB when it ended"
                for n in NICS
            )
            + f", {STREAM_BYTES // 1024} KiB intact at the destination"
            + "".join(f"\n  an earlier attempt, abandoned and the source resumed: {e}" for e in lost)
        )

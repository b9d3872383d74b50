"""``scripts/soak``: vhostmap under steady traffic and steady churn for a while, watched for leaks.

One daemon serves three consumers at once, all of them real peers:

- a link ``a0<->a1`` and a switch ``vale0`` of ``s0, s1``, whose four ports are dpdk-testpmd virtio-user
  ports (testpmd listens, vhostmap connects in client mode and reconnects) io-forwarding frames around
  for as long as the soak lasts (``start tx_first``);
- a switch ``vale1`` joining a QEMU guest (busybox, stock virtio_net; QEMU listens, vhostmap connects) and a
  local application (``vale1:pong``, the client library) that answers the guest's pings;
- applications that come and go on ``vale0`` (``vale0:churn``), each sending a burst.

Every ``--every`` seconds one action of a rotating schedule runs: ``s1`` detached from ``vale0`` and
attached again, an application opening and closing, testpmd restarted (vhostmap reconnects), and every
``--restart-every`` actions the daemon killed with SIGKILL and started again (every front-end reconnects).
Every ``--sample`` seconds the daemon's RSS (and of it the anonymous part: the daemon's own heap, where a
leak shows; mapped guest memory grows the rest as traffic touches it) and open fds, the traffic, the drops
by reason and the allocator's free buffers are recorded, and the guest pings the application.

At the end every front-end leaves and the allocator must have every buffer back (the same free count as
the daemon had before any front-end came: nothing lost, nothing held twice), and within each life of the
daemon the anonymous RSS and the fds must stay flat from its second sample on (the first ones see the
peers still connecting). The report is a table and a JSON file; the exit
status says whether the checks held.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vhostmap.apps import client
from vhostmap.apps.pktgen import Limits, pong
from vhostmap.control.client import ControlError, call
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until
from vhostmap.netmap.errors import PortBroken
from vhostmap.packets import Addresses, udp_frame

TESTPMD_PORTS = ("a0", "a1", "s0", "s1")
GUEST_MAC = "52:54:00:00:00:51"
GUEST_IP, PONG_IP = "10.0.0.1", "10.0.0.2"
PONG_MAC = "02:00:00:00:00:52"
# Bursts testpmd injects into its io loops after each (re)start.
TX_FIRST_BURSTS = 4
# How much anonymous RSS (KiB) and how many fds a daemon may gain after its second sample and still count
# as flat (the allocator's and the guests' shared memory is not anonymous).
ANON_SLACK_KB = 4 * 1024
FD_SLACK = 2
_LOSS = re.compile(r"(\d+)% packet loss")


@dataclass
class Sample:
    """One look at the daemon: when (seconds into the soak), which life, its RSS and fds, the traffic and
    drops summed over its ports, the switches' drops, the allocator's free buffers, the guest's ping loss."""

    t: float
    life: int
    pid: int
    rss_kb: int
    anon_kb: int
    fds: int
    rx_packets: int
    tx_packets: int
    rx_dropped: int
    tx_dropped: int
    switch_dropped: int
    free_buffers: int
    ping_loss: float | None


@dataclass
class Report:
    """What the soak saw: samples, actions (time, name, seconds it took), and the checks' verdicts."""

    minutes: float
    samples: list[Sample] = field(default_factory=list)
    actions: list[tuple[float, str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    baseline_free_buffers: int = 0
    final_free_buffers: int = 0

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.problems

    def table(self) -> str:
        """The samples as a table, then the actions and the verdict."""
        rows = [
            f"{'t(s)':>6} {'life':>4} {'RSS KiB':>8} {'anon KiB':>8} {'fds':>4} {'rx':>11} {'tx':>11} "
            f"{'rx drop':>8} {'tx drop':>8} {'sw drop':>8} {'free bufs':>9} {'ping loss':>9}"
        ]
        for s in self.samples:
            loss = "-" if s.ping_loss is None else f"{s.ping_loss:.0f}%"
            rows.append(
                f"{s.t:6.0f} {s.life:4d} {s.rss_kb:8d} {s.anon_kb:8d} {s.fds:4d} {s.rx_packets:11d} "
                f"{s.tx_packets:11d} {s.rx_dropped:8d} {s.tx_dropped:8d} {s.switch_dropped:8d} "
                f"{s.free_buffers:9d} {loss:>9}"
            )
        done = ", ".join(f"{name} ({secs:.1f} s)" for _, name, secs in self.actions)
        rows.append(f"actions: {len(self.actions)}: {done}")
        rows.append(
            f"buffers: {self.baseline_free_buffers} free before any front-end, "
            f"{self.final_free_buffers} after they all left"
        )
        rows.append("PASS" if self.ok else "FAIL: " + "; ".join(self.problems))
        return "\n".join(rows)


class Soak:
    """The soak's processes in ``workdir`` and what it does to them (see the module docstring)."""

    def __init__(self, workdir: Path, kernel: GuestKernel, testpmd_cpu: int = 0) -> None:
        self.workdir = workdir
        self.kernel = kernel
        self.testpmd_cpu = testpmd_cpu
        self.socks = {name: workdir / f"{name}.sock" for name in (*TESTPMD_PORTS, "g0")}
        ports = [f"{name}=vhost-user,path={path},mode=client" for name, path in self.socks.items()]
        self.daemon = VhostmapDaemon(
            workdir,
            ports,
            links=["a0,a1"],
            extra_args=["--switch", "vale0=s0,s1", "--switch", "vale1=g0"],
        )
        self.life = 0
        self.testpmd: Testpmd | None = None
        self.guest: QemuGuest | None = None
        self._stop = threading.Event()
        self._pong: threading.Thread | None = None
        self._churn = 0

    # --- the peers ----------------------------------------------------------------------------------------
    def start_daemon(self) -> None:
        """Start (or start again) the daemon."""
        self.daemon.start()
        self.life += 1

    def start_testpmd(self) -> None:
        """Start testpmd listening on the four sockets (vhostmap connects), and its io loops."""
        ports = [VirtioUserPort(self.socks[name], server=True) for name in TESTPMD_PORTS]
        self.testpmd = Testpmd(ports, forward_mode="io", cpu=self.testpmd_cpu, workdir=self.workdir)
        self.testpmd.open()
        self.kick_testpmd()

    def kick_testpmd(self) -> None:
        """Once vhostmap is connected to every testpmd port, (re)inject frames into the io loops."""
        assert self.testpmd is not None
        for name in TESTPMD_PORTS:
            self.daemon.wait_connected(name)
        for port in range(len(TESTPMD_PORTS)):
            self.testpmd.wait_for_link(port)
        self.testpmd.command("stop")
        self.testpmd.start(tx_first=TX_FIRST_BURSTS)

    def start_guest(self) -> None:
        """Boot the guest (QEMU listens on g0's socket) and point it at the pong application."""
        nic = Nic(self.socks["g0"], GUEST_MAC, mode="server", ip=f"{GUEST_IP}/24")
        self.guest = QemuGuest([nic], kernel=self.kernel, workdir=self.workdir / "guest")
        self.guest.start()
        self.guest.wait_ready()
        self.guest.wait_carrier("eth0")
        self.guest.run(f"arp -s {PONG_IP} {PONG_MAC}", check=True)

    def start_pong(self) -> None:
        """Answer the guest's pings from an application port on vale1, reopening it across restarts."""

        def serve() -> None:
            while not self._stop.is_set():
                try:
                    with client.open("vale1:pong", self.daemon.control) as port:
                        while not self._stop.is_set():
                            pong(port, Limits(duration=0.5))
                except (ControlError, ConnectionError, PortBroken, OSError, ValueError):
                    self._stop.wait(0.2)  # the daemon is restarting: try again (pacing, not synchronisation)

        self._pong = threading.Thread(target=serve, name="soak-pong", daemon=True)
        self._pong.start()

    # --- the schedule -------------------------------------------------------------------------------------
    def actions(self, restart_every: int) -> Iterator[tuple[str, Callable[[], None]]]:
        """The rotating schedule, forever; the daemon is killed and restarted every ``restart_every``."""
        churn: list[tuple[str, Callable[[], None]]] = [
            ("switch detach/attach", self.detach_attach),
            ("application churn", self.churn),
            ("testpmd restart", self.restart_testpmd),
        ]
        for n in itertools.count(1):
            yield (
                ("daemon SIGKILL and restart", self.restart_daemon)
                if n % restart_every == 0
                else churn[n % len(churn)]
            )

    def detach_attach(self) -> None:
        """Take s1 off vale0 and put it back (it goes to a sink meanwhile)."""
        call(self.daemon.control, "switch", op="detach", switch="vale0", port="s1")
        call(self.daemon.control, "switch", op="attach", switch="vale0", port="s1")

    def churn(self) -> None:
        """An application opens a vale0 port, sends a burst, and goes."""
        self._churn += 1
        frame = udp_frame(64, Addresses())
        with client.open(f"vale0:churn{self._churn % 4}", self.daemon.control) as port:
            port.tx_rings[0].send([frame] * 64)
            port.txsync()

    def restart_testpmd(self) -> None:
        """Quit testpmd and start it again: vhostmap's client-mode ports reconnect."""
        assert self.testpmd is not None
        self.testpmd.close()
        self.start_testpmd()

    def restart_daemon(self) -> None:
        """SIGKILL the daemon and start a new one: every front-end reconnects."""
        self.daemon.kill()
        self.start_daemon()
        self.daemon.wait_connected("g0")
        self.kick_testpmd()

    # --- looking ------------------------------------------------------------------------------------------
    def sample(self, t: float, ping: bool) -> Sample:
        """One look at the daemon (and, with ``ping``, a few pings from the guest)."""
        pid = self.daemon.pid
        assert pid is not None
        rss, anon = _rss_kb(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        reply = call(self.daemon.control, "stats")
        totals = [p["totals"] for p in reply["ports"].values() if p["totals"]]
        switch_dropped = sum(
            port["dropped"] for sw in reply.get("switches", {}).values() for port in sw["ports"].values()
        )
        free = int(self.daemon.status()["memory"]["netmap_buf"]["objfree"])
        loss = self.ping_loss() if ping else None
        return Sample(
            t,
            self.life,
            pid,
            rss,
            anon,
            fds,
            sum(x["rx_packets"] for x in totals),
            sum(x["tx_packets"] for x in totals),
            sum(x["rx_dropped"] for x in totals),
            sum(x["tx_dropped"] for x in totals),
            switch_dropped,
            free,
            loss,
        )

    def ping_loss(self) -> float | None:
        """The guest's ping loss to the pong application, in %, or None if the guest did not answer."""
        assert self.guest is not None
        result = self.guest.run(f"ping -c 5 -i 0.2 -W 1 {PONG_IP}", timeout=20)
        match = _LOSS.search(result.output)
        return float(match.group(1)) if match else None

    def free_buffers(self) -> int:
        """The allocator's free buffers, now."""
        return int(self.daemon.status()["memory"]["netmap_buf"]["objfree"])

    def disconnected(self) -> bool:
        """Whether no front-end is connected to any port and no application holds one."""
        status = self.daemon.status()
        return not status["clients"] and not any(p.get("connected") for p in status["ports"].values())

    def close(self) -> None:
        """Stop everything (idempotent)."""
        self._stop.set()
        if self._pong is not None:
            self._pong.join(10)
        for proc in (self.guest, self.testpmd):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.close()
        self.guest = self.testpmd = None
        self.daemon.stop()


def _rss_kb(pid: int) -> tuple[int, int]:
    """The resident set of process ``pid`` and its anonymous part, in KiB (/proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = [re.search(rf"{key}:\s+(\d+)", status) for key in ("VmRSS", "RssAnon")]
    rss, anon = (int(m.group(1)) if m else 0 for m in values)
    return rss, anon


def run(
    workdir: Path,
    minutes: float,
    every: float,
    sample_every: float,
    restart_every: int = 9,
    out: Any = sys.stdout,
) -> Report:
    """Soak for ``minutes``; one action every ``every`` s (a daemon restart every ``restart_every``), one
    sample every ``sample_every`` s."""
    report = Report(minutes)
    soak = Soak(workdir, GuestKernel.from_cache())
    start = time.monotonic()
    try:
        soak.start_daemon()
        report.baseline_free_buffers = soak.free_buffers()
        soak.start_testpmd()
        soak.start_guest()
        soak.start_pong()
        schedule = soak.actions(restart_every)
        deadline = start + minutes * 60
        next_action, next_sample = start + every, start
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                s = soak.sample(now - start, ping=True)
                report.samples.append(s)
                print(
                    f"soak: {s.t:5.0f} s, life {s.life}, RSS {s.rss_kb} KiB, {s.fds} fds",
                    file=out,
                    flush=True,
                )
                next_sample = now + sample_every
            if now >= next_action:
                name, action = next(schedule)
                t0 = time.monotonic()
                action()
                report.actions.append((t0 - start, name, time.monotonic() - t0))
                next_action = time.monotonic() + every
            time.sleep(max(0.0, min(next_action, next_sample, deadline) - time.monotonic()))  # pacing
        report.samples.append(soak.sample(time.monotonic() - start, ping=True))
        # Every front-end leaves; the daemon must then hold every buffer it held before any came.
        soak._stop.set()
        for proc in (soak.guest, soak.testpmd):
            if proc is not None:
                proc.close()
        soak.guest = soak.testpmd = None
        wait_until(soak.disconnected, 60, "every front-end and application to leave")
        report.final_free_buffers = soak.free_buffers()
    finally:
        soak.close()
    report.problems += check(report)
    return report


def check(report: Report) -> list[str]:
    """The soak's verdicts: every buffer back, RSS and fds flat within each life of the daemon."""
    problems = []
    if report.final_free_buffers != report.baseline_free_buffers:
        problems.append(
            f"{report.baseline_free_buffers - report.final_free_buffers} buffers not back after every "
            "front-end left"
        )
    lives: dict[int, list[Sample]] = {}
    for s in report.samples:
        lives.setdefault(s.life, []).append(s)
    for life, samples in lives.items():
        settled = samples[1:]
        if len(settled) < 2:
            continue
        first, peak_anon, peak_fds = settled[0], max(s.anon_kb for s in settled), max(s.fds for s in settled)
        if peak_anon - first.anon_kb > ANON_SLACK_KB:
            problems.append(f"life {life}: anonymous RSS grew from {first.anon_kb} to {peak_anon} KiB")
        if peak_fds - first.fds > FD_SLACK:
            problems.append(f"life {life}: open fds grew from {first.fds} to {peak_fds}")
    if not any(s.rx_packets for s in report.samples):
        problems.append("no traffic was seen")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/soak``: run, print the table, write the JSON; 0 when every check held."""
    ap = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=20.0, help="seconds between actions")
    ap.add_argument("--sample", type=float, default=15.0, help="seconds between samples")
    ap.add_argument("--restart-every", type=int, default=9, help="actions between daemon restarts")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh directory under /tmp")
    ap.add_argument("--json-out", type=Path, default=Path("soak.json"))
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(f"/tmp/vhm-soak-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    report = run(workdir, args.minutes, args.every, args.sample, args.restart_every)
    print(report.table())
    args.json_out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

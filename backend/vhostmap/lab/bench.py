"""Benchmarks: vhostmap against DPDK's own vhost-user back-end, in the same run, on the same cores.

Run with ``scripts/bench``. Every scenario puts a dpdk-testpmd front-end (net_virtio_user, as a guest's
driver would be) on one CPU and a back-end on the other: vhostmap (``serve --poll --cpu``), or testpmd with
DPDK's vhost library (net_vhost), the reference. Runs alternate between the back-ends (A B A B ...), so a
machine that gets busier or quieter during the benchmark affects both alike, and every run starts fresh
processes.

* P1 dequeue: the front-end transmits (txonly) into a lone back-end port, which drops what it receives.
  Rate: packets the back-end received (vhostmap's port counters, or the net_vhost port's RX counter).
* P2 enqueue: the back-end transmits into the front-end (rxonly): a vhostmap port with ``generate=SIZE``
  (the daemon's built-in source), or net_vhost in txonly mode. Rate: what the front-end received.
* P3 forwarding: a front-end with two ports io-forwards (started with ``tx_first``) through the back-end and
  back: vhostmap's ports in a ``--link`` or on a ``--switch``, or testpmd io-forwarding two net_vhost
  ports. Rate: packets the front-end received, both ports together. Each run also reports the frames that
  circulated (``circulating``): those the front-end sent and had not received back when it stopped, what is
  left of tx_first's bursts after testpmd dropped what found its transmit ring full. The loop runs with
  that many frames, a condition of the comparison: on the lab's machine DPDK's keeps about all 1024
  (2 x TX_FIRST_BURSTS bursts of 32), vhostmap's link and switch about a ring's worth (224-256). Why is not
  established: both hand a transmit buffer back within the pass that took it (vhostmap's one-copy pass
  copies a frame the other guest has no room for into a netmap buffer to wait, or drops it when that ring
  is full too).

* G1 TSO enqueue (only when named, ``--only G1``; ``--sizes`` does not apply): what the back-end's own core
  moves in Gbit/s when it hands 64 KiB TCP frames to the front-end (rxonly) rather than MTU frames. vhostmap
  ports with ``generate=``: 1514-byte frames (``vhostmap-mtu``); 64000-byte TCP frames with a segmentation
  offload to a front-end that takes them whole (``vhostmap-tso``: testpmd asks for TCP LRO and the receive
  checksums, so the driver negotiates GUEST_TSO4/6 and GUEST_CSUM); the same frames to a front-end that takes
  no offload, so vhostmap segments each into 44 frames on the way out (``vhostmap-tso-completed``); and
  net_vhost txonly with 1514-byte frames (``dpdk``: DPDK's txonly sends no TSO frames). Rate: the bytes of
  the frames the front-end received, in Gbit/s; every ratio is to DPDK's MTU frames.
* T1 guest TCP (`vhostmap.lab.tcpbench`; only when named, ``--only T1``: it boots two guests per run, a
  round takes minutes): two stock Linux TCG guests, one NIC each, QEMU the client of the back-end's two
  sockets; guest B fetches a random file of ``--file-mb`` MiB (``--sizes`` does not apply) from guest A's
  busybox httpd with wget, md5-compared every time (a mismatch fails the run). Back-ends: vhostmap with
  the ports in a link, the same with ``offloads=off`` on both ports (every guest segments at the MTU and
  checksums in software), the ports on a switch, and testpmd io-forwarding two net_vhost ports with
  ``tso=1`` (DPDK's vhost library passing the guests' TSO and checksum offloads). Rate: file bits over
  the wget's wall time in guest B, in Mbit/s; ``--warmup`` seconds of fetches come first, unmeasured, then
  fetches until their times add up to ``--seconds`` (at least one). Besides the ratio to DPDK, the table
  gives the link's rate with offloads over its rate without, per round.

  CPUs: the back-end gets the same core as in P1-P3 (vhostmap ``--poll --cpu``, testpmd's lcores pinned
  there) and both guests' QEMUs are pinned together to the front-end's CPU, where they stand in for the
  testpmd front-end. A polling back-end takes its core whole whether it is DPDK's or vhostmap's, so the
  guests, which bound the rate under TCG (about a gigabit), get exactly the same CPU with every back-end;
  letting QEMU float would hand the guests whatever a back-end leaves of its core, and measure that
  instead. The numbers are therefore "two TCG guests sharing a core", not a guest's best.

``--layouts split,packed`` runs P1-P3 over both virtqueue layouts: each back-end again over packed rings
(``+packed``: vhostmap's ports with ``packed=on``, every front-end port with ``packed_vq=1``), the packed
ones compared with DPDK's over packed rings, in the same rounds as the split ones.

Builds: each back-end runs as compiled, a condition of every ratio, named before the first run and in the
JSON (``machine.builds``): vhostmap's kernels for this machine's instruction set (datapath/build.py's -march,
``VHOSTMAP_MARCH``), DPDK's libraries for their RTE_MACHINE (Debian's packages: ``corei7``, SSE4.2; a build of
DPDK from source defaults to ``native``, as vhostmap's does).

The ratio of a run pair is vhostmap's rate over DPDK's in the same round; the table gives the median of those.
``--baseline DIR`` adds, next to each vhostmap back-end, the same back-end run from another checkout (DIR, its
kernels built: a git worktree of the commit to compare with), alternating within each round too, and the table
gives this tree's rate over the baseline's per round: on a machine whose speed drifts between minutes, a
change is judged by that ratio, not by two invocations' rates.

Core probes: on a VM the host moves the two vCPUs nearer and further apart while the benchmark runs (on the
lab's guest a cache line's round trip between them takes 60-90 ns at some moments and 300-340 ns at others,
and every back-end's rate, DPDK's too, follows by up to 2x), so two runs of a round can have been made under
different conditions. Just before and just after every run (between its processes, the CPUs idle), a few
milliseconds of `vhostmap.lab.corelatency` measure the round trip between the front-end's and the back-end's
CPUs; the progress line of the run shows both (``cores 95/97 ns``) and the JSON keeps them
(``core_round_trip_ns``). The table shows, under each back-end's row, every run's two probes and their range,
and under each vhostmap back-end's, the median ratio to DPDK over the matched rounds alone: those whose four
probes (this back-end's run and DPDK's, before and after each) are within CORE_MATCH_FACTOR of one another,
with how many of the rounds that is (``matched 2/3``). The probes bracket a run, they do not watch it: a
matched pair may still have moved and come back in between, but a pair that did not match surely moved, and
its ratio compares two machines. With ``--baseline``, the ratio over the baseline gets the same line
(``over the baseline, matched 2/3``). JSON: ``matched_rounds``, ``matched_round_ratios``,
``matched_ratio_to_dpdk`` per vhostmap series, ``matched_baseline_rounds``, ``matched_baseline_round_ratios``,
``matched_ratio_to_baseline`` per series with a baseline twin, and ``core_probe`` (the CPUs, the probe's size,
the factor).

A matched round needs both runs in one state, and on the lab's guest that is often not so. When the probes
of the whole invocation fall in two groups (sorted, two neighbours CORE_STATE_GAP apart or more: the lab's
shows 60-90 and 300-340 ns), every run whose two probes lie in one group belongs to that state, near or
far, whatever its round, and the table adds per state the median rate of a back-end's runs in it against
DPDK's runs in it (``by core state, to DPDK``), and with ``--baseline`` against the baseline's (``over the
baseline by core state``): pooled over rounds, every steady run counts. JSON: ``state_ratios_to_dpdk`` and
``state_ratios_to_baseline`` per series (median, reference_median, ratio, samples), ``core_probe.states``.

The host moves the vCPUs within a run too, and the rate follows within a second (seen: a link at 14 Mpps
near for 3 s, then at 4.7 far for the rest of the run, between two near probes). So P1-P3 and G1 cut a run's
measured interval into windows of WINDOW seconds and probe between them, the run's processes stopped
(SIGSTOP) for the few milliseconds a probe takes: the progress line shows each window's rate and the probe
before it (``windows 13.9@78 4.7@330``), and the pooling by state takes windows, each in the state of the
probes around it, rather than runs (the "samples" of the state lines; a run without windows, T1's, counts
whole). JSON: ``windows`` per series (per run: rate, before, after).

Results go to a JSON file and, when matplotlib is there (the ``bench`` extra), a PNG chart. Every process,
socket and hugepage file is removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from vhostmap.control.client import ControlError
from vhostmap.datapath import ffi, lib
from vhostmap.lab import corelatency, tcpbench
from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.guestkernel import GuestKernel, GuestKernelMissing
from vhostmap.lab.testpmd import ForwardMode, Testpmd, VhostPort, VirtioUserPort, build_machine
from vhostmap.lab.wait import wait_until
from vhostmap.system.cpu import check_cpu

SCENARIOS = {"P1": "dequeue", "P2": "enqueue", "P3": "forwarding", "G1": "TSO enqueue", "T1": "guest TCP"}
# What runs without --only: G1 and T1 (which boots guests, minutes per round) run only when asked for.
DEFAULT_SCENARIOS = ("P1", "P2", "P3")
OFFLOADS_OFF = "-offloads-off"  # a T1 back-end: the one named before it with offloads=off on its ports
# A P1-P3 back-end over packed virtqueues (``--layouts``): the one named before it, vhostmap's ports with
# ``packed=on`` and the front-end's with ``packed_vq=1``; its ratio is to DPDK's over packed rings too.
PACKED = "+packed"
LAYOUTS = ("split", "packed")
LAYOUT_SCENARIOS = ("P1", "P2", "P3")  # G1 and T1 run over split rings whatever --layouts says
# The front-end's option for packed rings (net_virtio_user; DPDK's vhost library follows what it negotiates).
PACKED_VQ = ("packed_vq=1",)
# The back-ends of each scenario, DPDK's last: one round runs each once, in this order.
BACKENDS = {
    "P1": ("vhostmap", "dpdk"),
    "P2": ("vhostmap", "dpdk"),
    "P3": ("vhostmap-link", "vhostmap-switch", "dpdk"),
    "G1": ("vhostmap-mtu", "vhostmap-tso", "vhostmap-tso-completed", "dpdk"),
    "T1": ("vhostmap-link", "vhostmap-link" + OFFLOADS_OFF, "vhostmap-switch", "dpdk"),
}
# The unit of each scenario's rates.
UNITS = {"P1": "Mpps", "P2": "Mpps", "P3": "Mpps", "G1": "Gbit/s", "T1": "Mbit/s"}
# G1's frames: the TSO frames' length, and the MTU frames' (1500 bytes of IP).
TSO_FRAME, MTU_FRAME = 64000, 1514
# testpmd's receive offloads for a front-end that takes TSO frames: UDP and TCP checksums and TCP LRO
# (RTE_ETH_RX_OFFLOAD_*; the virtio PMD offers no IPv4 checksum, which --enable-rx-cksum would ask for).
TSO_RX_OFFLOADS = "--rx-offloads=0x1c"
DPDK = "dpdk"
BASELINE = "@baseline"  # the suffix of a back-end run from Settings.baseline
# Seconds of a run's measured interval between two core probes (`measure`): the host moves the vCPUs within
# a run, and the rate follows within a second (seen: 14 Mpps near for 3 s, then 4.7 far for the rest).
WINDOW = 0.5
# Bursts each front-end port sends with ``start tx_first`` in P3: enough to keep both directions' rings busy
# (what does not fit is dropped by testpmd at once, and the rest circulates).
TX_FIRST_BURSTS = 16
SETUP_TIMEOUT = 60.0
# Core probes that differ by at most this factor were made at the same distance between the CPUs: the lab's
# guest shows 60-90 and 300-340 ns, and each state's probes spread by some 10-20%.
CORE_MATCH_FACTOR = 1.3
# The probes of an invocation fall in two states (near, far) when, sorted, two neighbours differ by at least
# this factor: the lab's guest shows 60-90 ns and 300-340 ns, nothing between.
CORE_STATE_GAP = 1.5


class BenchError(RuntimeError):
    """A run could not be measured (no traffic, a process died); the message says which and why."""


@dataclass
class Settings:
    """What one ``scripts/bench`` invocation measures, and where."""

    runs: int = 3
    seconds: float = 5.0
    warmup: float = 1.0
    sizes: tuple[int, ...] = (64, 1500)
    only: tuple[str, ...] = DEFAULT_SCENARIOS
    backend_cpu: int = 1
    frontend_cpu: int = 0  # the testpmd front-end's, or T1's guests'
    baseline: Path | None = None  # another checkout whose vhostmap runs as BACKEND@baseline too
    file_mb: int = 64  # T1: the file the guests copy, in MiB
    layouts: tuple[str, ...] = ("split",)  # P1-P3's virtqueue layouts (LAYOUTS), each with its DPDK anchor

    def sizes_of(self, scenario: str) -> tuple[int, ...]:
        """The sizes ``scenario`` runs at: frame sizes, G1's TSO frame, or T1's one file size (MiB)."""
        return {"T1": (self.file_mb,), "G1": (TSO_FRAME,)}.get(scenario, self.sizes)


@dataclass
class Series:
    """The runs of one back-end in one scenario at one frame size (T1: file size)."""

    scenario: str
    size: int
    backend: str
    # In the scenario's unit (UNITS); None: the run failed or could not run.
    rates: list[float | None] = field(default_factory=list)
    # vhostmap's: the share of the measured interval its datapath thread had work (None: DPDK, or unknown).
    busy: list[float | None] = field(default_factory=list)
    # vhostmap's: frames counted per datapath round that moved frames (None: DPDK, or unknown).
    per_round: list[float | None] = field(default_factory=list)
    # T1: the mean frame guest A sent, as the back-end counted it (None: P1-P3).
    frame_bytes: list[float | None] = field(default_factory=list)
    # T1: frames the back-end dropped during the measured fetches (a guest's full receive ring).
    dropped: list[int | None] = field(default_factory=list)
    # T1: the md5s of guest A's file and of guest B's copy, equal (a mismatch fails the run instead).
    md5: list[tuple[str, str] | None] = field(default_factory=list)
    # P3: the frames circulating in the loop (`Rate.circulating`).
    circulating: list[int | None] = field(default_factory=list)
    # The core probes around each run.
    cores: list[CoreProbes] = field(default_factory=list)
    # Each run's windows (`measure`), each with its own probes; () when the run had none (T1, a failed run).
    windows: list[tuple[Window, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """The unit of the rates."""
        return UNITS[self.scenario]

    def samples(self) -> Iterator[tuple[float, CoreProbes]]:
        """The rates measured and the probes around each: every window of a run that had windows, else the
        run whole."""
        for value, cores, windows in zip(self.rates, self.cores, self.windows, strict=True):
            if windows:
                yield from ((w.rate, w.cores) for w in windows)
            elif value is not None:
                yield value, cores

    @property
    def median(self) -> float | None:
        """The median of the runs that were measured."""
        done = [m for m in self.rates if m is not None]
        return statistics.median(done) if done else None

    def record(self, rate: Rate | None, note: str = "", cores: CoreProbes | None = None) -> None:
        """Append one run's result (None: it failed, ``note`` says why) and the core probes around it."""
        self.cores.append(cores or CoreProbes(None, None))
        self.windows.append(rate.windows if rate else ())
        self.rates.append(rate.value if rate else None)
        self.busy.append(rate.busy if rate else None)
        self.per_round.append(rate.per_round if rate else None)
        self.frame_bytes.append(rate.frame_bytes if rate else None)
        self.dropped.append(rate.dropped if rate else None)
        self.md5.append(rate.md5 if rate else None)
        self.circulating.append(rate.circulating if rate else None)
        if note:
            self.notes.append(note)


@dataclass(frozen=True)
class CoreProbes:
    """The round trip in ns of a cache line between the front-end's and the back-end's CPUs, probed just
    before and just after one run (`vhostmap.lab.corelatency`; None: that probe failed)."""

    before: float | None
    after: float | None

    def __str__(self) -> str:
        return "/".join(f"{p:.0f}" if p is not None else "n/a" for p in (self.before, self.after))


def say(text: str) -> None:
    """One line of progress, on stderr (stdout is the table)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- measuring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """What one run measured: its rate in the scenario's unit (Mpps; T1: Mbit/s), and for vhostmap the share
    of the interval its datapath thread had work (1.0: the back-end is the bottleneck; well below: the
    front-end is)."""

    value: float
    busy: float | None = None
    per_round: float | None = None  # frames counted per datapath round that moved frames
    frame_bytes: float | None = None  # T1: the mean frame guest A sent
    dropped: int | None = None  # T1: frames the back-end dropped during the measured fetches
    md5: tuple[str, str] | None = None  # T1: guest A's file's and guest B's copy's, equal
    # P3: frames the front-end sent and had not received back when it stopped (`_circulating`)
    circulating: int | None = None
    detail: str = ""  # for the progress line
    windows: tuple[Window, ...] = ()  # the run's measured interval in windows, each with its core probes


@dataclass(frozen=True)
class Window:
    """A part of a run's measured interval: its rate, and the core probes just before and just after it (made
    with the run's processes stopped: `Bench.paused_probe`)."""

    rate: float
    cores: CoreProbes

    def __str__(self) -> str:
        """The rate and the probe before it, as the progress line shows them (``13.9@78``)."""
        before = self.cores.before
        return f"{self.rate:.1f}" + (f"@{before:.0f}" if before is not None else "")


def measure(
    counter: Callable[[], int],
    seconds: float,
    warmup: float,
    alive: Callable[[], None],
    idle: Callable[[], tuple[int, int, int]] | None = None,
    probe: Callable[[], float | None] | None = None,
) -> Rate:
    """Mpps of a cumulative packet ``counter`` over ``seconds``, once traffic flows and ``warmup``
    seconds passed. ``alive`` raises if a process of the run died (checked while waiting for traffic, and
    after the measurement). ``idle``: the back-end's idle and clock nanoseconds and its rounds that moved
    frames, read with the counter. ``probe``: the core round trip, made between windows of about WINDOW
    seconds into which the interval is then cut (`Rate.windows`); the time it takes is not measured."""

    def flowing() -> bool:
        alive()
        return counter() > 0

    wait_until(flowing, SETUP_TIMEOUT, "traffic to start", interval=0.05)
    time.sleep(warmup)  # a settling interval before measuring, not synchronisation
    n = max(1, round(seconds / WINDOW)) if probe else 1
    packets = 0
    elapsed = idle_ns = clock_ns = rounds = 0.0
    windows = []
    before = probe() if probe else None
    for _ in range(n):
        load0 = idle() if idle else None
        first, t0 = _sample(counter)
        time.sleep(seconds / n)  # the measurement interval itself
        last, t1 = _sample(counter)
        load1 = idle() if idle else None
        packets += last - first
        elapsed += t1 - t0
        if load0 is not None and load1 is not None:
            idle_ns += load1[0] - load0[0]
            clock_ns += load1[1] - load0[1]
            rounds += load1[2] - load0[2]
        if probe:
            after = probe()
            windows.append(Window((last - first) / (t1 - t0) / 1e6, CoreProbes(before, after)))
            before = after
    alive()
    if packets <= 0:
        raise BenchError(f"no packets in {elapsed:.1f} s (counter stayed at {first})")
    busy = per_round = None
    if clock_ns > 0:
        idle_share = idle_ns / clock_ns
        # A polling pass that found nothing is booked as idle when it ends, all of it: one the thread was
        # descheduled through on a starved CPU began partly before the first sample, and the share can pass
        # 1. That measures nothing: n/a, not a negative busy.
        busy = 1 - idle_share if idle_share <= 1 else None
        if rounds > 0:
            per_round = packets / rounds
    return Rate(packets / elapsed / 1e6, busy, per_round, windows=tuple(windows))


def _datapath_idle(daemon: VhostmapDaemon) -> Callable[[], tuple[int, int, int]]:
    """The daemon's datapath: nanoseconds its threads had nothing to do, its clock, and the rounds that moved
    frames (``vhostmap status``)."""

    def read() -> tuple[int, int, int]:
        d = daemon.status()["datapath"]
        threads = d["threads"]
        return (
            sum(int(t["idle_ns"]) for t in threads),
            int(d["clock_ns"]),
            sum(int(t["rounds"]) for t in threads),
        )

    return read


def _sample(counter: Callable[[], int]) -> tuple[int, float]:
    """The counter's value and when it was read (the middle of the round trip that read it)."""
    before = time.monotonic()
    value = counter()
    return value, (before + time.monotonic()) / 2


def _testpmd_rx(tp: Testpmd, ports: Sequence[int] = (0,)) -> Callable[[], int]:
    return lambda: sum(s.rx_packets for p, s in tp.stats().items() if p in ports)


def _circulating(fe: Testpmd, rate: Rate) -> Rate:
    """``rate`` with the frames P3's loop ran with: what the front-end sent and had not received back, counted
    once it stopped forwarding (a frame still in the back-end or in a ring is neither received nor lost)."""
    stats = fe.stop().values()
    return replace(rate, circulating=sum(s.tx_packets - s.rx_packets for s in stats))


def _testpmd_rx_gbit(tp: Testpmd) -> Callable[[], int]:
    """Port 0's received bytes in kbit: what `measure` turns into a rate in Gbit/s (its "M" per second)."""
    return lambda: tp.stats()[0].rx_bytes * 8 // 1000


def _layout(packed: bool, sep: str = "") -> str:
    """The port option that makes vhostmap offer packed rings, after ``sep``; nothing for split rings."""
    return f"{sep}packed=on" if packed else ""


def _connected(daemon: VhostmapDaemon, ports: Sequence[str], packed: bool) -> None:
    """Wait until the front-end connected to each of ``ports`` and negotiated the ring layout asked for: one
    that fell back to split rings would otherwise be measured as packed."""
    want = "packed" if packed else "split"
    for name in ports:
        daemon.wait_connected(name, SETUP_TIMEOUT)
    wait_until(
        lambda: all(daemon.status()["ports"][name]["ring"] == want for name in ports),
        SETUP_TIMEOUT,
        f"the front-end to negotiate {want} rings on ports {', '.join(ports)}",
    )


def _checker(*procs: Testpmd | VhostmapDaemon) -> Callable[[], None]:
    """Raises BenchError if any of ``procs`` exited (or, the daemon, stopped answering)."""

    def check() -> None:
        for proc in procs:
            if isinstance(proc, Testpmd):
                if not proc.alive:
                    raise BenchError(f"testpmd exited\n{proc.diagnostics()}")
            else:
                try:
                    proc.status()
                except ControlError as e:
                    raise BenchError(f"vhostmap stopped answering: {e}\n{proc.diagnostics()}") from None

    return check


class Bench:
    """How each scenario runs on each back-end, with one invocation's settings and working directory."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir

    # --- processes -----------------------------------------------------------------------------------------

    def paused_probe(self, *procs: Testpmd | VhostmapDaemon) -> Callable[[], float | None]:
        """A core probe (`core_probe`) made while ``procs``, the run's processes, are stopped (SIGSTOP, then
        SIGCONT whatever happens): both CPUs idle, as between runs, for the few milliseconds it takes."""

        def probe() -> float | None:
            pids = [p.pid for p in procs if p.pid is not None]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                return core_probe(self.settings)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)

        return probe

    @contextlib.contextmanager
    def daemon(
        self,
        tree: Path | None,
        ports: Sequence[str],
        links: Sequence[str] = (),
        switch: str | None = None,
        options: str = "",
    ) -> Iterator[VhostmapDaemon]:
        """A running vhostmap (this one, or the checkout ``tree``'s) polling on the back-end CPU, its control
        thread on the front-end's, ``options`` added to every port; stopped on the way out, also when it fails
        to start."""
        s = self.settings
        extra = ["--poll", "--cpu", str(s.backend_cpu), "--control-cpu", str(s.frontend_cpu)]
        if switch is not None:
            extra += ["--switch", switch]
        specs = [f"{p}=vhost-user,path={self.sock(p)}" + (f",{options}" if options else "") for p in ports]
        env = {"PYTHONPATH": str(tree / "backend")} if tree is not None else None
        daemon = VhostmapDaemon(self.workdir, specs, links, extra, env=env)
        try:
            yield daemon.start(SETUP_TIMEOUT)
        finally:
            daemon.stop()

    def testpmd(
        self,
        ports: Sequence[VirtioUserPort | VhostPort],
        mode: ForwardMode,
        size: int,
        cpu: int,
        app_args: Sequence[str] = (),
    ) -> Testpmd:
        """A testpmd with all its lcores on ``cpu`` (a context manager: entering starts it)."""
        return Testpmd(
            ports, forward_mode=mode, txpkts=size, cpu=cpu, workdir=self.workdir, app_args=app_args
        )

    def sock(self, name: str) -> Path:
        """The vhost-user socket of port ``name``."""
        return self.workdir / f"{name}.sock"

    def frontend(self, name: str, packed: bool = False) -> VirtioUserPort:
        """The front-end's port on the socket of port ``name``, asking for packed rings if ``packed``."""
        return VirtioUserPort(self.sock(name), options=PACKED_VQ if packed else ())

    def guests(self, file_mb: int) -> tcpbench.GuestPair:
        """T1's two guests on the sockets of ports a and b, both on the front-end's CPU (the module
        docstring says why), guest A serving a ``file_mb`` MiB file (a context manager: entering boots)."""
        sockets = [self.sock("a"), self.sock("b")]
        for sock in sockets:
            # QEMU connects once, at start (no reconnect): the back-end must listen before it does.
            wait_until(sock.is_socket, SETUP_TIMEOUT, f"the back-end to listen on {sock}")
        return tcpbench.GuestPair(sockets, self.workdir, cpus=[self.settings.frontend_cpu], file_mb=file_mb)

    # --- scenarios -----------------------------------------------------------------------------------------

    def run(self, scenario: str, backend: str, size: int) -> Rate:
        """One run: packets per second (and how busy vhostmap's datapath was). A vhostmap ``backend`` ending
        in BASELINE runs from the baseline checkout."""
        name, baseline, _ = backend.partition(BASELINE)
        name, packed, _ = name.partition(PACKED)
        tree = self.settings.baseline if baseline else None
        p = bool(packed)
        runner: dict[tuple[str, str], Callable[[int], Rate]] = {
            ("P1", "vhostmap"): lambda n: self.p1_vhostmap(n, tree, packed=p),
            ("P1", DPDK): lambda n: self.p1_dpdk(n, packed=p),
            ("P2", "vhostmap"): lambda n: self.p2_vhostmap(n, tree, packed=p),
            ("P2", DPDK): lambda n: self.p2_dpdk(n, packed=p),
            ("P3", "vhostmap-link"): lambda n: self.p3_vhostmap(n, tree, switch=False, packed=p),
            ("P3", "vhostmap-switch"): lambda n: self.p3_vhostmap(n, tree, switch=True, packed=p),
            ("P3", DPDK): lambda n: self.p3_dpdk(n, packed=p),
            ("G1", "vhostmap-mtu"): lambda n: self.g1_vhostmap(MTU_FRAME, tree),
            ("G1", "vhostmap-tso"): lambda n: self.g1_vhostmap(n, tree, takes=True),
            ("G1", "vhostmap-tso-completed"): lambda n: self.g1_vhostmap(n, tree),
            ("G1", DPDK): lambda n: self.p2_dpdk(MTU_FRAME, _testpmd_rx_gbit),
            ("T1", "vhostmap-link"): lambda n: self.t1_vhostmap(n, tree, switch=False),
            ("T1", "vhostmap-link" + OFFLOADS_OFF): lambda n: self.t1_vhostmap(
                n, tree, switch=False, offloads=False
            ),
            ("T1", "vhostmap-switch"): lambda n: self.t1_vhostmap(n, tree, switch=True),
            ("T1", DPDK): self.t1_dpdk,
        }
        return runner[scenario, name](size)

    def p1_vhostmap(self, size: int, tree: Path | None = None, *, packed: bool = False) -> Rate:
        """testpmd txonly into a lone vhostmap port; vhostmap's receive counter."""
        s = self.settings
        with (
            self.daemon(tree, ["a"], options=_layout(packed)) as daemon,
            self.testpmd([self.frontend("a", packed)], "txonly", size, s.frontend_cpu) as fe,
        ):
            _connected(daemon, ("a",), packed)
            fe.start()
            return measure(
                lambda: int(daemon.stats()["a"]["totals"]["rx_packets"]),
                s.seconds,
                s.warmup,
                _checker(daemon, fe),
                _datapath_idle(daemon),
                self.paused_probe(daemon, fe),
            )

    def p1_dpdk(self, size: int, *, packed: bool = False) -> Rate:
        """testpmd txonly into net_vhost rxonly; net_vhost's receive counter."""
        s = self.settings
        with (
            self.testpmd([VhostPort(self.sock("a"))], "rxonly", size, s.backend_cpu) as be,
            self.testpmd([self.frontend("a", packed)], "txonly", size, s.frontend_cpu) as fe,
        ):
            be.wait_for_link(0, SETUP_TIMEOUT)
            be.start()
            fe.start()
            return measure(
                _testpmd_rx(be), s.seconds, s.warmup, _checker(be, fe), probe=self.paused_probe(be, fe)
            )

    def p2_vhostmap(self, size: int, tree: Path | None = None, *, packed: bool = False) -> Rate:
        """A vhostmap port generating ``size``-byte frames (``generate=``) into testpmd rxonly; testpmd's
        RX."""
        s = self.settings
        with (
            self.daemon(tree, ["a"], options=f"generate={size}" + _layout(packed, ",")) as daemon,
            self.testpmd([self.frontend("a", packed)], "rxonly", size, s.frontend_cpu) as fe,
        ):
            _connected(daemon, ("a",), packed)
            fe.start()
            return measure(
                _testpmd_rx(fe),
                s.seconds,
                s.warmup,
                _checker(daemon, fe),
                _datapath_idle(daemon),
                self.paused_probe(daemon, fe),
            )

    def p2_dpdk(
        self, size: int, rx: Callable[[Testpmd], Callable[[], int]] | None = None, *, packed: bool = False
    ) -> Rate:
        """net_vhost txonly into testpmd rxonly; the front-end's receive counter (``rx``, by default its
        packets)."""
        s = self.settings
        with (
            self.testpmd([VhostPort(self.sock("a"))], "txonly", size, s.backend_cpu) as be,
            self.testpmd([self.frontend("a", packed)], "rxonly", size, s.frontend_cpu) as fe,
        ):
            be.wait_for_link(0, SETUP_TIMEOUT)
            fe.start()
            be.start()
            probe = self.paused_probe(be, fe)
            return measure((rx or _testpmd_rx)(fe), s.seconds, s.warmup, _checker(be, fe), probe=probe)

    def g1_vhostmap(self, size: int, tree: Path | None = None, *, takes: bool = False) -> Rate:
        """A vhostmap port generating ``size``-byte frames (TCP with TSO beyond the MTU) into testpmd rxonly,
        which takes TSO frames whole when ``takes``; the bytes it received, in Gbit/s."""
        s = self.settings
        with (
            self.daemon(tree, ["a"], options=f"generate={size}") as daemon,
            self.testpmd(
                [VirtioUserPort(self.sock("a"))],
                "rxonly",
                MTU_FRAME,
                s.frontend_cpu,
                app_args=[TSO_RX_OFFLOADS] if takes else [],
            ) as fe,
        ):
            daemon.wait_connected("a", SETUP_TIMEOUT)
            fe.start()
            rx, alive = _testpmd_rx_gbit(fe), _checker(daemon, fe)
            rate = measure(
                rx, s.seconds, s.warmup, alive, _datapath_idle(daemon), self.paused_probe(daemon, fe)
            )
            q = daemon.stats()["a"]["queues"][0]
            mean = q["tx_bytes"] / max(q["tx_packets"], 1)
            return replace(rate, detail=f"{q['tx_offloaded']} frames segmented, {mean:.0f} B per frame sent")

    def p3_vhostmap(self, size: int, tree: Path | None = None, *, switch: bool, packed: bool = False) -> Rate:
        """Two front-end ports io-forwarding through a vhostmap link (or switch); the front-end's RX."""
        s = self.settings
        ports = [self.frontend("a", packed), self.frontend("b", packed)]
        links, sw = ([], "sw0=a,b") if switch else (["a,b"], None)
        with (
            self.daemon(tree, ["a", "b"], links, sw, _layout(packed)) as daemon,
            self.testpmd(ports, "io", size, s.frontend_cpu) as fe,
        ):
            _connected(daemon, ("a", "b"), packed)
            fe.start(tx_first=TX_FIRST_BURSTS)
            rx, alive = _testpmd_rx(fe, (0, 1)), _checker(daemon, fe)
            rate = measure(
                rx, s.seconds, s.warmup, alive, _datapath_idle(daemon), self.paused_probe(daemon, fe)
            )
            return _circulating(fe, rate)

    def p3_dpdk(self, size: int, *, packed: bool = False) -> Rate:
        """The same front-end through testpmd io-forwarding two net_vhost ports."""
        s = self.settings
        with (
            self.testpmd(
                [VhostPort(self.sock("a")), VhostPort(self.sock("b"))], "io", size, s.backend_cpu
            ) as be,
            self.testpmd(
                [self.frontend("a", packed), self.frontend("b", packed)], "io", size, s.frontend_cpu
            ) as fe,
        ):
            be.wait_for_link(0, SETUP_TIMEOUT)
            be.wait_for_link(1, SETUP_TIMEOUT)
            be.start()
            fe.start(tx_first=TX_FIRST_BURSTS)
            probe = self.paused_probe(be, fe)
            rate = measure(_testpmd_rx(fe, (0, 1)), s.seconds, s.warmup, _checker(be, fe), probe=probe)
            return _circulating(fe, rate)

    def t1_vhostmap(
        self, file_mb: int, tree: Path | None = None, *, switch: bool, offloads: bool = True
    ) -> Rate:
        """Guest B fetches guest A's file through a vhostmap link (or switch), the ports' offloads on or
        off; Mbit/s of file in guest B's wget time."""
        s = self.settings
        with (
            self.daemon(
                tree,
                ["a", "b"],
                [] if switch else ["a,b"],
                "sw0=a,b" if switch else None,
                "" if offloads else "offloads=off",
            ) as daemon,
            self.guests(file_mb) as pair,
        ):

            def sent_by_a() -> tuple[int, int]:
                totals = daemon.stats()["a"]["totals"]
                return int(totals["rx_packets"]), int(totals["rx_bytes"])

            def dropped() -> int:
                ports = daemon.stats().values()
                return sum(int(p["totals"]["rx_dropped"]) + int(p["totals"]["tx_dropped"]) for p in ports)

            got = tcpbench.measure(
                pair, s.seconds, s.warmup, _checker(daemon), _datapath_idle(daemon), sent_by_a, dropped
            )
            return _guest_rate(got)

    def t1_dpdk(self, file_mb: int) -> Rate:
        """The same guests through testpmd io-forwarding two net_vhost ports with TSO (``tso=1``)."""
        s = self.settings
        ports = [VhostPort(self.sock(n), options=("tso=1",)) for n in ("a", "b")]
        with self.testpmd(ports, "io", 64, s.backend_cpu) as be:
            be.start()  # forwarding before the guests come: their first frames find it running
            with self.guests(file_mb) as pair:

                def sent_by_a() -> tuple[int, int]:
                    port = be.stats()[0]
                    return port.rx_packets, port.rx_bytes

                def dropped() -> int:
                    # io mode frees what a port's transmit refused (the guest's receive ring was full).
                    return sum(rx + tx for rx, tx in be.forward_drops().values())

                got = tcpbench.measure(pair, s.seconds, s.warmup, _checker(be), None, sent_by_a, dropped)
                return _guest_rate(got)


def _guest_rate(got: tcpbench.Throughput) -> Rate:
    """T1's measurement as a run's Rate (Mbit/s), with what the progress line says about it."""
    detail = (
        f"{got.fetches} fetch{'es' if got.fetches > 1 else ''}, {got.guest_seconds:.2f} s in guest B"
        f" ({got.host_seconds:.2f} s host-side)"
    )
    if got.frame_bytes is not None:
        detail += f", mean frame from A {got.frame_bytes:.0f} B"
    if got.dropped is not None:
        detail += f", {got.dropped} dropped"
    return Rate(
        got.mbit_s,
        busy=got.busy,
        frame_bytes=got.frame_bytes,
        dropped=got.dropped,
        md5=got.md5,
        detail=detail,
    )


# --- the whole invocation ----------------------------------------------------------------------------------


def run_all(settings: Settings, workdir: Path, results: list[Series]) -> None:
    """Every scenario, size and round, appending to ``results`` as runs finish (so that an interrupted
    benchmark still has what it measured)."""
    bench = Bench(settings, workdir)

    def probe() -> float | None:
        return core_probe(settings)

    for scenario in settings.only:
        for size in settings.sizes_of(scenario):
            names = backends(scenario, settings.baseline is not None, settings.layouts)
            series = {b: Series(scenario, size, b) for b in names}
            results += series.values()
            for round_ in range(1, settings.runs + 1):
                for backend, ser in series.items():
                    label = (
                        f"{scenario} {SCENARIOS[scenario]} {size_label(scenario, size)}, {backend}, "
                        f"run {round_}/{settings.runs}"
                    )
                    before = probe()
                    try:
                        rate = bench.run(scenario, backend, size)
                    except (RuntimeError, OSError, ControlError) as e:
                        # BenchError, TestpmdError, GuestError, TransferCorrupt, a daemon that would not
                        # start; WaitTimeout is an OSError.
                        ser.record(None, f"run {round_}: {e}", CoreProbes(before, probe()))
                        say(f"{label}: FAILED: {e}")
                        continue
                    cores = CoreProbes(before, probe())
                    ser.record(rate, cores=cores)
                    extra = [rate.detail] if rate.detail else []
                    if rate.busy is not None:
                        extra.append(f"datapath busy {rate.busy:.0%}")
                    if rate.per_round is not None:
                        extra.append(f"{rate.per_round:.1f} frames per round")
                    if rate.circulating is not None:
                        extra.append(f"{rate.circulating} frames circulating")
                    extra.append(f"cores {cores} ns")
                    if rate.windows:
                        extra.append("windows " + " ".join(str(w) for w in rate.windows))
                    shown = f" ({', '.join(extra)})" if extra else ""
                    say(f"{label}: {_format(rate.value, ser.unit)} {ser.unit}{shown}")


def core_probe(settings: Settings) -> float | None:
    """The round trip between the front-end's and the back-end's CPUs (None: the probe failed, said why)."""
    try:
        return corelatency.median_round_trip_ns(settings.frontend_cpu, settings.backend_cpu)
    except OSError as e:
        say(f"core probe failed: {e}")
        return None


def size_label(scenario: str, size: int) -> str:
    """A size as the scenario means it: a frame's bytes, or T1's file MiB."""
    return f"{size} MiB" if scenario == "T1" else f"{size} B"


def _format(value: float, unit: str, width: int = 0) -> str:
    """A rate with the decimals its unit needs: Mpps to the thousandth, Gbit/s to the hundredth, Mbit/s to
    the tenth."""
    return f"{value:{width}.{ {'Mbit/s': 1, 'Gbit/s': 2}.get(unit, 3) }f}"


def backends(scenario: str, baseline: bool, layouts: Sequence[str] = ("split",)) -> list[str]:
    """The back-ends one round of ``scenario`` runs, in order: for each of ``layouts`` (P1-P3 only), every
    back-end of the scenario, DPDK's last; with ``baseline``, each vhostmap one twice in a row, this
    checkout's and the baseline's."""
    suffixes = [PACKED if layout == "packed" else "" for layout in layouts]
    if scenario not in LAYOUT_SCENARIOS:
        suffixes = [""]
    order = []
    for suffix in suffixes:
        for b in BACKENDS[scenario]:
            order.append(b + suffix)
            if baseline and b != DPDK:
                order.append(b + suffix + BASELINE)
    return order


def is_dpdk(backend: str) -> bool:
    """Whether ``backend`` is DPDK's (over either layout)."""
    return backend.partition(PACKED)[0] == DPDK


def dpdk_of(backend: str) -> str:
    """The DPDK back-end a vhostmap one is compared with: DPDK's over the same virtqueue layout."""
    return DPDK + PACKED if PACKED in backend else DPDK


Key = tuple[str, int, str]  # a series: scenario, size, back-end


def _dpdk_twin(s: Series) -> Key:
    """The DPDK series a vhostmap series is compared with: the same scenario, size and layout."""
    return s.scenario, s.size, dpdk_of(s.backend)


def _baseline_twin(s: Series) -> Key:
    """The series of the same back-end run from the baseline checkout."""
    return s.scenario, s.size, s.backend + BASELINE


def _with_reference(
    results: Sequence[Series], reference: Callable[[Series], Key]
) -> Iterator[tuple[Key, Series, Series]]:
    """Each vhostmap series whose reference series (the key ``reference`` names) was measured, with its key
    and that reference."""
    by_key = {(s.scenario, s.size, s.backend): s for s in results}
    for s in results:
        ref = by_key.get(reference(s))
        if not is_dpdk(s.backend) and ref is not None:
            yield (s.scenario, s.size, s.backend), s, ref


def _ratios_to(results: Sequence[Series], reference: Callable[[Series], Key]) -> dict[Key, list[float]]:
    """For each vhostmap series whose reference series (the key ``reference`` names) was measured: its rate
    over the reference's in the same round, for each round both measured."""
    return {
        key: [v / r for v, r in zip(s.rates, ref.rates, strict=False) if v is not None and r]
        for key, s, ref in _with_reference(results, reference)
    }


def baseline_ratios(results: Sequence[Series]) -> dict[Key, list[float]]:
    """For each vhostmap series with a baseline twin: its rate over the twin's, per round both measured."""
    return _ratios_to(results, _baseline_twin)


def offload_ratios(results: Sequence[Series]) -> dict[Key, list[float]]:
    """For each vhostmap series with an ``offloads=off`` twin (T1's link, and its baseline's): its rate over
    the twin's, per round both measured."""

    def twin(s: Series) -> Key:
        name, at, baseline = s.backend.partition(BASELINE)
        return s.scenario, s.size, name + OFFLOADS_OFF + at + baseline

    return _ratios_to(results, twin)


def round_ratios(results: Sequence[Series]) -> dict[Key, list[float]]:
    """For each vhostmap series: its rate over DPDK's in the same round, for each round both measured."""
    return _ratios_to(results, _dpdk_twin)


def ratios(results: Sequence[Series]) -> dict[Key, float | None]:
    """For each vhostmap series: the median over rounds of its rate over DPDK's in the same round."""
    return {key: statistics.median(r) if r else None for key, r in round_ratios(results).items()}


def probes_agree(probes: Sequence[float | None], factor: float = CORE_MATCH_FACTOR) -> bool:
    """Whether every one of ``probes`` was measured and the largest is at most ``factor`` times the smallest:
    the runs around them were made at one distance between the CPUs."""
    measured = [p for p in probes if p is not None]
    if not measured or len(measured) < len(probes):
        return False
    return max(measured) <= factor * min(measured)


def core_range(s: Series) -> tuple[float, float] | None:
    """The smallest and the largest core probe around ``s``'s runs; None if none was measured."""
    probes = [p for c in s.cores for p in (c.before, c.after) if p is not None]
    return (min(probes), max(probes)) if probes else None


@dataclass(frozen=True)
class Matched:
    """A vhostmap series' ratios to DPDK in the rounds whose four core probes agree (`probes_agree`)."""

    rounds: list[int]  # the matched rounds, from 1
    ratios: list[float]  # vhostmap's rate over DPDK's in each of them
    pairs: int  # the rounds in which both back-ends were measured, matched or not

    @property
    def median(self) -> float | None:
        """The median ratio over the matched rounds; None when none matched."""
        return statistics.median(self.ratios) if self.ratios else None

    def line(self, head: str, note: str = "") -> str:
        """A table line: ``head``, the matched count and ``note``, then the median and each matched round's
        ratio."""
        head = f"{'':<22}  {head} {len(self.ratios)}/{self.pairs}{note}"
        if self.median is None:
            return f"{head}: n/a"
        which = ",".join(str(n) for n in self.rounds)
        shown = " ".join(f"{r:.2f}" for r in self.ratios)
        return f"{head}: {self.median:.3f}x median, rounds {which}: {shown}"


def _matched_to(
    results: Sequence[Series], reference: Callable[[Series], Key], factor: float
) -> dict[Key, Matched]:
    """For each vhostmap series whose reference series (the key ``reference`` names) was measured: its rate
    over the reference's in the rounds both measured whose four core probes (before and after each one's run)
    are within ``factor`` of one another."""
    out: dict[Key, Matched] = {}
    for key, s, ref in _with_reference(results, reference):
        rounds, each, pairs = [], [], 0
        for i, (v, r) in enumerate(zip(s.rates, ref.rates, strict=False)):
            if v is None or not r:
                continue
            pairs += 1
            if i >= min(len(s.cores), len(ref.cores)):
                continue  # not probed
            ours, theirs = s.cores[i], ref.cores[i]
            if probes_agree([ours.before, ours.after, theirs.before, theirs.after], factor):
                rounds.append(i + 1)
                each.append(v / r)
        out[key] = Matched(rounds, each, pairs)
    return out


def matched_ratios(results: Sequence[Series], factor: float = CORE_MATCH_FACTOR) -> dict[Key, Matched]:
    """For each vhostmap series with a DPDK series: its rate over DPDK's in the rounds both measured whose
    four core probes agree (`probes_agree` with ``factor``)."""
    return _matched_to(results, _dpdk_twin, factor)


def matched_baseline_ratios(
    results: Sequence[Series], factor: float = CORE_MATCH_FACTOR
) -> dict[Key, Matched]:
    """For each vhostmap series with a baseline twin: its rate over the twin's in the rounds both measured
    whose four core probes agree (`probes_agree` with ``factor``)."""
    return _matched_to(results, _baseline_twin, factor)


@dataclass(frozen=True)
class CoreStates:
    """Where an invocation's core probes split into a near and a far state: every probe up to ``near_max``
    is near, every one from ``far_min`` far (the largest gap between neighbours among them all)."""

    near_max: float
    far_min: float

    def of(self, probes: CoreProbes) -> str | None:
        """ "near" or "far" when both probes around a run were measured and lie in that state; None when
        either failed or the machine moved between them."""
        if probes.before is None or probes.after is None:
            return None
        near = [p <= self.near_max for p in (probes.before, probes.after)]
        return "near" if all(near) else "far" if not any(near) else None


def core_states(results: Sequence[Series], gap: float = CORE_STATE_GAP) -> CoreStates | None:
    """The near and far states of the probes of all ``results``, when they split into two by a gap of at
    least ``gap`` (the largest such gap between sorted neighbours); None when they form one group."""
    probes = sorted(
        {
            p
            for s in results
            for c in [*s.cores, *(w.cores for ws in s.windows for w in ws)]
            for p in (c.before, c.after)
            if p is not None
        }
    )
    gaps = [(hi / lo, lo, hi) for lo, hi in itertools.pairwise(probes) if lo > 0]
    if not gaps:
        return None
    widest, lo, hi = max(gaps)
    return CoreStates(lo, hi) if widest >= gap else None


@dataclass(frozen=True)
class StateRatio:
    """A vhostmap series' samples (`Series.samples`: windows of runs, or runs without) made in one core state
    against its reference's samples in that state, whichever round they were in: the median rate of each and
    how many samples each median is of."""

    state: str
    ours: float
    theirs: float
    samples: tuple[int, int]

    @property
    def ratio(self) -> float:
        """Our median over the reference's."""
        return self.ours / self.theirs


def _by_state_to(
    results: Sequence[Series], reference: Callable[[Series], Key]
) -> dict[Key, list[StateRatio]]:
    """For each vhostmap series whose reference series was measured: per core state (`core_states`) in
    which both have runs, the median rate of each over its runs in that state."""
    states = core_states(results)
    if states is None:
        return {}

    def in_state(s: Series, state: str) -> list[float]:
        return [v for v, c in s.samples() if states.of(c) == state]

    out: dict[Key, list[StateRatio]] = {}
    for key, s, ref in _with_reference(results, reference):
        each = []
        for state in ("near", "far"):
            ours, theirs = in_state(s, state), in_state(ref, state)
            if ours and theirs and statistics.median(theirs):
                each.append(
                    StateRatio(
                        state, statistics.median(ours), statistics.median(theirs), (len(ours), len(theirs))
                    )
                )
        out[key] = each
    return out


def state_ratios(results: Sequence[Series]) -> dict[Key, list[StateRatio]]:
    """For each vhostmap series with a DPDK series: per core state, its median rate over DPDK's."""
    return _by_state_to(results, _dpdk_twin)


def state_baseline_ratios(results: Sequence[Series]) -> dict[Key, list[StateRatio]]:
    """For each vhostmap series with a baseline twin: per core state, its median rate over the twin's."""
    return _by_state_to(results, _baseline_twin)


def _state_line(head: str, each: Sequence[StateRatio], states: CoreStates) -> str:
    """A table line: per core state, our median against the reference's, their ratio and their samples."""
    bounds = {"near": f"<={states.near_max:.0f} ns", "far": f">={states.far_min:.0f} ns"}
    shown = "; ".join(
        f"{r.state} ({bounds[r.state]}) {r.ours:.3f} against {r.theirs:.3f} = {r.ratio:.3f}x "
        f"({r.samples[0]} and {r.samples[1]} samples)"
        for r in each
    )
    return f"{'':<22}  {head}: {shown}"


@dataclass(frozen=True)
class Comparisons:
    """What the table and the JSON say of every vhostmap series against its references, computed once."""

    ratio: dict[Key, float | None]  # `ratios`
    rounds: dict[Key, list[float]]  # `round_ratios`
    against: dict[Key, list[float]]  # `baseline_ratios`
    offloads: dict[Key, list[float]]  # `offload_ratios`
    matched: dict[Key, Matched]  # `matched_ratios`
    matched_against: dict[Key, Matched]  # `matched_baseline_ratios`
    states: CoreStates | None  # `core_states`
    by_state: dict[Key, list[StateRatio]]  # `state_ratios`
    by_state_against: dict[Key, list[StateRatio]]  # `state_baseline_ratios`

    @classmethod
    def of(cls, results: Sequence[Series]) -> Comparisons:
        """Every comparison of ``results``."""
        return cls(
            ratios(results),
            round_ratios(results),
            baseline_ratios(results),
            offload_ratios(results),
            matched_ratios(results),
            matched_baseline_ratios(results),
            core_states(results),
            state_ratios(results),
            state_baseline_ratios(results),
        )


def table(results: Sequence[Series], runs: int) -> str:
    """The results as a text table: rates per run (Mpps; T1 Mbit/s, under a header of its own), median,
    the median vhostmap/DPDK ratio and the range of the rounds' ratios (how much this machine's noise
    moved them); under each row the core probes around its runs, and under a vhostmap row the median ratio
    over the rounds whose probes matched."""
    c = Comparisons.of(results)
    ratio, rounds, against, offloads = c.ratio, c.rounds, c.against, c.offloads
    matched, matched_against = c.matched, c.matched_against
    states, by_state, by_state_against = c.states, c.by_state, c.by_state_against
    width = max(7 * runs, 14)
    lines: list[str] = []
    unit = None
    bw = 16
    for s in results:
        if s.unit != unit:  # a header for each unit's rows, their back-end column as wide as they need
            unit = s.unit
            bw = max([16, *(len(r.backend) for r in results if r.unit == unit)])
            size_head, rates_head = "file" if s.scenario == "T1" else "size", f"{unit} per run"
            head = f"{'scenario':<14} {size_head:>5}  {'backend':<{bw}} {rates_head:<{width}} {'median':>7}"
            lines += [""] if lines else []
            lines.append(f"{head}  vhostmap/DPDK  rounds")
        per_run = " ".join(_format(m, unit, 6) if m is not None else f"{'n/a':>6}" for m in s.rates)
        median = _format(s.median, unit, 7) if s.median is not None else f"{'n/a':>7}"
        key = (s.scenario, s.size, s.backend)
        r, each = ratio.get(key), rounds.get(key, [])
        rtext = "" if is_dpdk(s.backend) else f"{r:13.3f}" if r is not None else f"{'n/a':>13}"
        if len(each) > 1:
            rtext += f"  {min(each):.2f}-{max(each):.2f}"
        name = f"{s.scenario} {SCENARIOS[s.scenario]}"
        size = f"{s.size}M" if s.scenario == "T1" else str(s.size)
        lines.append(f"{name:<14} {size:>5}  {s.backend:<{bw}} {per_run:<{width}} {median}  {rtext}".rstrip())
        if any(b is not None for b in s.busy):
            shown = " ".join(f"{b:.0%}" if b is not None else "n/a" for b in s.busy)
            lines.append(f"{'':<22}  datapath busy per run: {shown}")
        if any(r is not None for r in s.per_round):
            shown = " ".join(f"{r:.1f}" if r is not None else "n/a" for r in s.per_round)
            lines.append(f"{'':<22}  frames per datapath round: {shown}")
        if any(f is not None for f in s.frame_bytes):
            shown = " ".join(f"{f:.0f}" if f is not None else "n/a" for f in s.frame_bytes)
            lines.append(f"{'':<22}  mean frame from guest A per run (bytes): {shown}")
        if any(d is not None for d in s.dropped):
            shown = " ".join(str(d) if d is not None else "n/a" for d in s.dropped)
            lines.append(f"{'':<22}  frames the back-end dropped per run: {shown}")
        if any(c is not None for c in s.circulating):
            shown = " ".join(str(c) if c is not None else "n/a" for c in s.circulating)
            lines.append(f"{'':<22}  frames circulating per run: {shown}")
        span = core_range(s)
        if span is not None:
            shown = " ".join(str(c) for c in s.cores)
            lines.append(
                f"{'':<22}  core round trip per run (ns, before/after): {shown}, "
                f"range {span[0]:.0f}-{span[1]:.0f}"
            )
            m = matched.get(key)
            if m is not None and m.pairs:
                lines.append(m.line("matched", f" (core probes within {CORE_MATCH_FACTOR}x)"))
            if states is not None and by_state.get(key):
                lines.append(_state_line("by core state, to DPDK", by_state[key], states))
        if offloads.get(key):
            each = offloads[key]
            lines.append(
                f"{'':<22}  over offloads=off: {statistics.median(each):.3f}x median, per round "
                + " ".join(f"{r:.2f}" for r in each)
            )
        if against.get(key):
            each = against[key]
            lines.append(
                f"{'':<22}  over the baseline: {statistics.median(each):.3f}x median, per round "
                + " ".join(f"{r:.2f}" for r in each)
            )
            m = matched_against.get(key)
            if m is not None and m.pairs and span is not None:
                lines.append(m.line("over the baseline, matched"))
            if states is not None and by_state_against.get(key):
                lines.append(_state_line("over the baseline by core state", by_state_against[key], states))
        for note in dict.fromkeys(s.notes):
            if "\n" not in note:
                lines.append(f"{'':<22}  note: {note}")
    return "\n".join(lines)


# The JSON keys of a series' rates and their median, by unit.
_RATE_KEYS = {
    "Mpps": ("mpps", "median_mpps"),
    "Gbit/s": ("gbit_s", "median_gbit_s"),
    "Mbit/s": ("mbit_s", "median_mbit_s"),
}


def builds() -> dict[str, str | None]:
    """What each back-end was compiled for, a condition of the comparison: vhostmap's kernels (the widest
    vector instruction set, datapath/build.py's -march) and DPDK's libraries (RTE_MACHINE; None when no
    build configuration is installed)."""
    return {"vhostmap": ffi.string(lib.vhu_build_isa()).decode(), "dpdk": build_machine()}


def report(settings: Settings, results: Sequence[Series], interrupted: bool) -> dict[str, Any]:
    """Everything measured, for the JSON file."""
    c = Comparisons.of(results)
    ratio, rounds, against, offloads = c.ratio, c.rounds, c.against, c.offloads
    matched, matched_against = c.matched, c.matched_against
    states, by_state, by_state_against = c.states, c.by_state, c.by_state_against

    def by_state_entry(each: Sequence[StateRatio]) -> dict[str, Any]:
        return {
            r.state: {
                "median": r.ours,
                "reference_median": r.theirs,
                "ratio": r.ratio,
                "samples": list(r.samples),
            }
            for r in each
        }

    def entry(s: Series) -> dict[str, Any]:
        key = (s.scenario, s.size, s.backend)
        rates, median = _RATE_KEYS[s.unit]
        out: dict[str, Any] = {
            "scenario": s.scenario,
            "name": SCENARIOS[s.scenario],
            "size": s.size,
            "unit": s.unit,
            "backend": s.backend,
            rates: s.rates,
            median: s.median,
            "ratio_to_dpdk": ratio.get(key),
            "round_ratios": rounds.get(key),
            "datapath_busy": None if is_dpdk(s.backend) else s.busy,
            "frames_per_round": None if is_dpdk(s.backend) else s.per_round,
            "circulating": s.circulating if any(c is not None for c in s.circulating) else None,
            "baseline_round_ratios": against.get(key),
            "core_round_trip_ns": [{"before": c.before, "after": c.after} for c in s.cores],
            "windows": [
                [{"rate": w.rate, "before": w.cores.before, "after": w.cores.after} for w in ws]
                for ws in s.windows
            ],
            "notes": s.notes,
        }
        m = matched.get(key)
        if m is not None:
            out["matched_rounds"] = m.rounds
            out["matched_round_ratios"] = m.ratios
            out["matched_ratio_to_dpdk"] = m.median
        m = matched_against.get(key)
        if m is not None:
            out["matched_baseline_rounds"] = m.rounds
            out["matched_baseline_round_ratios"] = m.ratios
            out["matched_ratio_to_baseline"] = m.median
        if key in by_state:
            out["state_ratios_to_dpdk"] = by_state_entry(by_state[key])
        if key in by_state_against:
            out["state_ratios_to_baseline"] = by_state_entry(by_state_against[key])
        if s.scenario == "T1":
            out["file_mib"] = s.size
            out["frame_bytes"] = s.frame_bytes
            out["dropped"] = s.dropped
            out["md5"] = [list(m) if m else None for m in s.md5]
            out["offload_round_ratios"] = offloads.get(key)
        return out

    return {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": list(os.getloadavg()),
            "python": platform.python_version(),
            "builds": builds(),
        },
        "core_probe": {
            "cpus": [settings.frontend_cpu, settings.backend_cpu],
            "samples": corelatency.SAMPLES,
            "round_trips": corelatency.ROUND_TRIPS,
            "match_factor": CORE_MATCH_FACTOR,
            "states": None if states is None else {"near_max": states.near_max, "far_min": states.far_min},
        },
        "interrupted": interrupted,
        "results": [entry(s) for s in results],
    }


def chart(results: Sequence[Series], path: Path) -> bool:
    """A bar chart of the medians (runs as dots, vhostmap/DPDK ratios above the bars) per scenario and
    size, one panel per unit; False when matplotlib is missing."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")  # no display: draw into the file
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    ratio = ratios(results)
    units = list(dict.fromkeys(s.unit for s in results))
    backends = sorted({s.backend for s in results}, key=lambda b: (is_dpdk(b), b))
    color = {b: f"C{i}" for i, b in enumerate(backends)}
    groups_of = {u: list(dict.fromkeys((s.scenario, s.size) for s in results if s.unit == u)) for u in units}
    fig, axes = plt.subplots(
        1,
        len(units),
        figsize=(max(6.0, 1.7 * sum(len(g) for g in groups_of.values())), 5.5),
        width_ratios=[max(len(groups_of[u]), 1) for u in units],
        squeeze=False,
    )
    for ax, unit in zip(axes[0], units, strict=True):
        groups = groups_of[unit]
        labelled: set[str] = set()  # each panel's legend names the back-ends in it
        for g, key in enumerate(groups):
            present = sorted(
                (s for s in results if (s.scenario, s.size) == key and s.median is not None),
                key=lambda s: backends.index(s.backend),
            )
            width = 0.8 / max(len(present), 1)
            for i, s in enumerate(present):
                assert s.median is not None
                x = g - 0.4 + width * (i + 0.5)
                label = None if s.backend in labelled else s.backend
                labelled.add(s.backend)
                ax.bar(x, s.median, width, color=color[s.backend], label=label)
                runs = [m for m in s.rates if m is not None]
                ax.plot([x] * len(runs), runs, "k.", markersize=3)
                r = ratio.get((s.scenario, s.size, s.backend))
                if r is not None:
                    ax.annotate(f"{r:.2f}x", (x, max(runs)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{sc} {SCENARIOS[sc]}\n{size_label(sc, size)}" for sc, size in groups])
        ax.set_ylabel(f"{unit} (bars: median, dots: runs)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: bars stay visible
    fig.suptitle("vhostmap vs DPDK vhost (testpmd), one back-end core; ratios to DPDK", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _parse_list(text: str, what: str, convert: Callable[[str], Any]) -> tuple[Any, ...]:
    try:
        values = tuple(convert(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad {what} list {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return values


def _scenarios(text: str) -> tuple[str, ...]:
    names = _parse_list(text.upper(), "scenario", str)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]} (known: {', '.join(SCENARIOS)})")
    return names


def _layouts(text: str) -> tuple[str, ...]:
    names = _parse_list(text, "layout", str)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layout {unknown[0]} (known: {', '.join(LAYOUTS)})")
    return names


def _sizes(text: str) -> tuple[int, ...]:
    sizes: tuple[int, ...] = _parse_list(text, "size", int)
    for size in sizes:
        if not 60 <= size <= 1514:
            raise argparse.ArgumentTypeError(f"frame size {size} is not 60..1514")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/bench`` command line."""
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="vhostmap against DPDK's vhost back-end: P1 dequeue, P2 enqueue, P3 forwarding, "
        "and (only when named) G1 TSO enqueue and T1 guest-to-guest TCP",
    )
    p.add_argument("--runs", type=int, default=3, help="runs of each back-end, alternating (default 3)")
    p.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="measured seconds per run (default 5; T1: the file is fetched until its transfers add up to it)",
    )
    p.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of traffic before measuring (default 1)"
    )
    p.add_argument(
        "--sizes", type=_sizes, default=(64, 1500), help="frame sizes, e.g. 64,1500 (the default; not T1)"
    )
    p.add_argument(
        "--only",
        type=_scenarios,
        default=DEFAULT_SCENARIOS,
        help="scenarios, e.g. P1,P3, G1 or T1 (default P1,P2,P3: G1 and T1, which boots guests, minutes per "
        "round, run only when named)",
    )
    p.add_argument(
        "--file-mb",
        type=int,
        default=64,
        help="T1: MiB of the file guest B fetches from guest A (default 64, at most 1024)",
    )
    p.add_argument(
        "--layouts",
        type=_layouts,
        default=("split",),
        help="virtqueue layouts of P1-P3, e.g. split,packed (default split): each back-end runs over each, "
        "vhostmap's over packed rings compared with DPDK's over packed rings",
    )
    p.add_argument("--backend-cpu", type=int, default=1, help="CPU of vhostmap's datapath / DPDK's back-end")
    p.add_argument(
        "--frontend-cpu", type=int, default=0, help="CPU of the testpmd front-end, or of both T1 guests"
    )
    p.add_argument("--json-out", type=Path, default=Path("bench-results/bench.json"), help="results file")
    p.add_argument("--png", type=Path, default=Path("bench-results/bench.png"), help="chart file")
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of the commit to compare with, its kernels built) whose "
        "vhostmap runs too, alternating with this one's in every round",
    )
    return p


def cpu_busy(interval: float = 0.5) -> float:
    """The fraction of the machine's CPU time spent on something else than idling over ``interval``."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # everything; idle + iowait

    total0, idle0 = sample()
    time.sleep(interval)  # the observation window itself
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM cleans up like Ctrl-C: the context managers of the running round stop their processes.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/bench``; 0 when every run was measured (or could not run: n/a)."""
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0 or not 1 <= args.file_mb <= 1024:
        print(
            "bench: --runs must be at least 1, --seconds positive, --warmup not negative, --file-mb 1..1024",
            file=sys.stderr,
        )
        return 2
    try:
        for cpu, what in ((args.backend_cpu, "--backend-cpu"), (args.frontend_cpu, "--frontend-cpu")):
            check_cpu(cpu, what)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if shutil.which("dpdk-testpmd") is None:
        print("bench: dpdk-testpmd is not installed (scripts/setup installs it)", file=sys.stderr)
        return 2
    if "T1" in args.only:
        try:
            GuestKernel.from_cache()
        except GuestKernelMissing as e:
            print(f"bench: T1 needs the lab's guest: {e}", file=sys.stderr)
            return 2
    settings = Settings(
        runs=args.runs,
        seconds=args.seconds,
        warmup=args.warmup,
        sizes=args.sizes,
        only=args.only,
        backend_cpu=args.backend_cpu,
        frontend_cpu=args.frontend_cpu,
        baseline=args.baseline.resolve() if args.baseline else None,
        file_mb=args.file_mb,
        layouts=args.layouts,
    )
    if settings.baseline is not None and not any(
        (settings.baseline / "backend/vhostmap/datapath").glob("_kernels*.so")
    ):
        print(
            f"bench: {settings.baseline} is not a vhostmap checkout with its kernels built", file=sys.stderr
        )
        return 2
    busy = cpu_busy()
    if busy > 0.2:
        say(f"the CPUs are {busy:.0%} busy before starting: expect low and noisy numbers")
    built = builds()
    say(f"built for: vhostmap's kernels {built['vhostmap']}, DPDK {built['dpdk'] or 'unknown'}")
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C must stop the benchmark with its testpmds, even when it was started from the background of a
    # script, which leaves SIGINT ignored: the testpmds (DPDK installs its own handler) died on an interrupt
    # while the benchmark, ignoring it, went on to the next run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: list[Series] = []
    interrupted = False
    workdir = Path(tempfile.mkdtemp(prefix="vhm-b", dir="/tmp"))  # short: socket paths
    try:
        run_all(settings, workdir, results)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: every process stopped; reporting what was measured")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results, settings.runs))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report(settings, results, interrupted), indent=2) + "\n")
    say(f"results in {args.json_out}")
    if any(s.median is not None for s in results):
        if chart(results, args.png):
            say(f"chart in {args.png}")
        else:
            say("no chart: matplotlib is missing (pip install -e '.[bench]')")
    if interrupted:
        return 130
    failed = any(
        m is None and not any(n.startswith("n/a") for n in s.notes) for s in results for m in s.rates
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

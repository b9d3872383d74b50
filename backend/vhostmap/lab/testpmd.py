"""dpdk-testpmd as a lab peer: a vhost-user front-end (net_virtio_user) or DPDK's own back-end (net_vhost).

`Testpmd` runs one interactive testpmd and talks to it on stdin/stdout: commands are written as lines, and a
command's output is everything up to the next ``testpmd> `` prompt. stdout goes through ``stdbuf -oL``
because testpmd prints with stdio, which a pipe would otherwise buffer until exit. Counters come from
``show port stats all`` (the ethdev counters, cumulative since the port started) and, at ``stop``, from
testpmd's forward statistics (which add the drops).

Exact packet counts: testpmd's txonly mode cannot stop after N packets (``--tx-first`` only exists
non-interactively and only adds one burst). Two exact ways instead, both used by the tests:
  * ``start(tx_first=N)`` in io mode on a front-end whose peer sends nothing back: testpmd transmits exactly
    N bursts of ``burst`` packets, then io-forwards nothing;
  * txonly for a while, then ``stop()``: the front-end's final TX count is exactly what entered the
    virtqueue, and the back-end keeps polling, so ``wait_for_packets(that count)`` on the back-end, before
    stopping it, ends with both sides equal.
Every instance gets its own ``--file-prefix`` (``vhm<pid>t<n>``); its hugepage files and runtime directory are
removed when it is closed (``--huge-unlink`` cannot be combined with the ``--single-file-segments``
virtio-user needs), and those of lab processes that died without closing are swept at the next start.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal, Self

from vhostmap.lab.process import ChildProcess
from vhostmap.lab.wait import WaitTimeout, tail, wait_until

TESTPMD = "dpdk-testpmd"
# DPDK's build configuration (its -march: RTE_MACHINE), where the Debian packages put it.
BUILD_CONFIGS = ("/usr/include/*/dpdk/rte_build_config.h", "/usr/include/dpdk/rte_build_config.h")
HUGEPAGES = Path("/dev/hugepages")
DPDK_RUNTIME = Path("/var/run/dpdk")
PROMPT = b"testpmd> "
# The packets of a burst without ``--burst`` (DEFAULT_PKT_BURST, app/test-pmd/testpmd.h): a tx_first burst.
DEFAULT_BURST = 32
# What testpmd's other threads print while the command line prints a prompt or a reply: ethdev events
# (printf'd with a leading newline) and DPDK log lines of the vhost and virtio-user PMDs. Each comes as one
# whole write, but the prompt is written a character at a time, so one can land inside "testpmd> " (seen:
# "te" + a reconnect log line + a link event + "stpmd> "). The function-name prefixes anchor a log line's
# start, so the prompt's own letters in front of it are never taken for part of its name.
_ASYNC_LINE = re.compile(
    rb"\n?Port \d+: [^\n]* event\n"
    rb"|(?:virtio|vhost|eth_vhost|rte_vhost)\w*\(\): [^\n]*\n"
    rb"|VHOST_(?:CONFIG|DATA): [^\n]*\n"
)
ForwardMode = Literal["io", "mac", "macswap", "rxonly", "txonly", "icmpecho", "flowgen", "5tswap", "csum"]

_ids = itertools.count()


class TestpmdError(RuntimeError):
    """testpmd failed to start, exited, or did not answer; the message ends with its log's tail."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class VirtioUserPort:
    """A net_virtio_user port: testpmd as a vhost-user front-end (the guest's side) on ``path``.

    By default it connects to a listening back-end; ``server=True`` makes it listen instead.
    """

    path: str | Path
    queues: int = 1
    server: bool = False
    mac: str | None = None
    queue_size: int | None = None
    options: tuple[str, ...] = ()

    def vdev(self, index: int) -> str:
        """The ``--vdev`` argument for this port as the ``index``-th port of its kind."""
        args = [f"net_virtio_user{index}", f"path={self.path}", f"queues={self.queues}"]
        if self.server:
            args.append("server=1")
        if self.mac:
            args.append(f"mac={self.mac}")
        if self.queue_size:
            args.append(f"queue_size={self.queue_size}")
        return ",".join([*args, *self.options])

    @property
    def creates_socket(self) -> bool:
        """Whether testpmd itself creates (listens on) the socket file."""
        return self.server


@dataclass(frozen=True)
class VhostPort:
    """A net_vhost port: DPDK's vhost library as the back-end on ``path`` (listening unless ``client``)."""

    path: str | Path
    queues: int = 1
    client: bool = False
    options: tuple[str, ...] = ()

    def vdev(self, index: int) -> str:
        """The ``--vdev`` argument for this port as the ``index``-th port of its kind."""
        args = [f"net_vhost{index}", f"iface={self.path}", f"queues={self.queues}"]
        if self.client:
            args.append("client=1")
        return ",".join([*args, *self.options])

    @property
    def creates_socket(self) -> bool:
        """Whether testpmd itself creates (listens on) the socket file."""
        return not self.client


PortSpec = VirtioUserPort | VhostPort


@dataclass(frozen=True)
class PortStats:
    """One port's counters: ethdev counters from ``show port stats``, plus testpmd's forward-engine drops.

    ``rx_missed`` is what the device dropped for lack of room; ``tx_dropped`` is what the forward engine
    offered and the PMD refused (a full ring), known only after `Testpmd.stop` (else 0).
    """

    port: int
    rx_packets: int
    rx_bytes: int
    rx_missed: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    rx_dropped: int = 0
    tx_dropped: int = 0


# A block runs from its "#### NIC statistics for port N ####" title to the closing rule of the same character.
_NIC_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+\n(.*?)#{20,}", re.S)
_FWD_BLOCK = re.compile(r"Forward statistics for port (\d+)\s*-+\n(.*?)-{20,}", re.S)


def build_machine(patterns: Sequence[str] = BUILD_CONFIGS) -> str | None:
    """The machine DPDK was built for (RTE_MACHINE of its rte_build_config.h: "corei7" in Debian's packages,
    "native" in a default build from source), or None when no build configuration is installed."""
    for path in (p for pattern in patterns for p in sorted(glob.glob(pattern))):
        m = re.search(r"^#define RTE_MACHINE (\S+)", Path(path).read_text(), re.MULTILINE)
        if m:
            return m.group(1).strip('"')
    return None


def split_reply(output: bytes) -> tuple[str, int] | None:
    """The reply before the first prompt in ``output``, and how many bytes of it reply and prompt took.

    Asynchronous lines (`_ASYNC_LINE`) are taken out first, wherever they landed, so a prompt they split is
    still found and a reply they interrupted reads whole. None when no complete prompt has arrived yet.
    """
    clean = bytearray()
    cuts: list[tuple[int, int]] = []  # per asynchronous line: its offset in clean, where it ends in output
    last = 0
    for match in _ASYNC_LINE.finditer(output):
        clean += output[last : match.start()]
        last = match.end()
        cuts.append((len(clean), last))
    clean += output[last:]
    at = clean.find(PROMPT)
    if at < 0:
        return None
    end = at + len(PROMPT)
    used = end
    for offset, resume in cuts:
        if offset < end:  # lines cut at or after the prompt's end belong to the next reply
            used = resume + (end - offset)
    return clean[:at].decode(errors="replace"), used


def _counter(block: str, name: str) -> int:
    match = re.search(rf"{name}:\s*(\d+)", block)
    if match is None:
        raise TestpmdError(f"no {name} counter in testpmd output:\n{block}")
    return int(match.group(1))


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse the NIC statistics blocks of ``show port stats all`` (or of one port) by port number."""
    stats = {}
    for match in _NIC_BLOCK.finditer(text):
        port, block = int(match.group(1)), match.group(2)
        stats[port] = PortStats(
            port=port,
            rx_packets=_counter(block, "RX-packets"),
            rx_bytes=_counter(block, "RX-bytes"),
            rx_missed=_counter(block, "RX-missed"),
            rx_errors=_counter(block, "RX-errors"),
            rx_nombuf=_counter(block, "RX-nombuf"),
            tx_packets=_counter(block, "TX-packets"),
            tx_bytes=_counter(block, "TX-bytes"),
            tx_errors=_counter(block, "TX-errors"),
        )
    return stats


def parse_forward_drops(text: str) -> dict[int, tuple[int, int]]:
    """Parse ``stop``'s per-port forward statistics into (RX-dropped, TX-dropped) by port number."""
    return {
        int(m.group(1)): (_counter(m.group(2), "RX-dropped"), _counter(m.group(2), "TX-dropped"))
        for m in _FWD_BLOCK.finditer(text)
    }


_PREFIX = re.compile(r"vhm(\d+)t\d+")


def sweep_stale_files() -> list[Path]:
    """Remove hugepage files and runtime directories left by lab testpmds of processes that no longer exist.

    A lab user killed outright (SIGKILL, a CI timeout) never runs `Testpmd.close`; its testpmds exit when
    their stdin closes, but their files stay and keep hugepages in use. Returns what was removed.
    """
    return remove_orphaned([*HUGEPAGES.glob("vhm*t*map_*"), *DPDK_RUNTIME.glob("vhm*t*")], _PREFIX)


def remove_orphaned(paths: list[Path], owner: re.Pattern[str]) -> list[Path]:
    """Remove those of ``paths`` (hugepage files, runtime directories) whose name ``owner`` matches with the
    pid of a process that no longer exists in its first group; the paths removed."""
    removed = []
    for path in paths:
        match = owner.match(path.name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class Testpmd(ChildProcess):
    """One interactive dpdk-testpmd with the given ports, as a context manager.

    Entering starts it and waits for its prompt and for all its ports to exist; forwarding starts with
    `start` (or ``auto_start``). Leaving quits it (killing it if it hangs) and removes its hugepage files,
    its /var/run/dpdk runtime directory, the vhost-user sockets it listened on, and its log.

    Lcores: ``nb_cores`` forwarding lcores plus main lcore 0. ``cpu`` pins all of them to one host CPU
    (``--lcores 0@C,1@C``), which leaves the other CPU to QEMU; ``lcores`` gives the mapping verbatim.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        ports: Sequence[PortSpec],
        *,
        forward_mode: ForwardMode = "io",
        nb_cores: int = 1,
        cpu: int | None = None,
        lcores: str | None = None,
        txpkts: int | Sequence[int] = 64,
        burst: int | None = None,
        rxd: int | None = None,
        txd: int | None = None,
        memory_mb: int = 128,
        total_num_mbufs: int = 8192,
        auto_start: bool = False,
        file_prefix: str | None = None,
        workdir: str | Path | None = None,
        eal_args: Sequence[str] = (),
        app_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        keep_logs: bool = False,
    ) -> None:
        if not ports:
            raise ValueError("testpmd needs at least one port")
        self.ports = tuple(ports)
        self.forward_mode = forward_mode
        self.nb_cores = nb_cores
        if lcores is None:
            ids = range(nb_cores + 1)
            lcores = ",".join(f"{i}@{cpu}" for i in ids) if cpu is not None else f"0-{nb_cores}"
        self.lcores = lcores
        self.txpkts = (txpkts,) if isinstance(txpkts, int) else tuple(txpkts)
        self.burst = burst
        self.rxd, self.txd = rxd, txd
        self.memory_mb = memory_mb
        self.total_num_mbufs = total_num_mbufs
        self.auto_start = auto_start
        # Unique per process and instance, and recognisable: the test guard looks for leftovers by it.
        self.file_prefix = file_prefix or f"vhm{os.getpid()}t{next(_ids)}"
        self.eal_args = tuple(eal_args)
        self.app_args = tuple(app_args)
        self.start_timeout = start_timeout
        self.keep_logs = keep_logs
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vhm-t", dir="/tmp"))
        )
        self.log_path = self.workdir / f"testpmd-{self.file_prefix}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._output = bytearray()
        self._consumed = 0  # _output[:_consumed] has been handed out as command replies
        self._eof = False
        self._changed = threading.Condition()
        self.startup_output = ""

    # --- lifecycle -------------------------------------------------------------------------------------

    def command_line(self) -> list[str]:
        """The dpdk-testpmd command line (without the stdbuf wrapper)."""
        virtio_user = [p for p in self.ports if isinstance(p, VirtioUserPort)]
        eal = [
            "--lcores", self.lcores,
            "--main-lcore", "0",
            "--no-pci",
            f"--file-prefix={self.file_prefix}",
            "-m", str(self.memory_mb),
        ]  # fmt: skip
        # virtio-user shares its memory as whole files (else SET_MEM_TABLE has too many regions), and that
        # excludes --huge-unlink; close() removes the files instead.
        eal.append("--single-file-segments" if virtio_user else "--huge-unlink")
        # In the order given, so testpmd's port numbers are the indices into self.ports.
        kinds: dict[type, int] = {}
        for port in self.ports:
            index = kinds[type(port)] = kinds.get(type(port), -1) + 1
            eal += ["--vdev", port.vdev(index)]
        queues = max(p.queues for p in self.ports)
        app = [
            "-i",
            f"--forward-mode={self.forward_mode}",
            f"--nb-cores={self.nb_cores}",
            f"--rxq={queues}",
            f"--txq={queues}",
            f"--total-num-mbufs={self.total_num_mbufs}",
            f"--txpkts={','.join(map(str, self.txpkts))}",
        ]
        if self.burst is not None:
            app.append(f"--burst={self.burst}")
        if self.rxd is not None:
            app.append(f"--rxd={self.rxd}")
        if self.txd is not None:
            app.append(f"--txd={self.txd}")
        if self.auto_start:
            app.append("--auto-start")
        return [TESTPMD, *eal, *self.eal_args, "--", *app, *self.app_args]

    def open(self) -> Self:
        """Start testpmd, wait for its prompt and check that every port came up as a device."""
        if self._proc is not None:
            raise TestpmdError("testpmd already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        sweep_stale_files()
        for port in self.ports:
            # DPDK's vhost library will not bind over a stale socket file from a crashed run.
            if port.creates_socket and Path(port.path).is_socket():
                Path(port.path).unlink()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            ["stdbuf", "-oL", *self.command_line()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"testpmd-{self.file_prefix}", daemon=True
        )
        self._reader.start()
        self.startup_output = self._until_prompt(self.start_timeout, "testpmd to start")
        summary = self.command("show port summary all")
        match = re.search(r"Number of available ports: (\d+)", summary)
        if match is None or int(match.group(1)) != len(self.ports):
            raise TestpmdError(
                f"testpmd has {match.group(1) if match else 'no'} ports, {len(self.ports)} were asked for\n"
                f"{self.diagnostics()}"
            )
        return self

    def quit(self, timeout: float = 30.0) -> None:
        """Tell testpmd to quit and wait for it to exit; kill it if it does not."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            self._write("quit")
            wait_until(lambda: proc.poll() is not None, timeout, "testpmd to quit", details=self.diagnostics)
        except (TestpmdError, WaitTimeout):
            self.kill()
            raise

    def close(self) -> None:
        """Quit (or kill) testpmd and remove every file it and this object created."""
        try:
            self.quit(timeout=15)
        except (TestpmdError, WaitTimeout):
            pass  # quit() killed it; the files go all the same
        finally:
            self.kill()
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
            if self._reader is not None:
                self._reader.join(5)
            if self._log is not None:
                self._log.close()
            self.remove_files()

    def remove_files(self) -> None:
        """Remove this instance's hugepage files, DPDK runtime directory, listening sockets and log."""
        for path in HUGEPAGES.glob(f"{self.file_prefix}map_*"):
            path.unlink(missing_ok=True)
        shutil.rmtree(DPDK_RUNTIME / self.file_prefix, ignore_errors=True)
        for port in self.ports:
            if port.creates_socket:
                Path(port.path).unlink(missing_ok=True)
        if not self.keep_logs:
            self.log_path.unlink(missing_ok=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _enter(self) -> Self:
        return self.open()

    # --- commands --------------------------------------------------------------------------------------

    def command(self, text: str, timeout: float = 15.0) -> str:
        """Run one interactive command and return what it printed before the next prompt."""
        self._write(text)
        return self._until_prompt(timeout, f"testpmd to answer {text!r}")

    def start(self, tx_first: int | None = None) -> None:
        """Start forwarding; with ``tx_first``, first transmit that many bursts (exact counts in io mode)."""
        self.command("start" if tx_first is None else f"start tx_first {tx_first}")

    def stop(self) -> dict[int, PortStats]:
        """Stop forwarding and return the final counters of every port, with the forward engine's drops."""
        drops = parse_forward_drops(self.command("stop"))
        return {
            port: replace(stats, rx_dropped=drops.get(port, (0, 0))[0], tx_dropped=drops.get(port, (0, 0))[1])
            for port, stats in self.stats().items()
        }

    def stats(self) -> dict[int, PortStats]:
        """Every port's current counters (cumulative since the port started or `clear_stats`)."""
        text = self.command("show port stats all")
        stats = parse_port_stats(text)
        if len(stats) != len(self.ports):
            raise TestpmdError(f"cannot parse the stats of {len(self.ports)} ports from:\n{text}")
        return stats

    def forward_drops(self) -> dict[int, tuple[int, int]]:
        """Every port's forward-engine drops so far, (RX-dropped, TX-dropped), without stopping forwarding
        (``show fwd stats all``): TX-dropped is what the PMD refused, e.g. a guest's full receive ring."""
        return parse_forward_drops(self.command("show fwd stats all"))

    def clear_stats(self) -> None:
        """Zero every port's counters."""
        self.command("clear port stats all")

    def link_up(self, port: int = 0) -> bool:
        """Whether ``port`` reports link up (a vhost port: its front-end has set DRIVER_OK)."""
        return "Link status: up" in self.command(f"show port info {port}")

    def wait_for_link(self, port: int = 0, timeout: float = 30.0) -> None:
        """Wait until ``port`` has link."""
        wait_until(
            lambda: self.link_up(port),
            timeout,
            f"testpmd port {port} link up",
            interval=0.05,
            details=self.diagnostics,
        )

    def wait_for_packets(
        self, n: int, *, port: int = 0, direction: Literal["rx", "tx"] = "rx", timeout: float = 30.0
    ) -> PortStats:
        """Wait until ``port`` has received (or sent) at least ``n`` packets; return its counters then."""

        def enough() -> PortStats | None:
            stats = self.stats()[port]
            count = stats.rx_packets if direction == "rx" else stats.tx_packets
            return stats if count >= n else None

        return wait_until(
            enough, timeout, f"{n} {direction} packets on testpmd port {port}", details=self.diagnostics
        )

    # --- plumbing --------------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise TestpmdError("testpmd not started")
        try:
            self._proc.stdin.write(text.encode() + b"\n")
            self._proc.stdin.flush()
        except OSError as e:
            raise TestpmdError(f"cannot send {text!r} to testpmd: {e}\n{self.diagnostics()}") from e

    def _read_stdout(self) -> None:
        """Drain testpmd's stdout (so it never blocks on a full pipe) into the buffer and the log."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            with self._changed:
                if not data:
                    self._eof = True
                    self._changed.notify_all()
                    return
                self._output += data
                if self._log is not None and not self._log.closed:
                    self._log.write(data)
                    self._log.flush()
                self._changed.notify_all()

    def _until_prompt(self, timeout: float, what: str) -> str:
        """Consume output up to the next prompt and return it."""

        def prompt() -> str | None:
            with self._changed:
                found = split_reply(bytes(self._output[self._consumed :]))
                if found is not None:
                    reply, used = found
                    self._consumed += used
                    return reply
                if self._eof:
                    raise TestpmdError(f"testpmd exited while waiting for {what}\n{self.diagnostics()}")
                self._changed.wait(0.1)
                return None

        return wait_until(prompt, timeout, what, interval=0.001, details=self.diagnostics)

    def diagnostics(self, lines: int = 40) -> str:
        """testpmd's command line, exit status and log tail, for error messages."""
        status = "running" if self.alive else f"exit status {self._proc.returncode if self._proc else None}"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return (
            f"--- testpmd {self.file_prefix} ({status}): {' '.join(self.command_line())}\n"
            f"--- last {lines} lines of {self.log_path} ---\n{tail(text, lines)}"
        )

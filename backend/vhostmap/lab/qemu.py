"""QEMU guests with vhost-user NICs, for tests, the demo and benchmarks.

`QemuGuest` boots the lab's busybox guest (`vhostmap.lab.guestkernel`) under TCG: PVH vmlinux plus initrd,
guest RAM in a shared memfd (vhost-user maps it), one virtio-net-pci device per `Nic` with ``vectors=0``
(QEMU 7.2 under TCG segfaults when vhost-user starts with MSI-X; the guest then uses INTx, which also serves
multiqueue devices). Two serial ports: ttyS0 is the kernel console, written to ``console.log``; ttyS1 is the
command channel (`vhostmap.lab.channel`), a UNIX socket this class listens on and QEMU connects to before the
guest runs. A QMP monitor listens on ``qmp.sock`` (`QemuGuest.qmp`, through the qemu.qmp library).

Live migration on one host: a guest made with ``incoming=True`` does not boot; its QEMU waits on
``migration.sock`` for the state of another (same memory backend type, same devices; its NICs may be on other
vhost-user sockets). ``source.migrate(destination)`` moves the running guest there over QMP; the destination
then runs it, and its command channel, which QEMU connected at start, carries the guest's commands from then
on (the guest's /init keeps serving the same serial port and never says READY again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from qemu.qmp.legacy import QEMUMonitorProtocol

from vhostmap.lab.channel import CommandChannel, CompletedCommand, GuestError
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.process import ChildProcess
from vhostmap.lab.wait import tail, wait_until
from vhostmap.system.unixsock import UNIX_PATH_MAX

QEMU = "qemu-system-x86_64"
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Nic:
    """One vhost-user virtio-net NIC of a guest (ethN in the guest, in the order given).

    ``mode`` is QEMU's side of the socket: "client" connects to a listening backend (which must be up before
    the guest starts, unless ``reconnect`` is set); "server" listens and lets the backend connect (and
    reconnect). ``ip`` ("10.0.0.1/24") and ``mtu`` configure the guest interface; ``mtu`` also sets the
    device's host_mtu. ``options`` are extra virtio-net-pci properties ("rx_queue_size=1024").
    """

    socket: str | Path
    mac: str
    mode: Literal["client", "server"] = "client"
    queues: int = 1
    mtu: int | None = None
    ip: str | None = None
    reconnect: int | None = None
    options: tuple[str, ...] = ()


def _qemu_path(path: str | Path, what: str) -> str:
    """``path`` as a QEMU option value: QEMU splits options on commas and has no escape we can rely on."""
    text = str(path)
    if "," in text:
        raise ValueError(f"{what} {text!r} contains a comma, which QEMU's option syntax cannot carry")
    return text


def _unix_path(path: str | Path, what: str) -> str:
    text = _qemu_path(path, what)
    if len(os.fsencode(text)) >= UNIX_PATH_MAX:
        raise ValueError(f"{what} {text!r} is too long for a UNIX socket ({UNIX_PATH_MAX - 1} bytes max)")
    return text


class MigrationLostMemory(GuestError):
    """The destination of a live migration got guest RAM that differs from the stopped source's: QEMU did not
    carry every page (``pages``: their guest-physical addresses). QEMU 7.2's TCG does this in a fair share of
    migrations, with or without a vhost-user device (see tests/integration/test_restart_migration.py)."""

    def __init__(self, pages: list[int]) -> None:
        shown = ", ".join(f"{p:#x}" for p in pages[:16]) + (", ..." if len(pages) > 16 else "")
        super().__init__(f"the migration lost {len(pages)} page(s) of guest memory: {shown}")
        self.pages = pages


def host_tsc_khz(cpuinfo: Path = CPUINFO) -> int | None:
    """The host's TSC frequency in kHz, when /proc/cpuinfo can tell (a constant TSC of known frequency, whose
    "cpu MHz" is that frequency), else None.

    Under TCG the guest's TSC is the host's (QEMU's cpu_get_ticks), and a guest that calibrates it against its
    emulated PIT while the host is busy can get it wrong by a factor: its clock then runs several times too
    fast for the whole boot (a T1 guest timed a 1.25 s wget at 4.8 s). Given the frequency
    (``tsc_early_khz``) it calibrates nothing, and its later refinement keeps it unless it agrees within 1%.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = mhz = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            with contextlib.suppress(ValueError):
                mhz = float(value)
    if not flags or mhz is None or not {"constant_tsc", "tsc_known_freq"} <= flags:
        return None
    return round(mhz * 1000)


class QemuGuest(ChildProcess):
    """A QEMU TCG guest booted from the lab kernel, driven through its command channel.

    Use as a context manager: entering starts QEMU (without waiting for the guest), leaving kills it and
    removes every file it created: logs, the command socket, server-mode vhost-user sockets and the working
    directory if this object made it. ``workdir`` must be short: UNIX socket paths go in it. QEMU dies with
    the thread that started it, so start guests from a thread that outlives them (the main thread).
    ``cpus`` pins QEMU to host CPUs; ``share`` is a host directory mounted at /mnt/host in the guest (9p);
    ``hugepages`` reserves 2 MiB pages in the guest and mounts hugetlbfs at /dev/hugepages. ``incoming``
    starts QEMU waiting for a live migration instead of booting (see the module docstring and `migrate`).
    ``machine`` is QEMU's machine type; ``iommu`` (q35 only) adds QEMU's intel-iommu with interrupt remapping
    and boots the guest with ``intel_iommu=on``, which vfio-pci in the guest needs.
    """

    def __init__(
        self,
        nics: Sequence[Nic] = (),
        *,
        kernel: GuestKernel | None = None,
        workdir: str | Path | None = None,
        memory_mb: int = 256,
        smp: int = 1,
        cpus: Sequence[int] | None = None,
        share: str | Path | None = None,
        hugepages: int = 0,
        boot_timeout: float = 60.0,
        cmdline: str = "",
        extra_args: Sequence[str] = (),
        keep_logs: bool = False,
        incoming: bool = False,
        machine: str = "pc",
        iommu: bool = False,
    ) -> None:
        self.nics = tuple(nics)
        self.kernel = kernel or GuestKernel.from_cache()
        self.memory_mb = memory_mb
        self.smp = smp
        self.cpus = tuple(cpus) if cpus is not None else None
        self.share = Path(share) if share is not None else None
        self.hugepages = hugepages
        self.boot_timeout = boot_timeout
        self.extra_cmdline = cmdline
        self.extra_args = tuple(extra_args)
        self.keep_logs = keep_logs
        self.machine = machine
        self.iommu = iommu
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vhm-q", dir="/tmp"))
        )
        self.console_log = self.workdir / "console.log"
        self.channel_log = self.workdir / "channel.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.channel_path = self.workdir / "channel.sock"
        self.qmp_path = self.workdir / "qmp.sock"
        self.migration_path = self.workdir / "migration.sock"
        self.incoming = incoming
        for nic in self.nics:
            _unix_path(nic.socket, "vhost-user socket")
        _unix_path(self.channel_path, "command channel socket")
        _unix_path(self.qmp_path, "QMP socket")
        _unix_path(self.migration_path, "migration socket")
        self._qmp: QEMUMonitorProtocol | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: CommandChannel | None = None
        self._ready = False
        self._started_at = 0.0
        self.boot_seconds: float | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The QEMU command line this guest runs."""
        k = self.kernel
        append = ["console=ttyS0", "panic=-1", "quiet", "vhostmap.cmd=ttyS1"]
        # Each of these saves a little boot time under TCG; the guest is a throwaway lab machine.
        append += [
            "mitigations=off",
            "tsc=reliable",
            "no_timer_check",
            "rcupdate.rcu_expedited=1",
            "8250.nr_uarts=2",
        ]
        khz = host_tsc_khz()
        if khz is not None:
            append.append(f"tsc_early_khz={khz}")
        args = [
            QEMU,
            "-accel", "tcg",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-m", str(self.memory_mb),
            "-smp", str(self.smp),
            "-kernel", _qemu_path(k.vmlinux, "kernel"),
            "-initrd", _qemu_path(k.initrd, "initrd"),
            # vhost-user maps guest RAM in the backend: it must be a shareable fd.
            "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
            "-machine", f"{self.machine},memory-backend=mem",
            "-serial", f"file:{_qemu_path(self.console_log, 'console log')}",
            "-chardev", f"socket,id=channel,path={self.channel_path},logfile={self.channel_log}",
            "-serial", "chardev:channel",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.iommu:
            # An emulated IOMMU (q35 only) with interrupt remapping: what vfio-pci needs in the guest.
            args += ["-device", "intel-iommu,intremap=on"]
            append.append("intel_iommu=on")
        if self.incoming:
            # -S: the migrated guest stays paused until migrate() has looked at what arrived and says "cont".
            args += ["-incoming", f"unix:{self.migration_path}", "-S"]
        for i, nic in enumerate(self.nics):
            chardev = f"socket,id=vhu{i},path={nic.socket}"
            if nic.mode == "server":
                chardev += ",server=on,wait=off"
            if nic.reconnect is not None:
                chardev += f",reconnect={nic.reconnect}"
            netdev = f"vhost-user,id=net{i},chardev=vhu{i}"
            device = f"virtio-net-pci,netdev=net{i},mac={nic.mac},vectors=0"
            if nic.queues > 1:
                netdev += f",queues={nic.queues}"
                device += ",mq=on"
            if nic.mtu is not None:
                device += f",host_mtu={nic.mtu}"
            device += "".join(f",{o}" for o in nic.options)
            args += ["-chardev", chardev, "-netdev", netdev, "-device", device]
            suffix = "" if i == 0 else str(i)
            if nic.ip:
                append.append(f"vhostmap.ip{suffix}={nic.ip}")
            if nic.mtu is not None:
                append.append(f"vhostmap.mtu{suffix}={nic.mtu}")
        if self.share is not None:
            share = _qemu_path(self.share, "share")
            args += ["-virtfs", f"local,path={share},mount_tag=host0,security_model=none"]
            append.append("vhostmap.share=host0")
        if self.hugepages:
            append.append(f"vhostmap.hugepages={self.hugepages}")
        if self.extra_cmdline:
            append.append(self.extra_cmdline)
        args += ["-append", " ".join(append), *self.extra_args]
        if self.cpus is not None:
            args = ["taskset", "-c", ",".join(map(str, self.cpus)), *args]
        # If this process dies without closing the guest (SIGKILL, a CI timeout), QEMU must not live on and
        # burn a CPU: the kernel kills it when the thread that started it exits.
        return ["setpriv", "--pdeathsig", "KILL", "--", *args]

    def start(self) -> Self:
        """Start QEMU and wait until it has connected the command channel (not until the guest is up)."""
        if self._proc is not None:
            raise GuestError("guest already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for nic in self.nics:
            # A stale socket file from a crashed run would make QEMU's listen fail.
            if nic.mode == "server" and Path(nic.socket).is_socket():
                Path(nic.socket).unlink()
        self._channel = CommandChannel(self.channel_path, self.diagnostics, self._check_alive)
        self._started_at = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._channel.wait_connected(30)
        return self

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest's /init says it is up (NICs configured); return seconds since start."""
        if self._ready:
            assert self.boot_seconds is not None
            return self.boot_seconds
        if self._channel is None:
            raise GuestError("guest not started (use it as a context manager or call start())")
        if self.incoming:
            raise GuestError(
                "this QEMU waits for an incoming migration: it runs a guest once one is migrated"
            )
        self._channel.wait_ready(self.boot_timeout if timeout is None else timeout)
        self._ready = True
        self.boot_seconds = time.monotonic() - self._started_at
        return self.boot_seconds

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power the guest off from inside and wait for QEMU to exit; kill it if it does not."""
        if not self.alive:
            return
        self.wait_ready()
        assert self._channel is not None
        self._channel.post("poweroff -f")
        try:
            wait_until(
                lambda: not self.alive, timeout, "QEMU to exit after poweroff", details=self.diagnostics
            )
        finally:
            self.kill()

    def close(self) -> None:
        """Kill QEMU and remove every file this guest created."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):  # QEMU may be gone already; the connection goes anyway
                self._qmp.close()
            self._qmp = None
        self.kill()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        created = [self.channel_path, self.qmp_path, self.migration_path]
        if not self.keep_logs:
            created += [self.console_log, self.channel_log, self.qemu_log]
        created += [Path(nic.socket) for nic in self.nics if nic.mode == "server"]
        for path in created:
            path.unlink(missing_ok=True)
        if self._own_workdir and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _enter(self) -> Self:
        return self.start()

    # --- the monitor and live migration ---------------------------------------------------------------

    def qmp(self) -> QEMUMonitorProtocol:
        """The QMP connection to this QEMU (made on first use, capabilities negotiated; closed by `close`)."""
        if self._qmp is None:
            if not self.alive:
                raise GuestError(f"QEMU is not running\n{self.diagnostics()}")
            wait_until(
                self.qmp_path.is_socket, 30, "QEMU to listen on its QMP socket", details=self.diagnostics
            )
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            qmp.connect(negotiate=True)
            qmp.settimeout(30.0)
            self._qmp = qmp
        return self._qmp

    def monitor(self, command: str, **arguments: Any) -> Any:
        """Run QMP ``command`` with ``arguments`` and return its result; a QMP error raises GuestError."""
        try:
            return self.qmp().cmd(command, **arguments)
        except Exception as e:  # qemu.qmp raises ExecuteError, or OSError/EOFError on a dead QEMU
            raise GuestError(f"QMP {command} {arguments or ''} failed: {e}\n{self.diagnostics()}") from e

    def run_state(self) -> str:
        """QEMU's run state (``query-status``): "running", "inmigrate", "postmigrate", "paused", ..."""
        return str(self.monitor("query-status")["status"])

    def migrate(
        self,
        destination: QemuGuest,
        timeout: float = 60.0,
        *,
        downtime_ms: int = 300,
        check_memory: bool = False,
    ) -> dict[str, Any]:
        """Live-migrate this running guest into ``destination`` (a guest made with ``incoming=True`` and
        started) and return the source's final ``query-migrate`` (``total-time``, ``downtime``, ``ram``).

        Bandwidth is not limited (QEMU's default is 32 MiB/s, for networks shared with guests; a migration
        on one host has no reason to wait); ``downtime_ms`` is the pause QEMU may aim for at the switch-over.
        When this returns the destination runs the guest and takes its commands; this QEMU is paused in
        "postmigrate" and may be closed. Raises GuestError if the migration fails or outlasts ``timeout``.

        ``check_memory``: before the destination runs, compare the guest RAM of both QEMUs (the source is
        stopped, the destination not started yet, and no vhost-user back-end writes either of them then: the
        source's rings were stopped, the destination's are not started); a page that differs is one the
        migration did not carry, and raises MigrationLostMemory.
        """
        if not destination.incoming or not destination.alive:
            raise GuestError("the destination must be a started QemuGuest(incoming=True)")
        self.wait_ready()
        # QEMU listens for the migration only once it has set its devices up (its vhost-user ones included).
        wait_until(
            destination.migration_path.is_socket,
            timeout,
            "the destination QEMU to listen for the migration",
            details=destination.diagnostics,
        )
        self.monitor(
            "migrate-set-parameters", **{"max-bandwidth": 0x7FFF_FFFF, "downtime-limit": downtime_ms}
        )
        self.monitor("migrate", uri=f"unix:{destination.migration_path}")

        def finished() -> dict[str, Any] | None:
            info: dict[str, Any] = self.monitor("query-migrate")
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise GuestError(
                    f"migration {status}: {info.get('error-desc', '')}\n{self.diagnostics()}\n"
                    f"--- destination ---\n{destination.diagnostics()}"
                )
            return info if status == "completed" else None

        info = wait_until(
            finished,
            timeout,
            "the live migration to complete",
            interval=0.05,
            details=lambda: f"{self.diagnostics()}\n--- destination ---\n{destination.diagnostics()}",
        )
        wait_until(
            lambda: destination.run_state() != "inmigrate",
            timeout,
            "the destination QEMU to load the migrated guest",
            details=destination.diagnostics,
        )
        if check_memory:
            lost = self._lost_pages(destination)
            if lost:
                raise MigrationLostMemory(lost)
        destination.resume(timeout)
        destination._adopt(self)
        return info

    def resume(self, timeout: float = 30.0) -> None:
        """``cont``, and wait until the guest runs: a migration's destination once the RAM arrived, or a
        source after a migration whose destination was given up ("postmigrate", as an operator would after
        MigrationLostMemory; its vhost-user rings restart)."""
        self.monitor("cont")
        wait_until(
            lambda: self.run_state() == "running",
            timeout,
            "QEMU to run the guest (cont)",
            details=self.diagnostics,
        )

    def _lost_pages(self, destination: QemuGuest) -> list[int]:
        """Guest-physical addresses of the 4 KiB pages whose contents differ between this (stopped) QEMU's
        RAM and the destination's (pmemsave of both, into the workdirs, removed after)."""
        size = self.memory_mb << 20
        dumps = [self.workdir / "ram.dump", destination.workdir / "ram.dump"]
        try:
            for guest, path in zip((self, destination), dumps, strict=True):
                guest.monitor("pmemsave", val=0, size=size, filename=str(path))
            a, b = (path.read_bytes() for path in dumps)
        finally:
            for path in dumps:
                path.unlink(missing_ok=True)
        page = 4096
        if a == b:
            return []
        return [p for p in range(0, size, page) if a[p : p + page] != b[p : p + page]]

    def _adopt(self, source: QemuGuest) -> None:
        """Take over the guest just migrated here from ``source``: it is up, and its /init serves commands
        on this QEMU's command channel (QEMU connected it at start)."""
        self.incoming = False
        self._ready = True
        self.boot_seconds = source.boot_seconds if source.boot_seconds is not None else 0.0

    # --- commands --------------------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0, *, check: bool = False) -> CompletedCommand:
        """Run ``cmd`` with the guest's /bin/sh once it is ready (`CommandChannel.run`)."""
        return self._ready_channel().run(cmd, timeout, check=check)

    def ping(
        self, addr: str, count: int = 3, *, size: int = 56, interval: float = 0.2, timeout: float = 30.0
    ) -> float:
        """Ping ``addr`` from the guest; the loss in % (`CommandChannel.ping`)."""
        return self._ready_channel().ping(addr, count, size=size, interval=interval, timeout=timeout)

    def wait_carrier(self, dev: str = "eth0", timeout: float = 30.0) -> None:
        """Wait until ``dev`` in the guest has carrier (`CommandChannel.wait_carrier`)."""
        self._ready_channel().wait_carrier(dev, timeout)

    # --- plumbing --------------------------------------------------------------------------------------

    def _ready_channel(self) -> CommandChannel:
        self.wait_ready()
        assert self._channel is not None
        return self._channel

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise GuestError(f"QEMU exited with status {self._proc.returncode}\n{self.diagnostics()}")

    def diagnostics(self, lines: int = 30) -> str:
        """The tails of QEMU's stderr, the console and the command channel, for error messages."""
        parts = []
        for title, path in (
            ("qemu", self.qemu_log),
            ("console", self.console_log),
            ("command channel", self.channel_log),
        ):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {title} ({path.name}), last {lines} lines ---\n{tail(text, lines)}")
        return "\n".join(parts) or "(QEMU logged nothing)"

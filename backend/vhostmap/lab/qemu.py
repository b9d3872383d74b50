"""QEMU guests with vhost-user NICs, for tests, the demo and benchmarks.

`QemuGuest` boots the lab's busybox guest (`vhostmap.lab.guestkernel`) under TCG: PVH vmlinux plus initrd,
guest RAM in a shared memfd (vhost-user maps it), one virtio-net-pci device per `Nic` with ``vectors=0``
(QEMU 7.2 under TCG segfaults when vhost-user starts with MSI-X; the guest then uses INTx, which also serves
multiqueue devices). Two serial ports: ttyS0 is the kernel console, written to ``console.log``; ttyS1 is the
command channel, a UNIX socket this class listens on and QEMU connects to before the guest runs, so no byte
of it is lost. Its protocol (see scripts/guest-init.sh): the host sends ``"<id> <timeout> <base64 script>"``
and the guest answers ``"@@VHM-OUT <id> <length>@@"``, exactly <length> bytes of output, then
``"@@VHM-RC <id> <status>@@"``.
"""

from __future__ import annotations

import base64
import math
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.wait import WaitTimeout, tail, wait_until

QEMU = "qemu-system-x86_64"
UNIX_PATH_MAX = 108
READY_MARKER = b"@@VHM-READY@@\n"
_RC = re.compile(rb"@@VHM-RC (\d+) (\S+)@@\n")
_LOSS = re.compile(r"(\d+(?:\.\d+)?)% packet loss")
# Seconds the host waits past a command's own timeout: the guest's watchdog fires first and reports it.
REPLY_GRACE = 15.0


class GuestError(RuntimeError):
    """QEMU or the guest did not do what was asked; the message ends with the logs' tails."""


class GuestCommandTimeout(GuestError, TimeoutError):
    """A guest command outlived its timeout. ``output`` holds what it printed, if the guest reported it."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class GuestCommandFailed(GuestError):
    """A command run with ``check=True`` exited non-zero."""


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


@dataclass(frozen=True)
class CompletedCommand:
    """What a guest command did: its shell exit status and its stdout and stderr, interleaved."""

    cmd: str
    rc: int
    output: str

    def check(self) -> CompletedCommand:
        """Return self, or raise `GuestCommandFailed` if the command exited non-zero."""
        if self.rc != 0:
            raise GuestCommandFailed(f"guest command {self.cmd!r} exited {self.rc}:\n{tail(self.output)}")
        return self


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


class QemuGuest:
    """A QEMU TCG guest booted from the lab kernel, driven through its command channel.

    Use as a context manager: entering starts QEMU (without waiting for the guest), leaving kills it and
    removes every file it created: logs, the command socket, server-mode vhost-user sockets and the working
    directory if this object made it. ``workdir`` must be short: UNIX socket paths go in it. QEMU dies with
    the thread that started it, so start guests from a thread that outlives them (the main thread).
    ``cpus`` pins QEMU to host CPUs; ``share`` is a host directory mounted at /mnt/host in the guest (9p);
    ``hugepages`` reserves 2 MiB pages in the guest and mounts hugetlbfs at /dev/hugepages.
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
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vhm-q", dir="/tmp"))
        )
        self.console_log = self.workdir / "console.log"
        self.channel_log = self.workdir / "channel.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.channel_path = self.workdir / "channel.sock"
        for nic in self.nics:
            _unix_path(nic.socket, "vhost-user socket")
        _unix_path(self.channel_path, "command channel socket")
        self._proc: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._channel: socket.socket | None = None
        self._buffer = b""
        self._ready = False
        self._seq = 0
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
            "-machine", "pc,memory-backend=mem",
            "-serial", f"file:{_qemu_path(self.console_log, 'console log')}",
            "-chardev", f"socket,id=channel,path={self.channel_path},logfile={self.channel_log}",
            "-serial", "chardev:channel",
        ]  # fmt: skip
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
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.channel_path))
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._started_at = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._channel = wait_until(
            self._accept_channel, 30, "QEMU to connect the command channel", details=self.diagnostics
        )
        self._channel.setblocking(False)
        return self

    def _accept_channel(self) -> socket.socket | None:
        self._check_alive()
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return None
        return conn

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest's /init says it is up (NICs configured); return seconds since start."""
        if self._ready:
            assert self.boot_seconds is not None
            return self.boot_seconds
        if self._channel is None:
            raise GuestError("guest not started (use it as a context manager or call start())")

        def ready() -> bool:
            self._receive(0.1)
            at = self._buffer.find(READY_MARKER)
            if at < 0:
                return False
            self._buffer = self._buffer[at + len(READY_MARKER) :]
            return True

        wait_until(
            ready,
            self.boot_timeout if timeout is None else timeout,
            "the guest to boot",
            interval=0.01,
            details=self.diagnostics,
        )
        self._ready = True
        self.boot_seconds = time.monotonic() - self._started_at
        return self.boot_seconds

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power the guest off from inside and wait for QEMU to exit; kill it if it does not."""
        if not self.alive:
            return
        self.wait_ready()
        self._send(self._next_seq(), 5, "poweroff -f")
        try:
            wait_until(
                lambda: not self.alive, timeout, "QEMU to exit after poweroff", details=self.diagnostics
            )
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop QEMU at once (SIGKILL if SIGTERM is not enough within a few seconds) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Kill QEMU and remove every file this guest created."""
        self.kill()
        for sock in (self._channel, self._listener):
            if sock is not None:
                sock.close()
        self._channel = self._listener = None
        created = [self.channel_path]
        if not self.keep_logs:
            created += [self.console_log, self.channel_log, self.qemu_log]
        created += [Path(nic.socket) for nic in self.nics if nic.mode == "server"]
        for path in created:
            path.unlink(missing_ok=True)
        if self._own_workdir and not self.keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """Whether the QEMU process is running."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """QEMU's process id, once started."""
        return self._proc.pid if self._proc is not None else None

    # --- commands --------------------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 30.0, *, check: bool = False) -> CompletedCommand:
        """Run ``cmd`` with the guest's /bin/sh and return its exit status and output.

        Waits for the guest to be ready first. Raises `GuestCommandTimeout` if it runs longer than
        ``timeout`` (the guest then kills its process group, so later commands still work) and
        `GuestCommandFailed` if ``check`` and it exited non-zero.
        """
        self.wait_ready()
        seq = self._next_seq()
        guest_timeout = max(1, math.ceil(timeout))
        self._send(seq, guest_timeout, cmd)
        header = b"@@VHM-OUT %d " % seq

        def reply() -> tuple[str, bytes] | None:
            self._receive(0.05)
            start = self._buffer.find(header)
            if start < 0:
                return None
            end_of_header = self._buffer.find(b"@@\n", start)
            if end_of_header < 0:
                return None
            length = int(self._buffer[start + len(header) : end_of_header])
            body = end_of_header + 3
            match = _RC.match(self._buffer, body + length)
            if match is None:
                return None
            if int(match.group(1)) != seq:
                raise GuestError(f"command channel out of step: reply {match.group(0)!r} to request {seq}")
            output = self._buffer[body : body + length]
            self._buffer = self._buffer[match.end() :]
            return match.group(2).decode(), output

        try:
            status, raw = wait_until(
                reply,
                guest_timeout + REPLY_GRACE,
                f"the guest to answer {cmd!r}",
                interval=0.01,
                details=self.diagnostics,
            )
        except WaitTimeout as e:
            raise GuestCommandTimeout(str(e)) from None
        output = raw.decode(errors="replace")
        if status == "timeout":
            raise GuestCommandTimeout(
                f"guest command {cmd!r} ran past its {guest_timeout} s timeout and was killed; its output:\n"
                f"{tail(output)}\n{self.diagnostics()}",
                output,
            )
        result = CompletedCommand(cmd=cmd, rc=int(status), output=output)
        return result.check() if check else result

    def ping(
        self, addr: str, count: int = 3, *, size: int = 56, interval: float = 0.2, timeout: float = 30.0
    ) -> float:
        """Ping ``addr`` from the guest ``count`` times with ``size``-byte payloads; return the loss in %."""
        result = self.run(f"ping -c {count} -s {size} -i {interval} -W 2 {addr}", timeout=timeout)
        match = _LOSS.search(result.output)
        if match is None:
            raise GuestError(f"ping printed no loss figure (exit {result.rc}):\n{result.output}")
        return float(match.group(1))

    def wait_carrier(self, dev: str = "eth0", timeout: float = 30.0) -> None:
        """Wait until ``dev`` in the guest has carrier (its vhost-user backend has started the device)."""
        script = f'while [ "$(cat /sys/class/net/{dev}/carrier 2>/dev/null)" != 1 ]; do usleep 50000; done'
        try:
            self.run(script, timeout=timeout, check=True)
        except GuestCommandTimeout as e:
            raise GuestCommandTimeout(
                f"{dev} in the guest got no carrier within {timeout:g} s\n{e}"
            ) from None

    # --- plumbing --------------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, seq: int, timeout: int, cmd: str) -> None:
        if self._channel is None:
            raise GuestError("guest not started")
        line = b"%d %d %s\n" % (seq, timeout, base64.b64encode(cmd.encode()))
        # The guest's UART takes bytes as fast as TCG runs it; a blocking send with a deadline is enough.
        self._channel.settimeout(30)
        try:
            self._channel.sendall(line)
        except OSError as e:
            raise GuestError(f"cannot send to the guest's command channel: {e}\n{self.diagnostics()}") from e
        finally:
            self._channel.setblocking(False)

    def _receive(self, timeout: float) -> None:
        """Append whatever the command channel has to the buffer, waiting up to ``timeout`` for some."""
        assert self._channel is not None
        readable, _, _ = select.select([self._channel], [], [], timeout)
        if not readable:
            self._check_alive()
            return
        data = self._channel.recv(65536)
        if not data:
            self._check_alive()
            raise GuestError(f"the guest's command channel closed\n{self.diagnostics()}")
        self._buffer += data

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

"""The lab guest's command channel: a UNIX socket the host listens on and the guest's second serial port
(ttyS1) connects to, through QEMU, before the guest runs, so that no byte of it is lost.

Its protocol (scripts/guest-init.sh): the guest says ``@@VHM-READY@@`` once its /init is up; then the host
sends ``"<id> <timeout> <length> <base64 script>"`` and the guest answers
``"@@VHM-OUT <id> <length> <md5>@@"``, exactly <length> bytes of output whose md5 that is, then
``"@@VHM-RC <id> <status>@@"`` (status ``timeout`` when its watchdog killed the script). `QemuGuest` uses it
for the QEMU it starts; the libvirt tests for the domains libvirt starts.

The emulated UARTs lose and repeat bytes now and then under TCG on a busy host, both ways, so each side
checks what it got: a request that arrives damaged is answered ``@@VHM-BAD@@`` and sent again; a reply that
arrives damaged (its header lost, its length or md5 wrong) is asked for again by sending the same request,
which the guest answers with the reply it kept instead of running the script twice. A request the guest
never answered at all (its newline lost) is sent once more when its time is up.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from vhostmap.lab.wait import WaitTimeout, tail, wait_until

READY_MARKER = b"@@VHM-READY@@\n"
# The guest's answer to a request that arrived damaged (scripts/guest-init.sh): it ran nothing.
BAD_MARKER = b"@@VHM-BAD@@\n"
# Times a request is sent again (it or its reply arrived damaged) before the channel is declared broken.
MAX_RESENDS = 3
# A guest image built before replies carried their md5 writes none: its replies are taken unchecked.
_OUT = re.compile(rb"@@VHM-OUT (\d+) (\d+)(?: ([0-9a-f]{32}))?@@\n")
_RC = re.compile(rb"@@VHM-RC (\d+) (\S+)@@\n")
_LOSS = re.compile(r"(\d+(?:\.\d+)?)% packet loss")
# Seconds the host waits past a command's own timeout: the guest's watchdog fires first and reports it.
REPLY_GRACE = 15.0


def _md5(data: bytes) -> bytes:
    """The md5 of ``data`` in hex, as md5sum prints it (a check against damage, not against anyone)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest().encode()


class Damaged:
    """What `CommandChannel._reply` says of a reply that came whole but does not check out."""


DAMAGED = Damaged()


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


class CommandChannel:
    """The host end of one guest's command channel, listening on ``path`` from the moment it is made.

    ``details`` returns what error messages end with (the logs' tails); ``check_alive`` raises GuestError when
    the guest's QEMU is gone, and is called whenever the channel waits. Closing removes the socket file.
    """

    def __init__(
        self, path: str | Path, details: Callable[[], str], check_alive: Callable[[], None] = lambda: None
    ) -> None:
        self.path = Path(path)
        self.details = details
        self.check_alive = check_alive
        self._listener: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._conn: socket.socket | None = None
        self._buffer = b""
        self._seq = 0
        self._line = b""  # the last request sent, for sending it again
        # Whether the guest's replies carry their md5 (until one is seen without: an image built before).
        self._checked = True

    @property
    def connected(self) -> bool:
        """Whether QEMU has connected."""
        return self._conn is not None

    def wait_connected(self, timeout: float) -> None:
        """Wait until QEMU connects (it does when it starts, before the guest runs)."""

        def connected() -> bool:
            self._receive(0.05)
            return self.connected

        wait_until(connected, timeout, "QEMU to connect the command channel", details=self.details)

    def wait_ready(self, timeout: float = 120.0, what: str = "the guest to boot") -> None:
        """Wait until the guest's /init says it is up."""

        def ready() -> bool:
            self._receive(0.1)
            at = self._buffer.find(READY_MARKER)
            if at < 0:
                return False
            self._buffer = self._buffer[at + len(READY_MARKER) :]
            return True

        wait_until(ready, timeout, what, interval=0.01, details=self.details)

    def post(self, cmd: str, timeout: int = 5) -> int:
        """Send ``cmd`` without waiting for its answer (``poweroff``, which never answers); its id."""
        if self._conn is None:
            raise GuestError("the guest has not connected its command channel")
        self._seq += 1
        payload = base64.b64encode(cmd.encode())
        self._line = b"%d %d %d %s\n" % (self._seq, timeout, len(payload), payload)
        self._send(self._line)
        return self._seq

    def _send(self, line: bytes) -> None:
        assert self._conn is not None
        # The guest's UART takes bytes as fast as TCG runs it; a blocking send with a deadline is enough.
        self._conn.settimeout(30)
        try:
            self._conn.sendall(line)
        except OSError as e:
            raise GuestError(f"cannot send to the guest's command channel: {e}\n{self.details()}") from e
        finally:
            self._conn.setblocking(False)

    def run(self, cmd: str, timeout: float = 30.0, *, check: bool = False) -> CompletedCommand:
        """Run ``cmd`` with the guest's /bin/sh and return its exit status and output.

        Raises `GuestCommandTimeout` if it runs longer than ``timeout`` (the guest then kills its process
        group, so later commands still work) and `GuestCommandFailed` if ``check`` and it exited non-zero.
        """
        guest_timeout = max(1, math.ceil(timeout))
        seq = self.post(cmd, guest_timeout)
        resends = 0

        def again(what: str) -> None:
            nonlocal resends
            resends += 1
            if resends > MAX_RESENDS:
                raise GuestError(f"{what} {resends} times: {cmd!r}\n{self.details()}")
            self._send(self._line)

        def reply() -> tuple[str, bytes] | None:
            self._receive(0.05)
            bad = self._buffer.find(BAD_MARKER)
            if bad >= 0:  # the request arrived damaged and did not run: send it again
                self._buffer = self._buffer[bad + len(BAD_MARKER) :]
                again("the guest received the request damaged")
                return None
            answer = self._reply(seq)
            if isinstance(answer, Damaged):
                again("the guest's reply arrived damaged")
                return None
            return answer

        what = f"the guest to answer {cmd!r}"
        try:
            status, raw = wait_until(
                reply, guest_timeout + REPLY_GRACE, what, interval=0.01, details=self.details
            )
        except WaitTimeout as e:
            if self._seen(seq):
                raise GuestCommandTimeout(str(e)) from None
            # Not a byte of its reply: the request may have lost its newline and be waiting for one.
            again("the guest did not answer")
            try:
                status, raw = wait_until(reply, REPLY_GRACE, what, interval=0.01, details=self.details)
            except WaitTimeout as e:
                raise GuestCommandTimeout(str(e)) from None
        output = raw.decode(errors="replace")
        if status == "timeout":
            raise GuestCommandTimeout(
                f"guest command {cmd!r} ran past its {guest_timeout} s timeout and was killed; its output:\n"
                f"{tail(output)}\n{self.details()}",
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

    def _reply(self, seq: int) -> tuple[str, bytes] | Damaged | None:
        """The status and output of request ``seq``'s reply, taken out of the buffer; None while it has not
        all come; DAMAGED (taken out too) when its end came but the reply does not check out."""
        at = self._buffer.find(b"@@VHM-OUT %d " % seq)
        header = _OUT.match(self._buffer, at) if at >= 0 else None
        if header is not None:
            length, body = int(header.group(2)), header.end()
            end = _RC.match(self._buffer, body + length)
            output = self._buffer[body : body + length]
            digest = header.group(3)
            self._checked = digest is not None
            intact = digest is None or _md5(output) == digest
            if end is not None and int(end.group(1)) == seq and intact:
                self._buffer = self._buffer[end.end() :]
                return end.group(2).decode(), output
        if not self._checked:
            return None  # a guest that would run the request again: wait, as before
        # Not (yet) a whole reply that checks out: damaged if its end is here.
        for end in _RC.finditer(self._buffer):
            if int(end.group(1)) == seq:
                self._buffer = self._buffer[end.end() :]
                return DAMAGED
        return None

    def _seen(self, seq: int) -> bool:
        """Whether any part of request ``seq``'s reply is in the buffer."""
        return any(marker % seq in self._buffer for marker in (b"@@VHM-OUT %d ", b"@@VHM-RC %d "))

    def _receive(self, timeout: float) -> None:
        """Accept QEMU's connection, or append what the guest sent; waits up to ``timeout`` for either."""
        sock = self._conn if self._conn is not None else self._listener
        if sock is None:
            raise GuestError("the command channel is closed")
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            self.check_alive()
            return
        if self._conn is None:
            try:
                self._conn, _ = sock.accept()
            except BlockingIOError:
                return
            self._conn.setblocking(False)
            return
        data = self._conn.recv(65536)
        if not data:
            self.check_alive()
            raise GuestError(f"the guest's command channel closed\n{self.details()}")
        self._buffer += data

    def close(self) -> None:
        """Close both sockets and remove the listening one's file. Idempotent."""
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self._conn = self._listener = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

"""T1 guest TCP, the benchmark's guest-to-guest scenario: two stock Linux guests copy a file over HTTP.

`GuestPair` boots two lab guests (`vhostmap.lab.qemu`, TCG, the kernel's virtio_net) with one NIC each on
the two vhost-user sockets of whatever back-end listens there (vhostmap with the ports in a link or on a
switch, or testpmd io-forwarding two net_vhost ports: `vhostmap.lab.bench` starts it; QEMU is the client
side of every socket). Guest A (10.0.0.1) makes a random file in its tmpfs once per boot and serves it with
busybox httpd; guest B (10.0.0.2) fetches it with wget into its tmpfs, and every copy's md5 is compared with
the original's: a mismatch fails the run (`TransferCorrupt`), it is not a number. `measure` fetches it
again until the transfers add up to the measurement time.

Timing: the rate is the file's bits over the wget's wall time measured *in guest B*, from CLOCK_MONOTONIC
read just before and just after the wget (``now at ... nsecs`` in /proc/timer_list: busybox's date has no
%N, /proc/uptime only hundredths of a second). The host-side monotonic time around the guest command would
add the command channel's round trip (the script goes through an emulated UART both ways: about 60-70 ms
here, a tenth of a 64 MiB transfer at 800 Mbit/s) to every back-end alike, diluting the differences
between them. The host time is still taken, as a check of the guest's clock: a guest time longer than the
host's around the same command can only be a miscalibrated guest clock, and fails the run. Guest time
under TCG follows the host's clock (the TSC is the host's, calibrated at boot against the emulated PIT).

Warm-up: the first fetch after a boot runs at about half speed whatever the back-end (first touches of
guest memory, by both guests and by the back-end, each a host page fault; TCP's cached metrics), so
``warmup`` seconds of fetches (at least one when positive) come before the measured ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from vhostmap.lab.channel import GuestError
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.wait import wait_until

# name, MAC, address: guest A serves, guest B fetches (ports "a" and "b" of the back-end).
GUESTS = (("a", "52:54:00:00:00:0a", "10.0.0.1"), ("b", "52:54:00:00:00:0b", "10.0.0.2"))
HTTP_PORT = 8080
SERVED = "/tmp/www"  # guest A's tmpfs: the directory httpd serves, holding the file
FETCHED = "/tmp/blob"  # guest B's tmpfs: where wget writes the copy
BOOT_TIMEOUT = 120.0  # two guests booting on one CPU of a busy machine
# CLOCK_MONOTONIC in nanoseconds, as a shell function (awk stops reading at the line).
_NOW = "now() { awk '/^now at / { print $3; exit }' /proc/timer_list; }"
_TIMES = re.compile(r"^T1 (\d+) (\d+) (\d+)$", re.M)
_MD5 = re.compile(r"^([0-9a-f]{32})\s", re.M)


class TransferCorrupt(RuntimeError):
    """Guest B's copy of the file differs from guest A's (md5), or the guest's clock cannot be trusted."""


@dataclass(frozen=True)
class Fetch:
    """One wget of the file: its size, and its wall time in guest B and on the host around the command."""

    bytes: int
    guest_seconds: float
    host_seconds: float


@dataclass(frozen=True)
class Throughput:
    """What one boot's measured fetches gave: Mbit/s (10^6 bit/s) of file over wget time in the guest.

    ``busy``: the share of the fetches' time the back-end's datapath had work (None: not known, DPDK);
    ``frame_bytes``: the mean frame guest A sent (TSO passed whole: tens of KiB; segmented: up to the MTU);
    ``dropped``: frames the back-end dropped meanwhile (a guest's full receive ring; TCP then recovers);
    ``md5``: guest A's file's and guest B's last copy's, equal (else `TransferCorrupt` was raised).
    """

    mbit_s: float
    fetches: int
    guest_seconds: float
    host_seconds: float
    busy: float | None
    frame_bytes: float | None
    dropped: int | None
    md5: tuple[str, str]


def guest_memory_mb(file_mb: int) -> int:
    """RAM for a guest holding the file in its tmpfs, which may fill half of RAM: twice the file, plus what
    the kernel, busybox and TCP's buffers need (256 MiB, the lab's default, suffices up to 32 MiB)."""
    return max(256, 2 * file_mb + 192)


class GuestPair:
    """Guests A and B on ``sockets`` (QEMU connects: the back-end must listen), both pinned to ``cpus``, A
    serving a ``file_mb`` MiB random file by HTTP, as a context manager: entering boots them and makes the
    file, leaving kills both QEMUs and removes their files (logs, sockets), also after a failed start."""

    def __init__(
        self,
        sockets: Sequence[Path],
        workdir: Path,
        *,
        cpus: Sequence[int],
        file_mb: int,
        kernel: GuestKernel | None = None,
    ) -> None:
        if len(sockets) != len(GUESTS):
            raise ValueError(f"a guest pair needs {len(GUESTS)} sockets, not {len(sockets)}")
        self.file_mb = file_mb
        self.file_bytes = file_mb << 20
        kernel = kernel or GuestKernel.from_cache()
        self.guests = [
            QemuGuest(
                [Nic(sock, mac, mode="client", ip=f"{ip}/24")],
                kernel=kernel,
                workdir=workdir / f"q{name}",
                memory_mb=guest_memory_mb(file_mb),
                cpus=cpus,
                boot_timeout=BOOT_TIMEOUT,
            )
            for sock, (name, mac, ip) in zip(sockets, GUESTS, strict=True)
        ]
        self.sent_md5 = ""
        self._stack = ExitStack()

    @property
    def server(self) -> QemuGuest:
        """Guest A, which serves the file."""
        return self.guests[0]

    @property
    def client(self) -> QemuGuest:
        """Guest B, which fetches it."""
        return self.guests[1]

    def __enter__(self) -> Self:
        try:
            for guest in self.guests:  # both QEMUs start before either is waited for: they boot together
                self._stack.enter_context(guest)
            for guest in self.guests:
                guest.wait_ready()
                guest.wait_carrier("eth0")
            self._serve()
            server_ip = GUESTS[0][2]
            wait_until(
                lambda: self.client.ping(server_ip, count=1) == 0.0,
                30,
                f"guest B to reach guest A ({server_ip}) through the back-end",
                interval=0.2,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill both QEMUs (a benchmark's guests need no clean poweroff) and remove their files."""
        self._stack.close()

    def _serve(self) -> None:
        """Make the random file in guest A's tmpfs, note its md5, and serve it with busybox httpd."""
        out = self.server.run(
            f"mkdir -p {SERVED} && dd if=/dev/urandom of={SERVED}/blob bs=1M count={self.file_mb} 2>/dev/null"
            f" && md5sum {SERVED}/blob && busybox httpd -p {HTTP_PORT} -h {SERVED}",
            timeout=60 + self.file_mb,  # urandom and md5 at some tens of MB/s under TCG
            check=True,
        ).output
        self.sent_md5 = _md5(out, "guest A's file")

    def fetch(self) -> Fetch:
        """Guest B fetches the file into its tmpfs with wget; times in the guest and on the host."""
        url = f"http://{GUESTS[0][2]}:{HTTP_PORT}/blob"
        script = f'{_NOW}; t0=$(now); wget -q -O {FETCHED} {url}; rc=$?; t1=$(now); echo "T1 $rc $t0 $t1"'
        before = time.monotonic()
        # The timeout allows 4 Mbit/s: slower than that, a run is broken, not slow.
        result = self.client.run(script, timeout=60 + 2 * self.file_mb)
        host = time.monotonic() - before
        match = _TIMES.search(result.output)
        if match is None:
            raise GuestError(f"no times from guest B's wget:\n{result.output}")
        rc, t0, t1 = (int(g) for g in match.groups())
        if rc != 0:
            raise GuestError(f"guest B's wget of {url} exited {rc}:\n{result.output}")
        guest = (t1 - t0) / 1e9
        if not 0 < guest <= host:
            raise TransferCorrupt(
                f"guest B's clock says the wget took {guest:.3f} s, the host saw {host:.3f} s around it: "
                "the guest's clock is off"
            )
        return Fetch(self.file_bytes, guest, host)

    def verify(self) -> str:
        """Compare guest B's copy with guest A's file (md5) and remove the copy; its md5. Raises
        `TransferCorrupt` if they differ."""
        out = self.client.run(f"md5sum {FETCHED} && rm {FETCHED}", timeout=60 + self.file_mb, check=True)
        received = _md5(out.output, "guest B's copy")
        if received != self.sent_md5:
            raise TransferCorrupt(
                f"guest B's copy of the {self.file_mb} MiB file has md5 {received}, guest A's {self.sent_md5}"
            )
        return received


def _md5(output: str, what: str) -> str:
    match = _MD5.search(output)
    if match is None:
        raise GuestError(f"no md5 of {what} in:\n{output}")
    return match.group(1)


def measure(
    pair: GuestPair,
    seconds: float,
    warmup: float,
    alive: Callable[[], None],
    idle: Callable[[], tuple[int, int, int]] | None = None,
    frames: Callable[[], tuple[int, int]] | None = None,
    drops: Callable[[], int] | None = None,
) -> Throughput:
    """Fetch the file ``warmup`` seconds' worth (unmeasured), then until the measured wget times add up to
    ``seconds`` (at least once); every copy is md5-compared. ``alive`` raises if the back-end died;
    ``idle``: the back-end datapath's idle and clock nanoseconds (and rounds), read around each measured
    wget; ``frames``: packets and bytes guest A has sent so far, as the back-end counted them; ``drops``:
    the frames the back-end has dropped so far. The counters are read before and after the measured
    fetches (the md5 comparisons between them move no traffic)."""
    spent = 0.0
    while spent < warmup:
        spent += pair.fetch().guest_seconds
        alive()
        pair.verify()
    fetches: list[Fetch] = []
    idle_ns = clock_ns = 0
    sent0 = frames() if frames else None
    dropped0 = drops() if drops else None
    md5 = ""
    while not fetches or sum(f.guest_seconds for f in fetches) < seconds:
        load0 = idle() if idle else None
        fetches.append(pair.fetch())
        load1 = idle() if idle else None
        alive()
        if load0 is not None and load1 is not None:
            idle_ns += load1[0] - load0[0]
            clock_ns += load1[1] - load0[1]
        md5 = pair.verify()
    sent1 = frames() if frames else None
    dropped1 = drops() if drops else None
    guest = sum(f.guest_seconds for f in fetches)
    frame_bytes = None
    if sent0 is not None and sent1 is not None and sent1[0] > sent0[0]:
        frame_bytes = (sent1[1] - sent0[1]) / (sent1[0] - sent0[0])
    return Throughput(
        mbit_s=sum(f.bytes for f in fetches) * 8 / guest / 1e6,
        fetches=len(fetches),
        guest_seconds=guest,
        host_seconds=sum(f.host_seconds for f in fetches),
        busy=1 - idle_ns / clock_ns if clock_ns > 0 else None,
        frame_bytes=frame_bytes,
        dropped=dropped1 - dropped0 if dropped0 is not None and dropped1 is not None else None,
        md5=(pair.sent_md5, md5),
    )

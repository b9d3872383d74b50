"""The netmap API for local applications, over a running vhostmap daemon.

    from vhostmap.apps import client

    with client.open("vale0:app") as port:          # or "vm0", "vm0-1", "vm0^", ... (nm_open names)
        tx = port.tx_rings[0]
        tx.send(frames)                             # a (n, len) uint8 array, one numpy copy
        port.txsync()
        if port.poll(client.POLLIN, timeout=1.0):
            got = port.rx_rings[0].receive()        # buffer indexes, lengths, flags of the batch
            port.rx_rings[0].advance(len(got))      # release it

`open` asks the daemon over its control socket for what NIOCGINFO and NIOCREGIF give (the netmap_if's offset,
the bound rings) and receives the allocator's memfd, a kick eventfd and an irq eventfd; it maps the region
and builds `UserRing`s over it. The syncs run in the daemon (like netmap's sync kloop): ``txsync``/``rxsync``
kick it and return at once, and the ring's tail moves when the daemon has synced, which ``poll`` waits for
on the irq eventfd. The registration lives as long as the control connection: when the application exits,
even killed, its rings are released.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from types import TracebackType
from typing import Any, Self

from vhostmap.control import client as control
from vhostmap.control.client import DEFAULT_CONTROL_SOCKET
from vhostmap.netmap.abi import NetmapIfView, Region, map_region
from vhostmap.netmap.user import POLLIN, POLLOUT, UserRing, ready_events

__all__ = ["POLLIN", "POLLOUT", "ClientPort", "DaemonGone", "open"]


class DaemonGone(ConnectionError):
    """The daemon closed the application's control connection (it stopped or restarted)."""


class ClientPort:
    """A port opened through the daemon; implements `vhostmap.netmap.user.NetmapPort`."""

    def __init__(
        self, name: str, control_socket: str = DEFAULT_CONTROL_SOCKET, flags: int = 0, vnet_hdr: bool = False
    ) -> None:
        self.name = name
        self._sock = control.connect(control_socket)
        fds: list[int] = []
        try:
            reply, fds = control.request(self._sock, "register", port=name, flags=flags, vnet_hdr=vnet_hdr)
            if len(fds) != 3:
                raise control.ControlError(f"register: expected 3 fds from the daemon, got {len(fds)}")
            memfd, self._kick, self._irq = fds
            self.info: dict[str, Any] = reply
            self.region: Region = map_region(memfd, int(reply["memsize"]))
            os.close(memfd)
            fds = [self._kick, self._irq]
            self.nifp = NetmapIfView(self.region, int(reply["nifp_offset"]))
            nbufs, buf_size, start = int(reply["nbufs"]), int(reply["buf_size"]), int(reply["buffers_offset"])
            self.region.check(start, nbufs * buf_size, "buffer pool")
            buffers = self.region.array[start : start + nbufs * buf_size].reshape(nbufs, buf_size)
            t0, t1 = reply["tx_rings"]
            r0, r1 = reply["rx_rings"]
            self.tx_rings = [UserRing(v, buffers) for v in self.nifp.tx_rings[t0:t1]]
            self.rx_rings = [UserRing(v, buffers) for v in self.nifp.rx_rings[r0:r1]]
        except BaseException:
            for fd in fds:
                os.close(fd)
            self._sock.close()
            raise
        self._poller = select.poll()
        self._poller.register(self._irq, select.POLLIN)
        # The control connection becomes readable only when the daemon goes away (it sends nothing unasked).
        self._poller.register(self._sock.fileno(), select.POLLIN)
        self.closed = False

    # --- NetmapPort ---------------------------------------------------------------------------------------
    def txsync(self) -> None:
        """Ask the daemon to send what the TX rings hold up to head, and to reclaim sent slots."""
        self._kick_daemon()

    def rxsync(self) -> None:
        """Ask the daemon to take back RX slots before head and to import new frames."""
        self._kick_daemon()

    def poll(self, events: int = POLLIN, timeout: float | None = None) -> int:
        """Wait until an RX ring has frames (POLLIN) or a TX ring has room (POLLOUT); the ready events, 0 on
        timeout. Kicks the daemon first, as netmap's poll syncs. Raises DaemonGone if the daemon went away."""
        ready = ready_events(self, events)
        if ready:
            return ready
        self._kick_daemon()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            for fd, _ in self._poller.poll(None if left is None else int(left * 1000) + 1):
                if fd == self._irq:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._irq)
                else:
                    self._check_daemon()
            ready = ready_events(self, events)
            if ready or (deadline is not None and time.monotonic() >= deadline):
                return ready

    def stats(self) -> list[dict[str, Any]]:
        """The daemon's view of this registration: bound rings, reinits and repaired slots."""
        reply, fds = control.request(self._sock, "client_stats")
        for fd in fds:
            os.close(fd)
        return list(reply["sessions"])

    def close(self) -> None:
        """Release the rings (the daemon sees the connection close) and unmap. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        for fd in (self._kick, self._irq):
            os.close(fd)
        self.tx_rings, self.rx_rings = [], []
        self.region.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClientPort({self.name!r}, tx={len(self.tx_rings)}, rx={len(self.rx_rings)})"

    # --- internals ----------------------------------------------------------------------------------------
    def _kick_daemon(self) -> None:
        with contextlib.suppress(BlockingIOError):  # saturated: the daemon has a kick pending anyway
            os.eventfd_write(self._kick, 1)

    def _check_daemon(self) -> None:
        try:
            data = self._sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise DaemonGone(f"{self.name}: the vhostmap daemon closed the connection")


def open(
    name: str, control_socket: str = DEFAULT_CONTROL_SOCKET, flags: int = 0, vnet_hdr: bool = False
) -> ClientPort:
    """Open port ``name`` (nm_open syntax, see vhostmap.netmap.user) of the daemon at ``control_socket``.

    ``flags`` may hold NETMAP_NO_TX_POLL / NETMAP_DO_RX_POLL. ``vnet_hdr`` (switch ports, ``vale0:app``, as
    netmap's NETMAP_REQ_PORT_HDR_SET): frames keep their offloads, a frame that asks for some starting with
    its virtio-net header (VIRTIO_NET_HDR, 12 bytes; NS_VNET_HDR on its first slot; up to 64 KiB of TCP over
    several slots), and frames sent with that flag are taken the same way; without it every frame arrives
    complete. Raises vhostmap.control.ControlError when the daemon refuses (unknown or busy port, bad name)
    or cannot be reached.
    """
    return ClientPort(name, control_socket, flags, vnet_hdr)

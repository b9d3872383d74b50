"""An in-process passthrough guest: what a guest driver does with an ivshmem-doorbell device, without QEMU.

It connects to a passthrough port's ivshmem socket as QEMU does, takes the shared-memory fd and the eventfds
from the protocol's welcome (SCM_RIGHTS), maps the region, parses its header (abi.PtRegionView) and drives its
rings as a netmap application with a CSB-mode driver underneath: a sync writes head/cur to the CSB, rings the
doorbell only when the daemon asked for kicks, and reads hwcur/hwtail back; a receiver that finds nothing sets
appl_need_kick, looks again (the double check) and sleeps on its interrupt eventfd.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import time

from vhostmap.ivshmem.protocol import (
    NEED_DATA,
    ClientConnection,
    ClientId,
    OwnVector,
    PeerGone,
    PeerVector,
    SharedMemory,
    Version,
)
from vhostmap.netmap.abi import CsbView, PtRegionView, Region, map_region
from vhostmap.netmap.user import UserRing

_ANCILLARY = socket.CMSG_SPACE(16 * array.array("i").itemsize)


def read_messages(sock: socket.socket, parser: ClientConnection, timeout: float) -> list[object]:
    """Whatever the server sent within ``timeout`` (at least one message, unless the socket ended)."""
    events: list[object] = []
    deadline = time.monotonic() + timeout
    while not events:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise AssertionError("no message from the ivshmem server")
        data, anc, _, _ = sock.recvmsg(4096, _ANCILLARY)
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds += arr
        if not data:
            for fd in fds:
                os.close(fd)
            events.append(None)  # end of stream
            break
        parser.receive_data(data, fds)
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
    return events


class FakePtGuest:
    """A guest holding passthrough port ``path``: ``tx``/``rx`` are its rings (UserRing), ``view`` the
    region as parsed, ``doorbell`` and ``irq`` its eventfds (ours to close)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.parser = ClientConnection()
        self.events: list[object] = []
        self.shm = self.doorbell = self.irq = -1
        self.peer = -1
        try:
            while self.irq < 0:
                for event in read_messages(self.sock, self.parser, timeout):
                    self._take(event)
            size = os.fstat(self.shm).st_size
            self.region: Region = map_region(self.shm, size)
            self.view = PtRegionView(self.region)
        except BaseException:
            self.close()
            raise
        buffers = self.view.buffers
        self.tx = [UserRing(r, buffers) for r in self.view.nifp.tx_rings]
        self.rx = [UserRing(r, buffers) for r in self.view.nifp.rx_rings]
        self.kicks = 0

    def _take(self, event: object) -> None:
        self.events.append(event)
        if event is None:
            raise AssertionError(f"the server closed the connection after {self.events}")
        if isinstance(event, SharedMemory):
            self.shm = event.fd
        elif isinstance(event, PeerVector) and event.vector == 0:
            self.peer, self.doorbell = event.peer_id, event.fd
        elif isinstance(event, OwnVector) and event.vector == 0:
            self.irq = event.fd
        elif isinstance(event, PeerVector | OwnVector):
            os.close(event.fd)  # a vector this guest does not use
        else:
            assert isinstance(event, Version | ClientId | PeerGone), event

    # --- the driver ---------------------------------------------------------------------------------------
    def csb(self, ring: UserRing) -> CsbView:
        """The CSB entry of one of our rings."""
        if ring in self.tx:
            return self.view.tx_csb[self.tx.index(ring)]
        return self.view.rx_csb[self.rx.index(ring)]

    def sync(self, ring: UserRing) -> None:
        """What a CSB-mode txsync/rxsync does: publish head/cur, kick if asked, take hwtail."""
        csb = self.csb(ring)
        csb.write_head_cur(ring.head, ring.cur)
        if csb.ktoa.kern_need_kick:
            os.eventfd_write(self.doorbell, 1)
            self.kicks += 1
        _, hwtail = csb.read_hw()
        ring.view.tail = hwtail

    def send(self, frames: list[bytes], ring: int = 0, timeout: float = 5.0) -> None:
        """Send every frame on TX ring ``ring``, waiting for room (on the interrupt) as needed."""
        r = self.tx[ring]
        deadline = time.monotonic() + timeout
        while frames:
            n = r.send(frames) if r.space() else 0
            frames = frames[n:]
            self.sync(r)
            if frames and not r.space():
                self._sleep(r, deadline, f"room for {len(frames)} frames")

    def receive(self, count: int, ring: int = 0, timeout: float = 5.0) -> list[bytes]:
        """``count`` frames from RX ring ``ring`` (released as they are read)."""
        r = self.rx[ring]
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            self.sync(r)
            batch = r.receive(count - len(got))
            got += batch.frames()
            r.advance(len(batch))
            if len(got) >= count:
                self.sync(r)
                return got
            if r.empty():
                self._sleep(r, deadline, f"{count} frames (got {len(got)})")

    def _sleep(self, r: UserRing, deadline: float, what: str) -> None:
        """Ask for an interrupt, look again, and wait for it if there is still nothing."""
        csb = self.csb(r)
        csb.atok.appl_need_kick = 1
        try:
            self.sync(r)
            if not r.empty():
                return
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.irq], [], [], left)[0]:
                raise AssertionError(f"timed out waiting for {what}")
            os.eventfd_read(self.irq)
        finally:
            csb.atok.appl_need_kick = 0

    def close(self) -> None:
        """Unmap, close every fd and the socket (a guest going away)."""
        if getattr(self, "region", None) is not None:
            self.tx = self.rx = []
            del self.view
            self.region.close()
            self.region = None  # type: ignore[assignment]
        for fd in (self.shm, self.doorbell, self.irq):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.shm = self.doorbell = self.irq = -1
        self.parser.close()
        self.sock.close()

"""The only ivshmem module that touches sockets: one port's listening socket and its (at most one) guest.

An ``IvshmemEndpoint`` listens on a UNIX socket (QEMU's ``-chardev socket,path=SOCK`` with
``-device ivshmem-doorbell,chardev=...``). When a guest connects, the handler (a passthrough port) is asked
for what to hand over, and the protocol's welcome (protocol.py) is sent, one message per sendmsg so that each
fd travels with its own 8 bytes. When the guest's socket ends, the handler releases everything it gave.

Nothing here blocks on a guest: this is the control thread's event loop. Messages go out without blocking;
what the socket does not take waits in a bounded queue flushed when it is writable, and a guest that leaves
more than MAX_QUEUED_MESSAGES unread is disconnected. The protocol is one-way: whatever a guest sends is
read and discarded (fds closed), a bounded amount per wake-up. A second guest while one holds the port is
refused: logged and closed at once, before anything is sent (QEMU then fails to start its device, saying the
server closed the connection). When the endpoint closes (the daemon stops) the guest is told the daemon's
peer is gone, so that its doorbell writes are dropped by QEMU from then on. While it serves, a timer on the
loop asks the handler for a heartbeat every PT_HEARTBEAT_INTERVAL seconds (the region's ``heartbeat`` word):
a daemon SIGKILLed or hung can say nothing, and its guest learns it from the beat standing still.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections import deque
from typing import Protocol

from vhostmap.ivshmem.protocol import DAEMON_PEER_ID, GUEST_ID, Message, peer_gone, welcome
from vhostmap.netmap.abi import PT_HEARTBEAT_INTERVAL
from vhostmap.system.unixsock import ACCEPT_RETRY_INTERVAL, Acceptor, fds_from

log = logging.getLogger(__name__)

#: Messages a guest may leave unsent (a welcome is 3 + 2 per vector): only one that never reads its socket
#: and whose socket buffer is full reaches this, and it is disconnected.
MAX_QUEUED_MESSAGES = 64
#: Bytes read (and dropped) from a guest per wake-up: it has nothing to say, and cannot hold the loop.
MAX_DISCARD = 4096
_ANCILLARY_SIZE = socket.CMSG_SPACE(16 * array.array("i").itemsize)


class IvshmemHandler(Protocol):
    """What the endpoint serves: a passthrough port."""

    name: str

    def connected(self) -> tuple[int, list[int], list[int]]:
        """A guest arrived: the shared-memory fd, the eventfds the guest interrupts us through (one per
        vector of our peer) and those we interrupt it through (one per vector of its own). The fds stay the
        handler's. Raises to refuse the guest."""

    def disconnected(self) -> None:
        """The guest left: release what ``connected`` gave."""

    def heartbeat(self) -> None:
        """Tell the guest, if any, that the daemon still runs (cheap: called every heartbeat interval)."""


class IvshmemEndpoint:
    """One port's ivshmem server socket (server mode only: QEMU connects to us)."""

    def __init__(
        self,
        handler: IvshmemHandler,
        path: str,
        *,
        owner: int | None = None,
        group: int | None = None,
        perm: int | None = None,
    ) -> None:
        self.handler = handler
        self.path = path
        self._fields = {"port": handler.name}
        self._acceptor = Acceptor(
            path, self._accept, self._accept_paused, owner=owner, group=group, perm=perm
        )
        self._conn: socket.socket | None = None
        self._queue: deque[tuple[bytes, int | None]] = deque()
        self.refused = 0  # second guests turned away
        self._heartbeat: asyncio.TimerHandle | None = None
        self.heartbeat_interval = PT_HEARTBEAT_INTERVAL

    @property
    def is_connected(self) -> bool:
        """Whether a guest holds the port now."""
        return self._conn is not None

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (call from the event loop); errors surface at once."""
        self._acceptor.start()
        self._beat()

    def _beat(self) -> None:
        self.handler.heartbeat()
        self._heartbeat = asyncio.get_running_loop().call_later(self.heartbeat_interval, self._beat)

    def close(self) -> None:
        """Stop serving: tell the guest the daemon is gone, drop it, remove the socket."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._conn is not None:
            self._send_now([peer_gone(DAEMON_PEER_ID)])
        self._drop("shutting down")
        self._acceptor.close()

    # --- accepting ----------------------------------------------------------------------------------------
    def _accept_paused(self, e: OSError) -> None:
        log.error(
            "port %s: cannot accept a guest on %s: %s; retrying in %s s",
            self.handler.name,
            self.path,
            e.strerror,
            ACCEPT_RETRY_INTERVAL,
            extra=self._fields,
        )

    def _accept(self, sock: socket.socket) -> None:
        if self._conn is not None:
            # The guest may be gone with its hang-up still queued (a QEMU restarted at once): see it first.
            self._readable()
        if self._conn is not None:
            self.refused += 1
            log.warning(
                "port %s: refusing a second guest on %s: the port is held by another one",
                self.handler.name,
                self.path,
                extra={**self._fields, "reason": "port busy"},
            )
            sock.close()
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            shm, ours, theirs = self.handler.connected()
        except Exception as e:
            log.error(
                "port %s: cannot hand the port to a guest: %s", self.handler.name, e, extra=self._fields
            )
            sock.close()
            return
        self._conn = sock
        self._queue.clear()
        log.info("port %s: guest connected on %s", self.handler.name, self.path, extra=self._fields)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._send(welcome(GUEST_ID, shm, {DAEMON_PEER_ID: ours}, theirs))

    def _drop(self, why: str) -> None:
        sock = self._conn
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        if self._queue:
            loop.remove_writer(sock.fileno())
        self._close_queue()
        sock.close()
        self._conn = None
        log.info(
            "port %s: guest disconnected (%s)", self.handler.name, why, extra={**self._fields, "reason": why}
        )
        self.handler.disconnected()

    # --- reading (only for the hang-up) -------------------------------------------------------------------
    def _readable(self) -> None:
        sock = self._conn
        if sock is None:
            return
        try:
            data, ancdata, _, _ = sock.recvmsg(MAX_DISCARD, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(f"read failed: {e.strerror}")
            return
        for fd in fds_from(ancdata):
            os.close(fd)
        if not data:
            self._drop("end of stream")

    # --- writing ------------------------------------------------------------------------------------------
    def _send(self, messages: list[Message]) -> None:
        """Queue ``messages`` and send what the socket takes now; never blocks."""
        # The fds are dup'ed now: the handler may close its own before the queue drains.
        for m in messages:
            self._queue.append((m.encode(), None if m.fd is None else os.dup(m.fd)))
        if len(self._queue) > MAX_QUEUED_MESSAGES:
            self._drop(f"it does not read its socket: more than {MAX_QUEUED_MESSAGES} messages unsent")
            return
        self._flush()

    def _send_now(self, messages: list[Message]) -> None:
        """Best effort, for the last words before closing: what the socket does not take is lost."""
        for m in messages:
            self._queue.append((m.encode(), None if m.fd is None else os.dup(m.fd)))
        self._flush(register=False)

    def _flush(self, register: bool = True) -> None:
        sock = self._conn
        assert sock is not None
        while self._queue:
            data, fd = self._queue[0]
            anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            try:
                sent = sock.sendmsg([data], anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._close_queue()
                self._drop(f"write failed: {e.strerror}")
                return
            if fd is not None:
                os.close(fd)  # the kernel holds its own reference now
            if sent < len(data):
                self._queue[0] = (data[sent:], None)  # the fd went with the first byte
                break
            self._queue.popleft()
        if not register:
            self._close_queue()
            return
        loop = asyncio.get_running_loop()
        if self._queue:
            loop.add_writer(sock.fileno(), self._writable)
        else:
            loop.remove_writer(sock.fileno())

    def _writable(self) -> None:
        if self._conn is not None:
            self._flush()

    def _close_queue(self) -> None:
        for _, fd in self._queue:
            if fd is not None:
                os.close(fd)
        self._queue.clear()

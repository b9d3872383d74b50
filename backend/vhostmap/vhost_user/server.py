"""The only vhost-user module that touches sockets: listening or connecting, reading messages with their
file descriptors, writing replies, reconnecting.

Each ``Endpoint`` serves one port on one UNIX socket, in server mode (vhostmap listens, QEMU's
``-chardev socket,path=``) or client mode (vhostmap connects to QEMU's ``server=on`` socket and reconnects
whenever either side restarts). Messages are read header first, so the descriptors that arrive with a
message's first byte are exactly that message's (a front-end sends one message per sendmsg).

Nothing here blocks on a front-end: this thread serves every port and the control socket. Replies are sent
without blocking; what the socket does not take waits in a bounded per-connection buffer, flushed when the
socket is writable, and a front-end whose unsent replies exceed the bound (it does not read them) is
disconnected. A listener that cannot accept for want of fds (EMFILE) pauses and retries, never spins.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import socket
from enum import Enum
from typing import Protocol

from vhostmap.system.unixsock import ACCEPT_RETRY_INTERVAL, Acceptor, fds_from
from vhostmap.vhost_user.device import DeviceError
from vhostmap.vhost_user.errors import ProtocolError
from vhostmap.vhost_user.messages import (
    MAX_FDS,
    Empty,
    Request,
    always_replies,
)
from vhostmap.vhost_user.protocol import BackendConnection, Message, NeedData, Payload

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 0.5  # seconds between connection attempts in client mode
#: Reply bytes a front-end may leave unread beyond what its socket buffer holds. Replies are at most a few
#: hundred bytes and a front-end waits for each before its next request, so only one that never reads (and
#: keeps asking) reaches this; it is disconnected.
MAX_UNSENT_REPLY_BYTES = 64 * 1024
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class SocketMode(Enum):
    """Which side of the UNIX socket vhostmap is."""

    SERVER = "server"
    CLIENT = "client"


class MessageHandler(Protocol):
    """What the endpoint drives: the port, which runs requests against its device under the datapath lock."""

    name: str

    def handle_message(self, msg: Message) -> Payload | None:
        """Apply a request; returns the reply payload or None; raises DeviceError on refusal."""

    def reply_ack_negotiated(self) -> bool:
        """Whether REPLY_ACK was negotiated (then NEED_REPLY requests get an ack)."""

    def connected(self) -> None:
        """A front-end connected."""

    def disconnected(self) -> None:
        """The front-end went away: release everything it gave us."""


class Endpoint:
    """One port's vhost-user socket and its (at most one) front-end connection."""

    def __init__(
        self,
        handler: MessageHandler,
        path: str,
        mode: SocketMode,
        *,
        group: int | None = None,
        perm: int | None = None,
        owner: int | None = None,
    ) -> None:
        self.handler = handler
        self.path = path
        self.mode = mode
        self.group = group  # server mode: the socket's group and permission bits (None: leave as created)
        self.perm = perm
        self.owner = owner
        # What the log records of this endpoint are about (journal fields, system/service.py).
        self._fields = {"port": handler.name}
        self._acceptor: Acceptor | None = None
        self._conn: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lost: asyncio.Event | None = None
        self._unsent = bytearray()  # reply bytes the socket has not taken yet

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving (call from the event loop). Server mode binds now, so errors surface at once."""
        if self.mode is SocketMode.SERVER:
            self._acceptor = Acceptor(
                self.path,
                self._accept,
                self._accept_paused,
                owner=self.owner,
                group=self.group,
                perm=self.perm,
            )
            self._acceptor.start()
        else:
            self._task = asyncio.get_running_loop().create_task(self._connect_forever())

    def close(self) -> None:
        """Stop serving; drop the connection and remove a socket we created."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._drop("shutting down")
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None

    @property
    def is_connected(self) -> bool:
        """Whether a front-end is connected now."""
        return self._conn is not None

    # --- server mode --------------------------------------------------------------------------------------
    def _accept_paused(self, e: OSError) -> None:
        # Out of fds (or memory): the other ports keep being served; this one tries again shortly.
        log.error(
            "port %s: cannot accept a front-end on %s: %s; retrying in %s s",
            self.handler.name,
            self.path,
            e.strerror,
            ACCEPT_RETRY_INTERVAL,
        )

    def _accept(self, sock: socket.socket) -> None:
        if self._conn is not None:
            # The front-end may have hung up already with its last bytes still queued (a QEMU reconnecting
            # at once): take those and the hang-up first, so that it is not its successor that is refused.
            self._catch_up()
        if self._conn is not None:
            log.warning("port %s: refusing a second front-end on %s", self.handler.name, self.path)
            sock.close()
            return
        self._attach(sock)

    def _catch_up(self, rounds: int = 64) -> None:
        """Read what the attached front-end has queued, a bounded number of reads (one that keeps talking
        cannot hold the loop), so that a hang-up behind it is seen now."""
        for _ in range(rounds):
            sock = self._conn
            if sock is None or not select.select([sock], [], [], 0)[0]:
                return
            self._readable()

    # --- client mode --------------------------------------------------------------------------------------
    async def _connect_forever(self) -> None:
        waiting_logged = False
        while not self._closed:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                if not waiting_logged:
                    log.info("port %s: waiting for %s (%s)", self.handler.name, self.path, e.strerror)
                    waiting_logged = True
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            waiting_logged = False
            self._lost = asyncio.Event()
            self._attach(sock)
            await self._lost.wait()
            await asyncio.sleep(RECONNECT_INTERVAL)

    # --- one connection -----------------------------------------------------------------------------------
    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._conn = sock
        self._parser = BackendConnection()
        self._unsent = bytearray()
        log.info("port %s: front-end connected on %s", self.handler.name, self.path, extra=self._fields)
        self.handler.connected()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _drop(self, why: str) -> None:
        sock = self._conn
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        if self._unsent:
            loop.remove_writer(sock.fileno())
            self._unsent = bytearray()
        sock.close()
        self._parser.close()  # the fds of a message not complete yet
        log.info(
            "port %s: front-end disconnected (%s)",
            self.handler.name,
            why,
            extra={**self._fields, "reason": why},
        )
        self.handler.disconnected()
        # Last: whoever sees the endpoint disconnected (status, another thread) sees it cleaned up and logged.
        self._conn = None
        if self._lost is not None:
            self._lost.set()

    def _readable(self) -> None:
        sock = self._conn
        assert sock is not None
        # At most the rest of the current message: a recvmsg then never takes the fds of the next one.
        want = self._parser.missing()
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(want, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(f"read failed: {e.strerror}")
            return
        fds = fds_from(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            log.error("port %s: too many fds in one message, truncated by the kernel", self.handler.name)
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop("end of stream")
            return
        # The parser owns the fds from here, and bounds how many an unfinished message may collect.
        self._parser.receive_data(data, fds)
        self._process()

    def _process(self) -> None:
        while self._conn is not None:
            try:
                event = self._parser.next_event()
            except ProtocolError as e:
                log.error(
                    "port %s: malformed message: %s",
                    self.handler.name,
                    e,
                    extra={**self._fields, "reason": e},
                )
                if e.fatal:
                    self._drop("protocol error")
                    return
                if e.request is not None and always_replies(e.request):
                    # The front-end waits for an answer we will not give (see _dispatch): hang up.
                    self._drop(f"cannot answer {e.request.name}")
                    return
                code = e.request if e.request is not None else e.code
                if code is not None and e.need_reply and self.handler.reply_ack_negotiated():
                    self._send(self._parser.ack(code, ok=False))
                continue
            if isinstance(event, NeedData):
                return
            self._dispatch(event)

    def _dispatch(self, msg: Message) -> None:
        log.debug("port %s: %s %s fds=%s", self.handler.name, msg.request.name, msg.payload, msg.fds)
        try:
            payload = self.handler.handle_message(msg)
        except DeviceError as e:
            log.error(
                "port %s: %s refused: %s",
                self.handler.name,
                e.request.name,
                e.reason,
                extra={**self._fields, "reason": e.reason},
            )
            if msg.request is Request.GET_CONFIG:
                # The spec's failure answer to GET_CONFIG: a reply with an empty payload.
                self._send(self._parser.reply(msg.request, Empty()))
            elif always_replies(msg.request):
                # A GET that cannot be answered leaves the front-end waiting forever: hang up instead.
                self._drop(f"cannot answer {msg.request.name}")
            elif msg.need_reply and self.handler.reply_ack_negotiated():
                self._send(self._parser.ack(msg.request, ok=False))
            return
        if always_replies(msg.request) or (msg.request is Request.SET_LOG_BASE and payload is not None):
            assert payload is not None
            self._send(self._parser.reply(msg.request, payload))
        elif msg.need_reply and self.handler.reply_ack_negotiated():
            self._send(self._parser.ack(msg.request, ok=True))

    def _send(self, data: bytes) -> None:
        """Queue a reply; never blocks. A front-end that leaves too much unread is disconnected."""
        sock = self._conn
        if sock is None:
            return
        if not self._unsent:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._drop(f"write failed: {e.strerror}")
                return
            data = data[sent:]
            if not data:
                return
            asyncio.get_running_loop().add_writer(sock.fileno(), self._writable)
        self._unsent += data
        if len(self._unsent) > MAX_UNSENT_REPLY_BYTES:
            self._drop(f"it does not read its replies: more than {MAX_UNSENT_REPLY_BYTES} bytes unsent")

    def _writable(self) -> None:
        sock = self._conn
        assert sock is not None
        try:
            sent = sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(f"write failed: {e.strerror}")
            return
        del self._unsent[:sent]
        if not self._unsent:
            asyncio.get_running_loop().remove_writer(sock.fileno())

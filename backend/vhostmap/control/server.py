"""The daemon's side of its control socket: named commands served from the daemon's event loop.

The wire format is vhostmap.control.client's: one JSON object per line each way.

Some commands belong to the connection they came on (`ConnectionHandler`): a netmap application's
registration lives exactly as long as its control connection, so a client that dies (its socket closes)
releases its rings. Such a command may answer with file descriptors, sent with the reply line in one
SCM_RIGHTS message (`vhostmap.control.client.request` reads it).

A client never stops the event loop it shares with every vhost-user port: nothing here blocks on its socket,
and a client's requests are answered one per turn of the loop, so a pile of them (sent in one write and never
read, or pipelined) waits behind everyone else's instead of holding the loop until all are answered.
Replies wait in the connection's transport buffer, and a client that lets them pile up beyond
MAX_UNSENT_REPLY_BYTES (it sends requests and never reads the answers) is disconnected; a reply with fds,
which must leave in one sendmsg after everything before it, waits at most SEND_TIMEOUT for the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from vhostmap.control.client import MAX_REQUEST
from vhostmap.system.unixsock import bind_listener

log = logging.getLogger(__name__)

#: Reply bytes a control client may leave unread (beyond its socket buffer) before it is disconnected; more
#: than the largest reply (``stats`` of every port), so only a client that keeps asking and never reads
#: reaches it.
MAX_UNSENT_REPLY_BYTES = 4 << 20
#: Seconds a reply with fds waits for the replies before it to leave, and for room in the socket.
SEND_TIMEOUT = 5.0


class SlowClient(Exception):
    """A control client that does not read its replies."""


Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


class Connection:
    """One control client's connection, as the commands bound to it see it."""

    def __init__(self, peer_pid: int | None = None) -> None:
        self.peer_pid = peer_pid
        self._closers: list[Callable[[], None]] = []
        self.state: dict[str, Any] = {}

    def on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` when the connection ends (the client closed it, or died)."""
        self._closers.append(release)

    def close(self) -> None:
        """Run the release callbacks, newest first; one failing does not stop the others."""
        while self._closers:
            release = self._closers.pop()
            try:
                release()
            except Exception:
                log.exception("control: releasing a connection's resources failed")


# A connection-bound command: the request and its connection in; the reply and the fds to send with it out.
ConnectionHandler = Callable[[Mapping[str, Any], Connection], tuple[dict[str, Any], list[int]]]


class ControlServer:
    """Serves named commands on a UNIX socket from the daemon's event loop."""

    def __init__(
        self,
        path: str,
        handlers: Mapping[str, Handler],
        connection_handlers: Mapping[str, ConnectionHandler] | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.connection_handlers = dict(connection_handlers or {})
        self._server: asyncio.AbstractServer | None = None
        self._bound = False

    async def start(self) -> None:
        """Bind the socket (a live one at the same path is an error) and start serving."""
        sock = bind_listener(self.path)
        self._bound = True
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST)

    async def close(self) -> None:
        """Stop serving and remove the socket, if it is ours (not another daemon's that made start fail)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._bound:
            self._bound = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(_peer_pid(writer.get_extra_info("socket")))
        try:
            while line := await reader.readline():
                reply, fds = await self._answer(line, conn)
                data = json.dumps(reply).encode() + b"\n"
                if fds:
                    await _send_with_fds(writer, data, fds)
                else:
                    # No drain: it would wait as long as the client does not read. The buffer is bounded
                    # instead.
                    writer.write(data)
                unsent = writer.transport.get_write_buffer_size()
                if unsent > MAX_UNSENT_REPLY_BYTES:
                    raise SlowClient(f"{unsent} bytes of replies unread, more than {MAX_UNSENT_REPLY_BYTES}")
                # readline returns the next buffered line without yielding: let the others have a turn.
                await asyncio.sleep(0)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError, SlowClient) as e:
            log.warning("control client (pid %s) dropped: %s", conn.peer_pid, e)
        finally:
            conn.close()
            writer.close()

    async def _answer(self, line: bytes, conn: Connection) -> tuple[dict[str, Any], list[int]]:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"request is not JSON: {e}"}, []
        cmd = request.get("cmd") if isinstance(request, dict) else None
        bound = self.connection_handlers.get(cmd) if isinstance(cmd, str) else None
        if bound is not None:
            try:
                result, fds = bound(request, conn)
            except (ValueError, KeyError, LookupError, OSError) as e:
                return {"ok": False, "error": str(e)}, []
            return {"ok": True, **result}, fds
        return await self._answer_plain(request), []

    async def _answer_plain(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a "cmd" string'}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        try:
            result = handler(request)
            if isinstance(result, Awaitable):
                result = await result
        except (ValueError, KeyError, LookupError) as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, **result}


async def _send_with_fds(writer: asyncio.StreamWriter, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` in one sendmsg, in order after what the transport still buffers, without
    blocking: asyncio's transport cannot carry fds, so this writes on a duplicate of its socket (the
    duplicate shares the non-blocking flag). Raises SlowClient when the client does not make room in
    SEND_TIMEOUT."""
    transport = writer.transport
    try:
        if transport.get_write_buffer_size():
            # Earlier replies first: drain() waits until the buffer is empty with a low-water mark of 0.
            transport.set_write_buffer_limits(high=0, low=0)
            try:
                await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)
            finally:
                transport.set_write_buffer_limits()
        loop = asyncio.get_running_loop()
        with writer.get_extra_info("socket").dup() as sock:
            while True:
                try:
                    sent = socket.send_fds(sock, [data], fds)
                    break
                except (BlockingIOError, InterruptedError):
                    await asyncio.wait_for(_writable(loop, sock), SEND_TIMEOUT)
    except TimeoutError:
        raise SlowClient(f"a reply with fds could not be sent in {SEND_TIMEOUT} s") from None
    # The fds went with the first byte; what the socket did not take follows as plain stream.
    if sent < len(data):
        writer.write(data[sent:])


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` (a duplicate, unknown to any transport) has room to write."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


def _peer_pid(sock: Any) -> int | None:
    """The pid of the process at the other end of a UNIX socket (SO_PEERCRED), if the kernel says."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", creds)[0])

"""The daemon's side of its control socket: named commands served from the daemon's event loop.

The wire format is vhostmap.control.client's: one JSON object per line each way.

Some commands belong to the connection they came on (`ConnectionHandler`): a netmap application's
registration lives exactly as long as its control connection, so a client that dies (its socket closes)
releases its rings. Such a command may answer with file descriptors, sent with the reply line in one
SCM_RIGHTS message (`vhostmap.control.client.request` reads it).
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
                    # The stream has nothing buffered (one request at a time): the reply and its fds go out
                    # in one sendmsg on a duplicate of the socket, which asyncio's transport does not offer.
                    # The socket stays non-blocking (a flag the duplicate shares); a short reply fits its
                    # empty send buffer.
                    with writer.get_extra_info("socket").dup() as sock:
                        socket.send_fds(sock, [data], fds)
                else:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as e:
            log.warning("control client dropped: %s", e)
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


def _peer_pid(sock: Any) -> int | None:
    """The pid of the process at the other end of a UNIX socket (SO_PEERCRED), if the kernel says."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", creds)[0])

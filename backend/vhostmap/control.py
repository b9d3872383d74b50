"""The daemon's control socket: one JSON object per line each way, over a UNIX stream socket.

A request is ``{"cmd": NAME, ...arguments}``; the reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": TEXT}``. ``vhostmap stats`` and the other CLI commands are clients of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]
MAX_REQUEST = 1 << 20


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


class ControlServer:
    """Serves named commands on a UNIX socket from the daemon's event loop."""

    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._bound = False

    async def start(self) -> None:
        """Bind the socket (a live one at the same path is an error) and start serving."""
        # Imported here: the CLI's client commands use this module and must not load the datapath (numpy).
        from vhostmap.vhost_user.server import bind_listener

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
        try:
            while line := await reader.readline():
                reply = await self._answer(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as e:
            log.warning("control client dropped: %s", e)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"request is not JSON: {e}"}
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


def call(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon at ``path`` and return its reply (raises ControlError)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no vhostmap daemon at {path} (is `vhostmap serve` running?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"no vhostmap daemon listens on {path} (stale socket)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the control connection")
            data += chunk
    finally:
        sock.close()
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return dict(reply)

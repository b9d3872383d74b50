"""The client side of the daemon's control socket: one JSON object per line each way.

A request is ``{"cmd": NAME, ...arguments}``; the reply is ``{"ok": true, ...}`` or
``{"ok": false, "error": TEXT}``, with any file descriptors it carries in the same SCM_RIGHTS message.
``vhostmap stats`` and the other CLI commands, the netmap application client (vhostmap.apps.client) and the
lab are clients; the daemon serves it (vhostmap.control.server).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

DEFAULT_RUN_DIR = "/run/vhostmap"
DEFAULT_CONTROL_SOCKET = f"{DEFAULT_RUN_DIR}/control.sock"
# Longest request line the daemon reads.
MAX_REQUEST = 1 << 20
# File descriptors one reply may carry.
MAX_REPLY_FDS = 16


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


def connect(path: str, timeout: float | None = 10.0) -> socket.socket:
    """A connection to the daemon's control socket at ``path`` (ControlError, with the likely cause)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise ControlError(f"no vhostmap daemon at {path} (is `vhostmap serve` running?)") from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(f"no vhostmap daemon listens on {path} (stale socket)") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"permission denied on {path}") from None
    return sock


def request(sock: socket.socket, cmd: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
    """Send one command on an open connection; its reply and the fds that came with it (the caller owns
    them). Raises ControlError for an error reply (closing any fds) or a closed connection."""
    sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
    data, fds = b"", []
    while not data.endswith(b"\n"):
        chunk, got, _, _ = socket.recv_fds(sock, 65536, MAX_REPLY_FDS)
        fds += got
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ControlError("the daemon closed the control connection")
        data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        for fd in fds:
            os.close(fd)
        raise ControlError(reply.get("error", "unknown error"))
    return dict(reply), fds


def call(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon at ``path`` and return its reply (raises ControlError)."""
    with connect(path, timeout) as sock:
        reply, fds = request(sock, cmd, **args)
    for fd in fds:  # a plain command has none; never leak what a confused daemon sent
        os.close(fd)
    return reply

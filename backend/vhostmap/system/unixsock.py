"""UNIX stream sockets: a listener that replaces stale socket files, and the fds that came with a message.

Shared by the vhost-user and ivshmem endpoints and the control socket; knows nothing of their protocols.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable

# sizeof(sun_path) (linux/un.h): a path and its terminating NUL.
UNIX_PATH_MAX = 108


class EndpointError(Exception):
    """A socket that cannot be served: path in use, missing permissions, bad directory."""


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS control message carried (recvmsg's ancillary data)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def bind_listener(
    path: str,
    on_stale: Callable[[str], None] | None = None,
    *,
    group: int | None = None,
    perm: int | None = None,
    owner: int | None = None,
) -> socket.socket:
    """A listening UNIX socket at ``path``; a stale socket file is replaced, a live one is an error.

    ``owner``, ``group`` and ``perm`` (permission bits) are set on the socket file before it listens, so no
    front-end connects while it is still open to more than asked (or unreachable by whom it was meant for).
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except PermissionError as e:
        raise EndpointError(f"cannot create directory {directory}: permission denied") from e
    except OSError as e:  # a path component is a file, a read-only file system...
        raise EndpointError(f"cannot create directory {directory}: {e.strerror}") from e
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise EndpointError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: a leftover of a process that died
        else:
            raise EndpointError(f"socket {path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        if e.errno in (errno.EACCES, errno.EPERM):
            raise EndpointError(f"cannot create socket {path}: permission denied") from e
        if e.errno == errno.ENAMETOOLONG or len(os.fsencode(path)) >= UNIX_PATH_MAX:
            raise EndpointError(
                f"socket path {path} is too long (UNIX sockets allow {UNIX_PATH_MAX - 1} bytes)"
            ) from e
        raise EndpointError(f"cannot bind {path}: {e.strerror}") from e
    try:
        if owner is not None or group is not None:
            os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
        if perm is not None:
            os.chmod(path, perm)
    except OSError as e:
        sock.close()
        os.unlink(path)
        raise EndpointError(f"cannot set owner/group/mode of socket {path}: {e.strerror}") from e
    sock.listen(1)
    sock.setblocking(False)
    return sock


#: Seconds a listener pauses after accept() failed for want of resources (EMFILE...): the pending connection
#: keeps the socket readable, so retrying at once would spin.
ACCEPT_RETRY_INTERVAL = 0.1
#: accept() errors that mean "no resources now", not "this listener is broken".
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """A listening UNIX socket (`bind_listener`) served by the running asyncio loop: each connection goes to
    ``on_accept``. When accept() fails for want of resources (out of fds, of memory), listening pauses for
    ACCEPT_RETRY_INTERVAL, after ``on_pause`` was told why, and resumes: the loop's other sockets keep being
    served meanwhile, and this one is not spun on."""

    def __init__(
        self,
        path: str,
        on_accept: Callable[[socket.socket], None],
        on_pause: Callable[[OSError], None],
        *,
        owner: int | None = None,
        group: int | None = None,
        perm: int | None = None,
    ) -> None:
        self.path = path
        self._on_accept, self._on_pause = on_accept, on_pause
        self.owner, self.group, self.perm = owner, group, perm
        self._listener: socket.socket | None = None
        self._paused: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Bind and listen (call from the event loop); EndpointError at once if the path cannot be served."""
        self._listener = bind_listener(self.path, owner=self.owner, group=self.group, perm=self.perm)
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            if e.errno not in _ACCEPT_RESOURCE_ERRORS:
                raise
            self._on_pause(e)
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._listener.fileno())
            self._paused = loop.call_later(ACCEPT_RETRY_INTERVAL, self._resume)
            return
        self._on_accept(sock)

    def _resume(self) -> None:
        self._paused = None
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

"""Sans-IO ivshmem client-server protocol (QEMU docs/specs/ivshmem-spec.rst, "The ivshmem Client-Server
Protocol").

The connection is one-way: the server sends messages, each an 8-byte little-endian signed number, some with
one file descriptor (SCM_RIGHTS). On connect a client is sent, in order: the protocol version (0); its ID;
-1 with the shared-memory fd; for each other peer, that peer's ID once per interrupt vector, each with the
eventfd that interrupts the peer on that vector; then its own ID once per vector, each with the eventfd it
is interrupted through. Later a peer's ID with an fd announces a new peer (one message per vector), and a
peer's ID without one says that peer is gone.

vhostmap is the server and also the guest's only peer (``DAEMON_PEER_ID``): the eventfds it announces for
itself are a passthrough port's kick eventfds, and the client's own ones are the port's interrupts. Here the
messages are built (``welcome``, ``peer_connected``, ``peer_gone``) as ``Message`` values the socket layer
sends one per sendmsg, so that each fd travels with its own 8 bytes (QEMU reads 8 bytes at a time and keeps
one fd per read). ``ClientConnection`` parses the stream as a client does, for the fake guests of the tests
and the lab: ``receive_data(bytes, fds)`` then ``next_event()``, as vhost_user/protocol.py does.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

IVSHMEM_PROTOCOL_VERSION = 0
# The value the shared-memory fd comes with.
SHM_MARKER = -1
# IDs are 16 bits: the Doorbell register holds the peer ID in its high 16 bits.
MAX_PEER_ID = 0xFFFF
# The guest of a port is the server's first (and only) client; the daemon announces itself as this peer.
GUEST_ID = 0
DAEMON_PEER_ID = 1

MESSAGE = struct.Struct("<q")


class IvshmemProtocolError(Exception):
    """The stream broke the protocol (what a client would close the connection for)."""


@dataclass(frozen=True)
class Message:
    """One server message: ``value`` (int64) and the fd that goes with it, if any."""

    value: int
    fd: int | None = None

    def encode(self) -> bytes:
        """The 8 bytes on the wire."""
        return MESSAGE.pack(self.value)


def _check_id(peer: int, what: str) -> None:
    if not 0 <= peer <= MAX_PEER_ID:
        raise ValueError(f"{what} {peer} outside 0..{MAX_PEER_ID}")


def welcome(
    client_id: int, shm_fd: int, peers: Mapping[int, Sequence[int]], own_vectors: Sequence[int]
) -> list[Message]:
    """Everything a new client is sent, in the spec's order: version, its ID, -1 with ``shm_fd``, each peer
    of ``peers`` (ID -> its vector eventfds, vector 0 first) once per vector, then ``client_id`` once per
    eventfd of ``own_vectors``. The fds stay the caller's (the socket layer sends copies)."""
    _check_id(client_id, "client ID")
    out = [
        Message(IVSHMEM_PROTOCOL_VERSION),
        Message(client_id),
        Message(SHM_MARKER, shm_fd),
    ]
    for peer, fds in peers.items():
        if peer == client_id:
            raise ValueError(f"peer {peer} has the client's own ID")
        out += peer_connected(peer, fds)
    out += [Message(client_id, fd) for fd in own_vectors]
    return out


def peer_connected(peer_id: int, vectors: Sequence[int]) -> list[Message]:
    """A peer's arrival: its ID once per vector, with the eventfd that interrupts it on that vector."""
    _check_id(peer_id, "peer ID")
    return [Message(peer_id, fd) for fd in vectors]


def peer_gone(peer_id: int) -> Message:
    """A peer's departure: its ID without an fd (the client drops the eventfds it had for it)."""
    _check_id(peer_id, "peer ID")
    return Message(peer_id)


# --- the client's side ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """The server's protocol version (checked: only IVSHMEM_PROTOCOL_VERSION is accepted)."""

    version: int


@dataclass(frozen=True)
class ClientId:
    """The ID the server gave this client (its IVPosition)."""

    client_id: int


@dataclass(frozen=True)
class SharedMemory:
    """The shared-memory fd (the receiver owns it)."""

    fd: int


@dataclass(frozen=True)
class PeerVector:
    """An eventfd that interrupts peer ``peer_id`` on ``vector`` (the receiver owns it)."""

    peer_id: int
    vector: int
    fd: int


@dataclass(frozen=True)
class OwnVector:
    """An eventfd this client is interrupted through on ``vector`` (the receiver owns it)."""

    vector: int
    fd: int


@dataclass(frozen=True)
class PeerGone:
    """Peer ``peer_id`` disconnected."""

    peer_id: int


Event = Version | ClientId | SharedMemory | PeerVector | OwnVector | PeerGone


class NeedData:
    """What ``next_event`` returns (as NEED_DATA) when no whole message is buffered."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ClientConnection:
    """The client's parser. Fds that arrive with a chunk belong to the message holding the chunk's last byte
    (a recvmsg ends after the data an fd came with, and each fd is sent with its own message); a message
    with more than one fd breaks the stream. Fds not handed out in an event are closed by ``close``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0  # stream position of _buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (position of the owning byte, fd)
        self.client_id: int | None = None
        self._stage = 0  # 0: version, 1: ID, 2: shared memory, 3: notifications
        self._vectors: dict[int, int] = {}

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Feed what a recvmsg returned (the parser owns ``fds`` from now on)."""
        end = self._start + len(self._buf) + len(data)
        for fd in fds:
            self._fds.append((end - 1 if data else end, fd))
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next event, NEED_DATA, or IvshmemProtocolError."""
        if len(self._buf) < MESSAGE.size:
            return NEED_DATA
        (value,) = MESSAGE.unpack_from(self._buf)
        last = self._start + MESSAGE.size - 1
        del self._buf[: MESSAGE.size]
        self._start += MESSAGE.size
        fds = []
        while self._fds and self._fds[0][0] <= last:
            fds.append(self._fds.popleft()[1])
        if len(fds) > 1:
            _close(fds)
            raise IvshmemProtocolError(f"{len(fds)} fds with one message ({value})")
        fd = fds[0] if fds else None
        try:
            return self._event(value, fd)
        except IvshmemProtocolError:
            _close(fds)
            raise

    def _event(self, value: int, fd: int | None) -> Event:
        stage = self._stage
        if stage < 2 and fd is not None:
            raise IvshmemProtocolError(f"an fd came with message {value} before the shared memory")
        if stage == 0:
            if value != IVSHMEM_PROTOCOL_VERSION:
                raise IvshmemProtocolError(f"server speaks version {value}, not {IVSHMEM_PROTOCOL_VERSION}")
            self._stage = 1
            return Version(value)
        if stage == 1:
            if not 0 <= value <= MAX_PEER_ID:
                raise IvshmemProtocolError(f"client ID {value} outside 0..{MAX_PEER_ID}")
            self.client_id, self._stage = value, 2
            return ClientId(value)
        if stage == 2:
            if value != SHM_MARKER or fd is None:
                raise IvshmemProtocolError(f"expected -1 with the shared memory fd, got {value} fd {fd}")
            self._stage = 3
            return SharedMemory(fd)
        if not 0 <= value <= MAX_PEER_ID:
            raise IvshmemProtocolError(f"peer ID {value} outside 0..{MAX_PEER_ID}")
        if fd is None:
            self._vectors.pop(value, None)
            return PeerGone(value)
        vector = self._vectors.get(value, 0)
        self._vectors[value] = vector + 1
        return OwnVector(vector, fd) if value == self.client_id else PeerVector(value, vector, fd)

    def close(self) -> None:
        """Close the fds received and not handed out."""
        _close([fd for _, fd in self._fds])
        self._fds.clear()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

"""Sans-IO vhost-user framing: bytes and fds in, typed messages out, and messages back to bytes.

Shaped like h11: ``receive_data(bytes, fds)`` feeds what a socket read returned (any split: part of a message
or several), ``next_event()`` hands out one ``Message`` at a time or ``NEED_DATA``. Nothing here touches a
socket. ``BackendConnection`` parses front-end requests and builds replies (docs/interop/vhost-user.rst,
"Message Specification", "Communication", "REPLY_ACK"); ``FrontendConnection`` is its mirror image, for the
lab front-end and tests. Both share one framer and one header codec.

File descriptors (SCM_RIGHTS) belong to the message that contains the last byte of the chunk they arrived
with; for an empty chunk, to the message that contains the next byte. That is the Linux stream-socket rule
seen from the reader's side: the kernel attaches fds to the first byte of the sendmsg() that carried them and
ends a recvmsg() after the data carrying fds, so the fds of a message sent in one sendmsg() (as QEMU and DPDK
send every message) arrive with a chunk whose last byte is in that message. The parser owns received fds
until it hands them out in a Message; it closes the fds of every message it rejects, and all it holds when
the stream breaks or ``close()`` is called. No message carries more than MAX_FDS fds, so more than that
arriving for one unfinished message (a payload sent a byte at a time, fds on every byte) breaks the stream
at once: what a peer makes the parser hold stays bounded.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vhostmap.vhost_user.errors import PayloadError, ProtocolError
from vhostmap.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    REQUESTS,
    U64,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    Empty,
    Payload,
    Request,
    expected_fds,
)

__all__ = [
    "NEED_DATA",
    "BackendConnection",
    "FrontendConnection",
    "Message",
    "NeedData",
    "Payload",
    "ack",
    "encode",
    "reply",
]


class NeedData:
    """What ``next_event`` returns (as NEED_DATA) when the buffered bytes do not hold a whole message yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True)
class Message:
    """One decoded vhost-user message: a request from the front-end, or a reply from the back-end.

    ``fds`` are owned by whoever received the Message: use them or close them.
    """

    request: Request
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        """The sender asked for a REPLY_ACK (VHOST_USER_NEED_REPLY_MASK)."""
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)


def encode(code: int, flags: int, body: bytes) -> bytes:
    """Frame ``body`` under a header; the one writer of headers (tests use it to forge malformed ones)."""
    return HEADER.pack(code, flags, len(body)) + body


def reply(request: Request | int, payload: Payload) -> bytes:
    """A back-end reply to ``request`` (version 1, REPLY flag) carrying ``payload``."""
    return encode(int(request), VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload.pack())


def ack(request: Request | int, ok: bool) -> bytes:
    """The REPLY_ACK answer to ``request``: u64 0 on success, 1 on failure."""
    return reply(request, U64(0 if ok else 1))


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _describe(counts: range) -> str:
    if len(counts) == 1:
        return str(counts.start)
    return f"{counts.start} to {counts.stop - 1}"


@dataclass(frozen=True)
class _Frame:
    code: int
    flags: int
    body: bytes
    fds: tuple[int, ...]


class _Framer:
    """Cuts the byte stream into frames (header + payload) and gives each frame its fds.

    Stream positions count bytes since the connection began. Each batch of fds is queued with the position
    of the byte whose message owns it (see the module docstring); a frame [start, end) takes the batches
    queued below ``end``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0  # stream position of _buf[0]
        self._fds: deque[tuple[int, list[int]]] = deque()
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes, fds: Sequence[int]) -> None:
        if self._broken is not None:
            _close_fds(fds)
            return
        end = self._start + len(self._buf) + len(data)
        if fds:
            self._fds.append((end - 1 if data else end, list(fds)))
        self._buf += data
        if fds:
            self._check_held_fds()

    def _check_held_fds(self) -> None:
        """Break the stream when the first unfinished frame has collected more fds than any message takes."""
        pos = 0  # offset in _buf of the first frame not complete yet
        while len(self._buf) - pos >= HEADER.size:
            size = HEADER.unpack_from(self._buf, pos)[2]
            if size > VHOST_USER_MAX_PAYLOAD_SIZE or len(self._buf) - pos < HEADER.size + size:
                break
            pos += HEADER.size + size
        first = self._start + pos
        held = sum(len(batch) for at, batch in self._fds if at >= first)
        if held > MAX_FDS:
            self._broken = ProtocolError(
                f"{held} fds attached to one unfinished message, more than any message takes ({MAX_FDS})",
                fatal=True,
            )
            self.close()

    def missing(self) -> int:
        """Bytes still missing from the first unfinished frame: its header, then the payload it announces;
        0 when a whole frame is buffered or the stream is broken (``next_frame`` has something to say)."""
        if self._broken is not None:
            return 0
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        size = HEADER.unpack_from(self._buf)[2]
        if size > VHOST_USER_MAX_PAYLOAD_SIZE:
            # An absurd size is next_frame's to reject (fatally), from the header alone: waiting for a
            # payload first would leave a front-end that sent only the header connected forever.
            return 0
        return max(HEADER.size + size - len(self._buf), 0)

    def next_frame(self) -> _Frame | None:
        if self._broken is not None:
            raise self._broken
        if len(self._buf) < HEADER.size:
            return None
        code, flags, size = HEADER.unpack_from(self._buf)
        if size > VHOST_USER_MAX_PAYLOAD_SIZE:
            # The size cannot be trusted, so neither can any later byte: the framing is lost for good.
            self._broken = ProtocolError(
                f"payload size {size} exceeds VHOST_USER_MAX_PAYLOAD_SIZE ({VHOST_USER_MAX_PAYLOAD_SIZE})",
                request=_request_or_none(code),
                code=code,
                need_reply=bool(flags & VHOST_USER_NEED_REPLY_MASK),
                fatal=True,
            )
            self.close()
            raise self._broken
        total = HEADER.size + size
        if len(self._buf) < total:
            return None
        body = bytes(self._buf[HEADER.size : total])
        del self._buf[:total]
        self._start += total
        fds: list[int] = []
        while self._fds and self._fds[0][0] < self._start:
            fds.extend(self._fds.popleft()[1])
        return _Frame(code, flags, body, tuple(fds))

    def close(self) -> None:
        while self._fds:
            _close_fds(self._fds.popleft()[1])


def _request_or_none(code: int) -> Request | None:
    try:
        return Request(code)
    except ValueError:
        return None


def _reject(frame: _Frame, request: Request | None, reason: str) -> ProtocolError:
    """Close the frame's fds and describe why it was skipped."""
    _close_fds(frame.fds)
    return ProtocolError(
        reason,
        request=request,
        code=frame.code,
        need_reply=bool(frame.flags & VHOST_USER_NEED_REPLY_MASK),
    )


def _check_header(frame: _Frame) -> Request:
    """The request a frame claims to be, after checking its code and version; raises ProtocolError."""
    request = _request_or_none(frame.code)
    if request is None:
        raise _reject(frame, None, f"unknown request code {frame.code}")
    version = frame.flags & VHOST_USER_VERSION_MASK
    if version != VHOST_USER_VERSION:
        raise _reject(
            frame, request, f"version {version} in flags {frame.flags:#x}, expected {VHOST_USER_VERSION}"
        )
    return request


class BackendConnection:
    """The back-end end of one vhost-user connection: parses front-end requests, builds replies.

    After a ProtocolError that is not ``fatal`` the offending message has been skipped (its fds closed) and
    the next message parses normally. After a fatal one every ``next_event`` raises it again.
    """

    def __init__(self) -> None:
        self._framer = _Framer()

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes read from the socket and the fds that came with them (the parser owns the fds now)."""
        self._framer.feed(data, fds)

    def missing(self) -> int:
        """How many bytes to read next: the rest of the message being received (0: call ``next_event``).
        Reading no further than this keeps the fds of the next message out of this one's read."""
        return self._framer.missing()

    def next_event(self) -> Message | NeedData:
        """The next complete request, or NEED_DATA; raises ProtocolError for a malformed one."""
        frame = self._framer.next_frame()
        if frame is None:
            return NEED_DATA
        request = _check_header(frame)
        spec = REQUESTS[request]
        try:
            payload = spec.payload.unpack(frame.body)
        except PayloadError as e:
            raise _reject(frame, request, e.reason) from None
        allowed = expected_fds(request, payload)
        if len(frame.fds) not in allowed:
            raise _reject(frame, request, f"{len(frame.fds)} fds attached, expected {_describe(allowed)}")
        return Message(request, frame.flags, payload, frame.fds)

    def close(self) -> None:
        """Close the fds of messages not complete yet (the connection is going away)."""
        self._framer.close()

    @staticmethod
    def reply(request: Request | int, payload: Payload) -> bytes:
        """A reply to ``request`` carrying ``payload``."""
        return reply(request, payload)

    @staticmethod
    def ack(request: Request | int, ok: bool) -> bytes:
        """The REPLY_ACK answer to ``request``."""
        return ack(request, ok)


class FrontendConnection:
    """The front-end end of one vhost-user connection: builds requests, parses the back-end's replies.

    A reply decodes to the reply payload the spec gives its request, to U64 for a REPLY_ACK, and to Empty
    when it has no payload (how a back-end signals a GET_CONFIG failure, and how DPDK answers SET_LOG_BASE).
    """

    def __init__(self) -> None:
        self._framer = _Framer()

    @staticmethod
    def request(req: Request, payload: Payload | None = None, *, need_reply: bool = False) -> bytes:
        """The bytes of request ``req`` carrying ``payload`` (Empty by default); fds travel beside them."""
        if payload is None:
            payload = Empty()
        expected = REQUESTS[req].payload
        if not isinstance(payload, expected):
            raise TypeError(f"{req.name} carries {expected.__name__}, not {type(payload).__name__}")
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        return encode(req, flags, payload.pack())

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes read from the socket and the fds that came with them."""
        self._framer.feed(data, fds)

    def next_event(self) -> Message | NeedData:
        """The next complete reply, or NEED_DATA; raises ProtocolError for a malformed one."""
        frame = self._framer.next_frame()
        if frame is None:
            return NEED_DATA
        request = _check_header(frame)
        if not frame.flags & VHOST_USER_REPLY_MASK:
            raise _reject(frame, request, f"flags {frame.flags:#x} lack VHOST_USER_REPLY_MASK")
        spec = REQUESTS[request]
        payload_class: type[Payload] = spec.reply or U64
        allowed = spec.reply_fds if spec.reply is not None else range(0, 1)
        try:
            payload = Empty() if not frame.body else payload_class.unpack(frame.body)
        except PayloadError as e:
            raise _reject(frame, request, f"reply: {e.reason}") from None
        if len(frame.fds) not in allowed:
            raise _reject(frame, request, f"reply with {len(frame.fds)} fds, expected {_describe(allowed)}")
        return Message(request, frame.flags, payload, frame.fds)

    def close(self) -> None:
        """Close the fds of replies not complete yet."""
        self._framer.close()

"""Typed errors of the vhost-user layer: malformed messages and guest addresses that cannot be used.

Each error carries what went wrong and where as attributes, so that callers and logs need not parse messages.
Errors that reject a value also derive from ValueError, so generic handlers still work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostmap.vhost_user.messages import Request


class VhostUserError(Exception):
    """Base class of every error raised by vhostmap.vhost_user."""


class PayloadError(VhostUserError, ValueError):
    """Payload bytes that do not decode into the layout their request carries (``reason`` says why).

    The parser turns it into a ProtocolError naming the request; payload classes raise it on their own.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ProtocolError(VhostUserError, ValueError):
    """A message from the peer that breaks the vhost-user protocol.

    ``request`` is the request the message claims to be (None when the code is unknown or the header is
    unreadable), ``code`` the raw request code when the header was complete, ``need_reply`` whether the
    sender asked for a REPLY_ACK, ``reason`` what is wrong. ``fatal`` means the byte stream cannot be trusted
    any more (framing lost): the connection is unusable and must be dropped. A non-fatal error skipped
    exactly the offending message; the caller may answer it with a failure ack and read on.
    """

    def __init__(
        self,
        reason: str,
        *,
        request: Request | None = None,
        code: int | None = None,
        need_reply: bool = False,
        fatal: bool = False,
    ) -> None:
        self.reason = reason
        self.request = request
        self.code = code
        self.need_reply = need_reply
        self.fatal = fatal
        if request is not None:
            where = request.name
        elif code is not None:
            where = f"request code {code}"
        else:
            where = "message"
        super().__init__(f"{where}: {reason}")


class GuestMemoryError(VhostUserError, ValueError):
    """A guest memory range that cannot be used: ``address`` and ``length`` name the range (guest-physical,
    front-end virtual or log offset, as ``reason`` says), ``reason`` what is wrong with it."""

    def __init__(self, address: int, length: int, reason: str) -> None:
        self.address = address
        self.length = length
        self.reason = reason
        super().__init__(f"{address:#x}+{length:#x}: {reason}")

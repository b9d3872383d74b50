"""Running under systemd (service/vhostmap.service): log records into the journal with their fields, and
tell the service manager when the daemon is ready and when it stops (sd_notify), through systemd-python
(the ``service`` extra).

The daemon's log records carry what they are about as ``extra`` attributes (``port``, ``queue``, ``ring``,
``reason``, ``switch``); in the journal they become the fields PORT, QUEUE, RING, REASON and SWITCH, so that
``journalctl -u vhostmap PORT=vm1`` shows one port's story. Without systemd-python, or outside the journal,
records go to stderr as lines and notifications nowhere.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

#: Record attributes that become journal fields (upper-cased).
FIELDS = ("port", "queue", "ring", "reason", "switch")
SYSLOG_IDENTIFIER = "vhostmap"


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: systemd says so in JOURNAL_STREAM (device:inode of it), the
    sign for a service to use the journal's own protocol instead (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _fields(record: logging.LogRecord) -> bool:
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            setattr(record, name.upper(), str(value))
    return True


def journal_handler() -> logging.Handler | None:
    """A handler writing records into the journal with their fields, or None without systemd-python."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    handler.addFilter(_fields)
    return handler


def notify(state: str) -> None:
    """sd_notify ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) when the service manager asked
    for notifications (NOTIFY_SOCKET) and systemd-python is there; nothing otherwise."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd.daemon import notify as sd_notify
    except ImportError:
        log.warning("NOTIFY_SOCKET is set but systemd-python is missing: install vhostmap[service]")
        return
    try:
        sd_notify(state)
    except OSError as e:  # the manager went away, or a socket the daemon's user may not write to
        log.warning("cannot notify the service manager (%s): %s", state, e)

"""Local netmap applications on the daemon's ports: the daemon's half of `vhostmap.apps.client`.

An application registers (NIOCREGIF) through the control socket and gets the allocator's memfd plus two
eventfds: ``kick`` (the application moved head: sync my rings) and ``irq`` (tail moved on one of your rings).
Like netmap's sync kloop (and ptnetmap), the syncs themselves run here, in the datapath worker: a
`ClientSession` is the registration, and `PortClients` the forwarder that serves every session on one port.
Each sync starts with the kring prologue, so an application that writes nonsense into its ring gets the ring
reinitialised (logged, counted in ``reinits``/``errors``) and nothing else is affected.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from vhostmap.datapath import eventfds
from vhostmap.netmap.adapter import REG_MODES, NetmapAdapter, Registration
from vhostmap.netmap.errors import BadRingId
from vhostmap.netmap.kring import Kring

log = logging.getLogger(__name__)


class ClientSession:
    """One application's registration on a port (``spec`` is the name it opened), with its two eventfds."""

    def __init__(self, reg: Registration, spec: str, pid: int | None = None) -> None:
        self.reg = reg
        self.spec = spec
        self.pid = pid
        self.krings: list[Kring] = reg.tx_krings + reg.rx_krings
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            os.close(self.kick)
            raise
        # Why the application is not interrupted any more (its irq eventfd made a write sleep), or None.
        self.irq_refused: str | None = None

    @property
    def closed(self) -> bool:
        """Whether the session has ended."""
        return self.kick < 0

    @property
    def binds_host_rings(self) -> bool:
        """Whether the registration includes the port's host rings."""
        return any(k.host for k in self.krings)

    def run(self) -> bool:
        """txsync and rxsync every bound ring; interrupt the application when a tail moved. True if so."""
        before = [k.rtail for k in self.krings]
        self.reg.txsync()
        self.reg.rxsync()
        if [k.rtail for k in self.krings] == before:
            return False
        if self.irq_refused is None:
            self._interrupt()
        return True

    def _interrupt(self) -> None:
        """Signal the irq eventfd, never waiting for the application: it shares the eventfd and may have made
        it blocking and full."""
        result = eventfds.signal(self.irq)
        # A full counter is a wake-up the application has not consumed yet: nothing is lost.
        if result in (eventfds.Signal.OK, eventfds.Signal.FULL):
            return
        # It made the write sleep (or broke the fd): no more interrupts for it, rather than a millisecond of
        # every port's datapath per sync. Its rings still sync on every kick: a polling application goes on.
        self.irq_refused = eventfds.SIGNAL_FAILURES[result]
        log.error(
            "application %s (pid %s) on %s: irq eventfd refused, no more interrupts: %s",
            self.spec,
            self.pid,
            self.reg.adapter.name,
            self.irq_refused,
        )

    def stats(self) -> dict[str, Any]:
        """What the session is and what its rings went through."""
        return {
            "port": self.spec,
            "adapter": self.reg.adapter.name,
            "mode": REG_MODES[self.reg.mode],
            "pid": self.pid,
            "rings": [k.name for k in self.krings],
            "reinits": sum(k.reinits for k in self.krings),
            "errors": sum(k.errors for k in self.krings),
            "irq_refused": self.irq_refused,
        }

    def close(self) -> None:
        """Unregister, close the eventfds (the application's copies stay valid, but quiet). Idempotent."""
        if self.closed:
            return
        with contextlib.suppress(BadRingId):
            self.reg.adapter.unregister(self.reg)
        for fd in (self.kick, self.irq):
            os.close(fd)
        self.kick = self.irq = -1


class PortClients:
    """The forwarder of a port held by applications: runs every session's syncs when any of them kicks or
    the port signals work. Rings no session binds are not served, as with netmap on a NIC."""

    def __init__(self, adapter: NetmapAdapter) -> None:
        self.adapter = adapter
        self.sessions: list[ClientSession] = []
        self.name = f"clients {adapter.name}"
        # Applications get plain frames, whatever an earlier forwarder of the port let them keep.
        adapter.pass_offloads(0)
        if adapter.host_port is not None:
            adapter.host_port.pass_offloads(0)

    def add(self, reg: Registration, spec: str, pid: int | None = None) -> ClientSession:
        """A session for ``reg``; its rings must not be bound by another session (BadRingId: busy)."""
        busy = [k.name for k in reg.tx_krings + reg.rx_krings if k.users > 1]
        if busy:
            raise BadRingId(self.adapter.name, f"ring(s) {', '.join(busy)} already bound by another client")
        session = ClientSession(reg, spec, pid)
        self.sessions.append(session)
        return session

    def remove(self, session: ClientSession) -> None:
        """End ``session``."""
        self.sessions.remove(session)
        session.close()

    def rx_queues(self) -> list[tuple[NetmapAdapter, int]]:
        """The port's first receive queue: every session runs on the datapath thread that owns it."""
        return [(self.adapter, 0)]

    def wake_fds(self) -> list[int]:
        """Kicks of the sessions and the port's own fds; the host stack's only if a session binds the host
        rings (an unread TAP would keep the worker awake)."""
        host = set(self.adapter.host_port.wake_fds()) if self.adapter.host_port is not None else set()
        wanted = any(s.binds_host_rings for s in self.sessions)
        own = [fd for fd in self.adapter.wake_fds() if wanted or fd not in host]
        return [*(s.kick for s in self.sessions), *own]

    def run(self) -> bool:
        """One sync round for every session."""
        moved = False
        for s in self.sessions:
            moved |= s.run()
        return moved

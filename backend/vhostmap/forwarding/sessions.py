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
import os
from typing import Any

from vhostmap.netmap.adapter import REG_MODES, NetmapAdapter, Registration
from vhostmap.netmap.errors import BadRingId
from vhostmap.netmap.kring import Kring


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
        with contextlib.suppress(BlockingIOError):  # saturated counter: the application has a wake-up already
            os.eventfd_write(self.irq, 1)
        return True

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

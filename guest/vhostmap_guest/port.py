"""A NetmapPort over an adapter living in this process: the guest's ports, native and generic alike.

The application's `UserRing`s are views of the same rings the adapter's krings sync, in the same memory:
``txsync()``/``rxsync()`` run the adapter's sync (prologue, hook, finalize) right here, as netmap's ioctls run
the kernel's. ``poll`` syncs, and while nothing is ready sleeps in the adapter's way of waiting (an interrupt
from /dev/uioN, a readable packet socket) or, without one, spins (busy polling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from vhostmap.netmap.abi import NetmapIfView
from vhostmap.netmap.adapter import Registration
from vhostmap.netmap.errors import PortBroken
from vhostmap.netmap.user import POLLIN, POLLOUT, UserRing, ready_events

# wait(events, timeout): sleep until the rings may have changed for ``events``, at most ``timeout`` seconds.
Waiter = Callable[[int, float], None]


class AdapterPort:
    """A NetmapPort (vhostmap.netmap.user) over ``registration`` of an in-process adapter.

    ``wait`` sleeps until something may be ready (None: busy polling); ``release`` runs once at close, after
    the registration is dropped (it closes the adapter and its memory, gives a device back...). Syncs of a
    broken adapter raise PortBroken with the reason the adapter logged.
    """

    def __init__(
        self,
        name: str,
        registration: Registration,
        *,
        wait: Waiter | None,
        release: Callable[[], None],
        mode: str,
    ) -> None:
        self.name = name
        self.mode = mode
        self.adapter = registration.adapter
        self.registration = registration
        self._wait = wait
        self._release: Callable[[], None] | None = release
        nifp = NetmapIfView(self.adapter.memory.region, registration.nifp.offset)
        buffers = self.adapter.memory.buffer_rows()
        r = registration
        self.tx_rings = [UserRing(nifp.tx_rings[i], buffers) for i in range(r.tx_first, r.tx_last)]
        self.rx_rings = [UserRing(nifp.rx_rings[i], buffers) for i in range(r.rx_first, r.rx_last)]

    @property
    def closed(self) -> bool:
        """Whether `close` ran."""
        return self._release is None

    def _check(self) -> None:
        if self._release is None:
            raise ValueError(f"{self.name}: port is closed")
        if self.adapter.broken is not None:
            raise PortBroken(self.name, self.adapter.broken)

    def txsync(self) -> None:
        """NIOCTXSYNC on every bound TX ring."""
        self._check()
        self.registration.txsync()
        self._check()

    def rxsync(self) -> None:
        """NIOCRXSYNC on every bound RX ring."""
        self._check()
        self.registration.rxsync()
        self._check()

    def poll(self, events: int = POLLIN, timeout: float | None = None) -> int:
        """Sync as netmap's poll does, and wait (at most ``timeout`` s) until ``events`` are ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        reg = self.registration
        while True:
            self._check()
            if events & POLLOUT or reg.tx_poll:
                reg.txsync()
            if events & POLLIN or reg.rx_poll:
                reg.rxsync()
            self._check()
            ready = ready_events(self, events)
            if ready:
                return ready
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return 0
            if self._wait is not None:
                self._wait(events, left)

    def close(self) -> None:
        """Release the rings (and whatever the port holds). Idempotent."""
        release, self._release = self._release, None
        if release is None:
            return
        try:
            if self.registration in self.adapter.registrations:
                self.adapter.unregister(self.registration)
        finally:
            release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tx_rings)} TX / {len(self.rx_rings)} RX rings"
        return f"<{type(self).__name__} {self.name} {self.mode}: {state}>"

"""``vhostmap serve``: builds the ports and forwarders of a configuration and runs them until stopped.

The control plane (vhost-user sockets, the control socket) runs on an asyncio loop in the main thread; the
datapath runs in one worker thread. Both meet at the worker's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

from vhostmap import __version__
from vhostmap.config import DaemonConfig, format_mac
from vhostmap.control import ControlServer
from vhostmap.forward import Link, Sink
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.vhost_user.port import PORT_RING_SLOTS, VhostUserPort
from vhostmap.vhost_user.server import Endpoint, SocketMode
from vhostmap.worker import Forwarder, Worker

log = logging.getLogger(__name__)

# Buffers beyond the ports' own rings, for clients and in-flight swaps.
SPARE_BUFFERS = 4096


def allocator_params(config: DaemonConfig) -> AllocatorParams:
    """An allocator big enough for every ring of every port (one buffer per slot) plus spares."""
    rings = sum(2 * (p.queues + 1) for p in config.ports)
    return AllocatorParams(
        ring_num=max(rings, 16),
        buf_num=rings * PORT_RING_SLOTS + SPARE_BUFFERS,
    )


class Daemon:
    """Every port, forwarder and socket of one running vhostmap."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.memory = NetmapMemory(allocator_params(config))
        self.worker = Worker()
        self.ports: dict[str, VhostUserPort] = {}
        for pc in config.ports:
            self.ports[pc.name] = VhostUserPort(pc, self.memory, self.worker.lock, self.worker.refresh)
        linked = {n for pair in config.links for n in pair}
        self.forwarders: list[Forwarder] = [Link(self.ports[a], self.ports[b]) for a, b in config.links]
        self.forwarders += [Sink(p) for name, p in self.ports.items() if name not in linked]
        self.endpoints = [Endpoint(self.ports[pc.name], pc.path, SocketMode(pc.mode)) for pc in config.ports]
        self.control = ControlServer(config.control_socket, {"stats": self.stats, "status": self.status})
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until ``stop()``, or SIGINT/SIGTERM when ``handle_signals`` (main thread only)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stopping.set)
        self.worker.start()
        for fwd in self.forwarders:
            self.worker.add(fwd)
        started: list[Endpoint] = []
        try:
            await self.control.start()
            for ep in self.endpoints:
                ep.start()
                started.append(ep)
            log.info("vhostmap %s serving %d port(s)", __version__, len(self.ports))
            self.ready.set()
            await self._stopping.wait()
        finally:
            for ep in started:
                ep.close()
            await self.control.close()
            self.worker.stop()
            for port in self.ports.values():
                port.close()
            self.memory.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):
                    loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Ask ``run`` to return (from any thread)."""
        if self._stopping is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    # --- control commands ---------------------------------------------------------------------------------
    def stats(self, request: Any) -> dict[str, Any]:
        """Per-port and per-queue counters."""
        with self.worker.lock:
            return {"ports": {name: port.stats_dict() for name, port in self.ports.items()}}

    def status(self, request: Any) -> dict[str, Any]:
        """Ports, their sockets and connection state."""
        with self.worker.lock:
            ports = {
                ep.handler.name: {
                    "path": ep.path,
                    "mode": ep.mode.value,
                    "connected": ep.is_connected,
                    "mac": format_mac(self.ports[ep.handler.name].device.mac),
                    "broken": self.ports[ep.handler.name].device.broken,
                }
                for ep in self.endpoints
            }
        return {"version": __version__, "ports": ports, "memory": self.memory.stats()}

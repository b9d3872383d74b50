"""``vhostmap serve``: builds the ports and forwarders of a configuration and runs them until stopped.

The control plane (vhost-user sockets, the control socket) runs on an asyncio loop in the main thread; the
datapath runs in one worker thread. Both meet at the worker's lock.

Every port is consumed by exactly one forwarder: the link it is in, the switch it is attached to, else a
HostBridge (a port with host rings: it and its TAP are cross-connected) or a Sink. Switch ports attach and
detach at run time (``switch`` control command), under the worker's lock, so the other ports' traffic never
sees a half-made change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

from vhostmap import __version__
from vhostmap.config import DaemonConfig, PortConfig, SwitchConfig, format_mac
from vhostmap.control import ControlServer
from vhostmap.forward import Link, Sink
from vhostmap.hostbridge import HostBridge
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.generic import GenericAdapter
from vhostmap.netmap.host import HostStack
from vhostmap.switch import Switch
from vhostmap.vhost_user.port import PORT_RING_SLOTS, VhostUserPort
from vhostmap.vhost_user.server import Endpoint, SocketMode
from vhostmap.vm import libvirt_access_problems
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
        # Every port, by name; ``ports`` holds the vhost-user ones (the sockets' handlers).
        self.adapters: dict[str, NetmapAdapter] = {}
        self.ports: dict[str, VhostUserPort] = {}
        try:
            for pc in config.ports:
                self.adapters[pc.name] = self._make_port(pc)
        except BaseException:
            for adapter in self.adapters.values():
                adapter.close()
            self.memory.close()
            raise
        # The forwarder that consumes each port's rings.
        self.serving: dict[str, Forwarder] = {}
        for a, b in config.links:
            self.serving[a] = self.serving[b] = Link(self.adapters[a], self.adapters[b])
        self.switches: dict[str, Switch] = {}
        for sc in config.switches:
            sw = self.switches[sc.name] = Switch(sc.name, aging=sc.aging)
            for name in sc.ports:
                sw.attach(self.adapters[name])
                self.serving[name] = sw
        for name, adapter in self.adapters.items():
            if name not in self.serving:
                self.serving[name] = self._solo(adapter)
        self.forwarders: list[Forwarder] = list(self.switches.values())
        self.forwarders += [f for f in dict.fromkeys(self.serving.values()) if f not in self.forwarders]
        self.endpoints = [
            Endpoint(
                self.ports[pc.name],
                pc.path,
                SocketMode(pc.mode),
                owner=pc.uid,
                group=pc.gid,
                perm=pc.socket_perm,
            )
            for pc in config.ports
            if pc.name in self.ports
        ]
        self.control = ControlServer(
            config.control_socket, {"stats": self.stats, "status": self.status, "switch": self.switch}
        )
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()

    def _make_port(self, pc: PortConfig) -> NetmapAdapter:
        """The adapter of one configured port, with its host rings bound to a TAP when ``host=``."""
        adapter: NetmapAdapter
        if pc.type == "generic":
            assert pc.ifname is not None  # checked by PortConfig
            adapter = GenericAdapter(pc.name, self.memory, pc.ifname, num_desc=PORT_RING_SLOTS)
        else:
            port = VhostUserPort(pc, self.memory, self.worker.lock, self.worker.refresh)
            self.ports[pc.name] = port
            adapter = port
        if pc.host is not None:
            try:
                HostStack(adapter, pc.host)
            except BaseException:
                adapter.close()
                self.ports.pop(pc.name, None)
                raise
        return adapter

    @staticmethod
    def _solo(adapter: NetmapAdapter) -> Forwarder:
        """The forwarder of a port attached to nothing: its TAP if it has host rings, else a sink."""
        return HostBridge(adapter) if adapter.host_port is not None else Sink(adapter)

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
            listening = {ep.handler.name: ep.path for ep in self.endpoints if ep.mode is SocketMode.SERVER}
            for problem in libvirt_access_problems(listening):
                log.warning("%s", problem)
            self.ready.set()
            await self._stopping.wait()
        finally:
            for ep in started:
                ep.close()
            await self.control.close()
            self.worker.stop()
            for adapter in self.adapters.values():
                adapter.close()
            self.memory.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):
                    loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Ask ``run`` to return (from any thread); nothing to do once it has."""
        if self._stopping is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: run() returned already
                self._loop.call_soon_threadsafe(self._stopping.set)

    # --- control commands ---------------------------------------------------------------------------------
    def stats(self, request: Any) -> dict[str, Any]:
        """Per-port and per-queue counters (host rings' too), and the switches' when there are any."""
        with self.worker.lock:
            reply: dict[str, Any] = {
                "ports": {name: port_stats(adapter) for name, adapter in self.adapters.items()}
            }
            if self.switches:
                reply["switches"] = {name: sw.stats() for name, sw in self.switches.items()}
            return reply

    def status(self, request: Any) -> dict[str, Any]:
        """Ports, their sockets and connection state."""
        with self.worker.lock:
            ports = {
                ep.handler.name: {
                    "path": ep.path,
                    "mode": ep.mode.value,
                    "connected": ep.is_connected,
                    "mac": format_mac(self.ports[ep.handler.name].device.mac),
                    "queues": self.config.port(ep.handler.name).queues,
                    "mtu": self.config.port(ep.handler.name).mtu,
                    "broken": self.ports[ep.handler.name].device.broken,
                }
                for ep in self.endpoints
            }
            for name, adapter in self.adapters.items():
                if isinstance(adapter, GenericAdapter):
                    ports[name] = {"type": "generic", "ifname": adapter.ifname, "broken": adapter.broken}
                if adapter.host_port is not None:
                    ports[name]["host"] = adapter.host_port.name
                ports[name]["forwarder"] = self.serving[name].name
            switches = {name: [p.name for p in sw.ports] for name, sw in self.switches.items()}
        return {
            "version": __version__,
            "ports": ports,
            "switches": switches,
            "memory": self.memory.stats(),
        }

    def switch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The ``switch`` control command (vale-ctl's job).

        ``{"op": "attach"|"detach", "switch": NAME, "port": NAME}`` attaches a port to a switch (made if
        missing) or detaches it (it goes back to its TAP or a sink); ``{"op": "list"[, "switch": NAME]}``
        lists switches with their ports, counters and learnt addresses.
        """
        op = request.get("op")
        name = request.get("switch")
        if op == "list":
            with self.worker.lock:
                if name is not None and name not in self.switches:
                    raise LookupError(f"no switch named {name!r}")
                return {
                    "switches": {
                        n: sw.stats() for n, sw in self.switches.items() if name is None or n == name
                    }
                }
        port = request.get("port")
        if op not in ("attach", "detach") or not isinstance(name, str) or not isinstance(port, str):
            raise ValueError(
                'switch: expected {"op": "attach"|"detach"|"list", "switch": NAME, "port": NAME}'
            )
        if op == "attach":
            self.attach(name, port)
        else:
            self.detach(name, port)
        return {"switch": name, "port": port, "ports": [p.name for p in self.switches[name].ports]}

    def attach(self, switch: str, port: str) -> Switch:
        """Attach ``port`` to ``switch`` (created if missing) at run time; the switch.

        Raises LookupError for an unknown port, ValueError for a port already on a switch or in a link, or a
        switch name that is not valid.
        """
        with self.worker.lock:
            adapter = self._adapter(port)
            current = self.serving[port]
            if isinstance(current, Switch):
                raise ValueError(f"port {port!r} is already attached to switch {current.name!r}")
            if isinstance(current, Link):
                raise ValueError(f"port {port!r} is in a link ({current.name}); links are fixed at start")
            sw = self.switches.get(switch)
            if sw is None:
                SwitchConfig(switch)  # a valid name, or ConfigError (a ValueError)
                sw = Switch(switch)
            sw.attach(adapter)
            if switch not in self.switches:
                self.switches[switch] = sw
                self.worker.add(sw)
            with contextlib.suppress(ValueError):  # the worker dropped it already (it had failed)
                self.worker.remove(current)
            self.serving[port] = sw
            self.worker.refresh()
        log.info("port %s attached to switch %s", port, switch, extra={"port": port, "switch": switch})
        return sw

    def detach(self, switch: str, port: str) -> None:
        """Detach ``port`` from ``switch`` at run time: it goes back to its TAP (host=) or to a sink.

        Raises LookupError for an unknown switch or port, ValueError when the port is not on that switch.
        """
        with self.worker.lock:
            sw = self.switches.get(switch)
            if sw is None:
                raise LookupError(f"no switch named {switch!r}")
            adapter = self._adapter(port)
            if self.serving[port] is not sw:
                raise ValueError(f"port {port!r} is not attached to switch {switch!r}")
            sw.detach(adapter)
            solo = self.serving[port] = self._solo(adapter)
            self.worker.add(solo)
        log.info("port %s detached from switch %s", port, switch, extra={"port": port, "switch": switch})

    def _adapter(self, port: str) -> NetmapAdapter:
        adapter = self.adapters.get(port)
        if adapter is None:
            raise LookupError(f"no port named {port!r}")
        return adapter


def port_stats(adapter: NetmapAdapter) -> dict[str, Any]:
    """The counters of one port in the shape of VhostUserPort.stats_dict (queues, totals, broken), plus the
    generic adapter's own counters and its host rings' (``host``) when it has them."""
    out: dict[str, Any]
    if isinstance(adapter, VhostUserPort):
        out = adapter.stats_dict()
    elif isinstance(adapter, GenericAdapter):
        g = adapter.counters()
        queue = {
            "rx_packets": g["rx_packets"],
            "rx_bytes": g["rx_bytes"],
            "rx_dropped": g["rx_drops"] + g["rx_oversize"] + g["kernel_drops"],
            "tx_packets": g["tx_packets"],
            "tx_bytes": g["tx_bytes"],
            "tx_dropped": g["tx_drops"],
            "errors": 0,
        }
        out = {"queues": [{"queue": 0, **queue}], "totals": queue, "broken": adapter.broken, "generic": g}
    else:
        out = {"queues": [], "totals": {}, "broken": adapter.broken}
    if isinstance(adapter.host_port, HostStack):
        out["host"] = {"tap": adapter.host_port.name, **adapter.host_port.counters()}
    return out

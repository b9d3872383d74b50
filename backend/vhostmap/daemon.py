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
from vhostmap.clients import ClientSession, PortClients
from vhostmap.config import DaemonConfig, PortConfig, SwitchConfig, format_mac
from vhostmap.control import Connection, ControlServer
from vhostmap.forward import Link, Sink, Source
from vhostmap.hostbridge import HostBridge
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.generic import GenericAdapter
from vhostmap.netmap.host import HostStack
from vhostmap.netmap.pipe import PipeEnd, make_pipe
from vhostmap.netmap.stash import STASH_BUFFERS
from vhostmap.netmap.user import parse_port_spec
from vhostmap.switch import Switch
from vhostmap.vhost_user.port import PORT_RING_SLOTS, VhostUserPort
from vhostmap.vhost_user.server import Endpoint, SocketMode
from vhostmap.virtio.spec import feature_names
from vhostmap.vm import libvirt_access_problems
from vhostmap.worker import Forwarder, Worker, pin_current_thread

log = logging.getLogger(__name__)

# Buffers beyond the ports' own rings, for in-flight swaps.
SPARE_BUFFERS = 4096
# Switch ports applications may open at once (``vale0:app``), and the slots of each of their rings.
CLIENT_PORTS = 8
CLIENT_RING_SLOTS = 512


def allocator_params(config: DaemonConfig) -> AllocatorParams:
    """An allocator big enough for every ring of every port (one buffer per slot) and the buffer stash of
    every vhost-user port, room for CLIENT_PORTS application switch ports (a pipe: four rings) and spares."""
    rings = sum(2 * (p.queues + 1) for p in config.ports)
    stashes = sum(p.type == "vhost-user" for p in config.ports)
    return AllocatorParams(
        ring_num=rings + 4 * CLIENT_PORTS,
        buf_num=rings * PORT_RING_SLOTS
        + stashes * STASH_BUFFERS
        + 4 * CLIENT_PORTS * CLIENT_RING_SLOTS
        + SPARE_BUFFERS,
    )


class Daemon:
    """Every port, forwarder and socket of one running vhostmap."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.memory = NetmapMemory(allocator_params(config))
        self.worker = Worker(poll=config.poll, cpu=config.cpu)
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
        # Ports held by local applications (their forwarder), and the pipes of their switch ports.
        self.clients: dict[str, PortClients] = {}
        self.pipes: dict[str, tuple[PipeEnd, PipeEnd]] = {}
        self.control = ControlServer(
            config.control_socket,
            {"stats": self.stats, "status": self.status, "switch": self.switch},
            {"register": self.register_client, "client_stats": self.client_stats},
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
            port = VhostUserPort(
                pc, self.memory, self.worker.lock, self.worker.refresh, poll=self.worker.poll
            )
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

    def _solo(self, adapter: NetmapAdapter) -> Forwarder:
        """The forwarder of a port attached to nothing: its TAP if it has host rings, its generator if it has
        ``generate=``, else a sink."""
        if adapter.host_port is not None:
            return HostBridge(adapter)
        length = self.config.port(adapter.name).generate if adapter.name in self.ports else None
        if length is not None:
            assert isinstance(adapter, VhostUserPort)
            return Source(adapter, length)
        return Sink(adapter)

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until ``stop()``, or SIGINT/SIGTERM when ``handle_signals`` (main thread only)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stopping.set)
        started: list[Endpoint] = []
        try:
            self.worker.start()  # in the try: a CPU the kernel refuses still gets everything cleaned up
            for fwd in self.forwarders:
                self.worker.add(fwd)
            if self.config.control_cpu is not None:
                # After the worker started: a thread starts on the CPUs of the thread that made it.
                pin_current_thread(self.config.control_cpu, "control thread")
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
            with self.worker.lock:  # application connections may still be closing on this loop
                for clients in self.clients.values():
                    for session in clients.sessions:
                        session.close()
                self.clients.clear()
                for adapter in self.adapters.values():
                    adapter.close()
                for _, slave in self.pipes.values():
                    slave.close()
                self.pipes.clear()
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
                    "features": feature_names(self.ports[ep.handler.name].device.features),
                }
                for ep in self.endpoints
            }
            for name, adapter in self.adapters.items():
                if isinstance(adapter, GenericAdapter):
                    ports[name] = {"type": "generic", "ifname": adapter.ifname, "broken": adapter.broken}
                elif isinstance(adapter, PipeEnd):
                    ports[name] = {"type": "application", "broken": adapter.broken}
                if adapter.host_port is not None:
                    ports[name]["host"] = adapter.host_port.name
                ports[name]["forwarder"] = self.serving[name].name
            switches = {name: [p.name for p in sw.ports] for name, sw in self.switches.items()}
            clients = [s.stats() for c in self.clients.values() for s in c.sessions]
        return {
            "version": __version__,
            "ports": ports,
            "switches": switches,
            "clients": clients,
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
            current = self.serving.get(port)
            if isinstance(current, Switch):
                raise ValueError(f"port {port!r} is already attached to switch {current.name!r}")
            if isinstance(current, Link):
                raise ValueError(f"port {port!r} is in a link ({current.name}); links are fixed at start")
            if isinstance(current, Source):
                raise ValueError(
                    f"port {port!r} feeds its guest from a generator (generate=); not on a switch"
                )
            sw = self.switches.get(switch)
            if sw is None:
                SwitchConfig(switch)  # a valid name, or ConfigError (a ValueError)
                sw = Switch(switch)
            sw.attach(adapter)
            if switch not in self.switches:
                self.switches[switch] = sw
                self.worker.add(sw)
            if current is not None:  # None: an application's new switch port
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
            if port in self.pipes:
                raise ValueError(f"port {port!r} belongs to an application and goes with it")
            sw.detach(adapter)
            solo = self.serving[port] = self._solo(adapter)
            self.worker.add(solo)
        log.info("port %s detached from switch %s", port, switch, extra={"port": port, "switch": switch})

    # --- local applications (vhostmap.netmap.client) -----------------------------------------------------
    def register_client(
        self, request: Mapping[str, Any], conn: Connection
    ) -> tuple[dict[str, Any], list[int]]:
        """The ``register`` command (NIOCGINFO + NIOCREGIF): bind the rings ``port`` names to the connection.

        ``{"port": "vm0" | "vm0-1" | "vm0^" | "vm0*" | "vale0:app", "flags": NETMAP_NO_TX_POLL...}``. A plain
        port must not be in a link or on a switch (it is taken from its sink or TAP while held); a
        ``SWITCH:NAME`` port is made for the application and attached to SWITCH (made if missing). The reply
        says where the netmap_if is and which rings are bound; the fds are the allocator's memfd, the kick
        eventfd and the irq eventfd. Everything is released when the connection ends.
        """
        name = request.get("port")
        flags = request.get("flags", 0)
        if not isinstance(name, str) or not isinstance(flags, int):
            raise ValueError('register: expected {"port": NAME[, "flags": INT]}')
        spec = parse_port_spec(name)
        with self.worker.lock:
            adapter: NetmapAdapter | None = (
                self._client_switch_port(str(spec), spec.switch, spec.port) if spec.switch else None
            )
            try:
                if adapter is None:
                    adapter = self._adapter(spec.port)
                    current = self.serving.get(spec.port)
                    if isinstance(current, Switch | Link):
                        by = f"switch {current.name}" if isinstance(current, Switch) else current.name
                        raise ValueError(
                            f"port {spec.port!r} is served by {by}; open a switch port (SWITCH:NAME) "
                            "or detach it first"
                        )
                session = self._add_session(adapter, spec.mode, spec.ring_id, flags, name, conn.peer_pid)
            except BaseException:
                if spec.switch:
                    self._drop_client_switch_port(str(spec))
                raise
            self.worker.refresh()
        assert adapter is not None
        conn.on_close(lambda: self.release_client(session))
        conn.state.setdefault("sessions", []).append(session)
        reg = session.reg
        log.info("application (pid %s) opened %s", conn.peer_pid, name, extra={"port": name})
        reply = {
            "name": adapter.name,
            "nifp_offset": reg.nifp.offset,
            "memsize": reg.memsize,
            "buffers_offset": self.memory.buffers_offset,
            "buf_size": self.memory.buf_size,
            "nbufs": self.memory.nbufs,
            "tx_rings": [reg.tx_first, reg.tx_last],
            "rx_rings": [reg.rx_first, reg.rx_last],
        }
        return reply, [self.memory.fd, session.kick, session.irq]

    def client_stats(self, request: Mapping[str, Any], conn: Connection) -> tuple[dict[str, Any], list[int]]:
        """The ``client_stats`` command: the sessions of this connection (reinits, errors...)."""
        with self.worker.lock:
            return {"sessions": [s.stats() for s in conn.state.get("sessions", [])]}, []

    def release_client(self, session: ClientSession) -> None:
        """End ``session`` (its application closed the connection, or died)."""
        with self.worker.lock:
            adapter = session.reg.adapter
            clients = self.clients.get(adapter.name)
            if clients is None or session not in clients.sessions:  # the daemon has stopped already
                return
            clients.remove(session)
            if not clients.sessions:
                del self.clients[adapter.name]
                self.worker.remove(clients)
                master = adapter.peer if isinstance(adapter, PipeEnd) else None
                if master is not None:
                    self._drop_client_switch_port(master.name)
                else:
                    solo = self.serving[adapter.name] = self._solo(adapter)
                    self.worker.add(solo)
            self.worker.refresh()
        log.info("application (pid %s) closed %s", session.pid, session.spec, extra={"port": session.spec})

    def _add_session(
        self, adapter: NetmapAdapter, mode: int, ring_id: int, flags: int, spec: str, pid: int | None
    ) -> ClientSession:
        """Register on ``adapter`` and serve the registration (the port leaves its sink or TAP bridge)."""
        reg = adapter.register(mode, ring_id, flags)
        clients = self.clients.get(adapter.name)
        fresh = clients is None
        if clients is None:
            clients = PortClients(adapter)
        try:
            session = clients.add(reg, spec, pid)
        except BaseException:
            adapter.unregister(reg)
            raise
        if fresh:
            self.clients[adapter.name] = clients
            if adapter.name in self.serving:  # an existing port, not an application's pipe end
                with contextlib.suppress(ValueError):
                    self.worker.remove(self.serving[adapter.name])
                self.serving[adapter.name] = clients
            self.worker.add(clients)
        return session

    def _client_switch_port(self, name: str, switch: str, port: str) -> PipeEnd:
        """An application's switch port ``SWITCH:PORT``: a pipe whose master is attached to the switch; the
        slave end, which the application registers."""
        if name in self.adapters:
            raise ValueError(f"switch port {name!r} is already open")
        if len(self.pipes) >= CLIENT_PORTS:
            raise ValueError(f"{CLIENT_PORTS} application switch ports are open already")
        master, slave = make_pipe(name, self.memory, num_desc=CLIENT_RING_SLOTS)
        self.adapters[name] = master
        self.pipes[name] = (master, slave)
        try:
            self.attach(switch, name)
        except BaseException:
            del self.adapters[name], self.pipes[name]
            master.close()
            slave.close()
            raise
        return slave

    def _drop_client_switch_port(self, name: str) -> None:
        pipe = self.pipes.pop(name, None)
        if pipe is None:
            return
        master, slave = pipe
        sw = self.serving.pop(name, None)
        if isinstance(sw, Switch):
            sw.detach(master)
        del self.adapters[name]
        master.close()
        slave.close()

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

"""The topology of a running daemon: which forwarder consumes each port, and the changes made at run time.

Every port is consumed by exactly one forwarder: the link it is in, the switch it is attached to, the
sessions of the local applications holding it, else a HostBridge (a port with host rings: it and its TAP are
cross-connected), a Source (``generate=``) or a Sink. Switch ports attach and detach at run time, and
applications register and go, under the worker's lock, so the other ports' traffic never sees a half-made
change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

from vhostmap.daemon.worker import Datapath, Forwarder
from vhostmap.forwarding.hostbridge import HostBridge
from vhostmap.forwarding.link import Link
from vhostmap.forwarding.sessions import ClientSession, PortClients
from vhostmap.forwarding.sink import Sink
from vhostmap.forwarding.source import Source
from vhostmap.forwarding.switch import Switch
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import NetmapMemory
from vhostmap.netmap.pipe import PipeEnd, make_pipe
from vhostmap.netmap.user import parse_port_spec

log = logging.getLogger(__name__)

# Switch ports applications may open at once (``vale0:app``), and the slots of each of their rings.
CLIENT_PORTS = 8
CLIENT_RING_SLOTS = 512


class Topology:
    """The table of ports, links, switches and application sessions, and the worker that runs them.

    ``adapters``: every port by name. ``generators``: port name -> (frame length, MAC, MTU) of the ports that
    feed their guest generated frames when nothing else consumes them. ``check_switch_name`` raises a
    ValueError for a switch name the configuration would refuse.
    """

    def __init__(
        self,
        adapters: dict[str, NetmapAdapter],
        memory: NetmapMemory,
        worker: Datapath,
        *,
        generators: Mapping[str, tuple[int, bytes, int]],
        check_switch_name: Callable[[str], object],
    ) -> None:
        self.adapters = adapters
        self.memory = memory
        self.worker = worker
        self.generators = dict(generators)
        self.check_switch_name = check_switch_name
        # The forwarder that consumes each port's rings.
        self.serving: dict[str, Forwarder] = {}
        self.switches: dict[str, Switch] = {}
        # Ports held by local applications (their forwarder), and the pipes of their switch ports.
        self.clients: dict[str, PortClients] = {}
        self.pipes: dict[str, tuple[PipeEnd, PipeEnd]] = {}

    def build(
        self, links: list[tuple[str, str]], switches: Mapping[str, tuple[list[str], float]]
    ) -> list[Forwarder]:
        """Set up ``links`` and ``switches`` (name -> (ports, aging)) and a solo forwarder for every other
        port; the forwarders, for the worker."""
        for a, b in links:
            self.serving[a] = self.serving[b] = Link(self.adapters[a], self.adapters[b])
        for name, (ports, aging) in switches.items():
            sw = self.switches[name] = Switch(name, aging=aging)
            for port in ports:
                sw.attach(self.adapters[port])
                self.serving[port] = sw
        for name, adapter in self.adapters.items():
            if name not in self.serving:
                self.serving[name] = self.solo(adapter)
        forwarders: list[Forwarder] = list(self.switches.values())
        forwarders += [f for f in dict.fromkeys(self.serving.values()) if f not in forwarders]
        return forwarders

    def solo(self, adapter: NetmapAdapter) -> Forwarder:
        """The forwarder of a port attached to nothing: its TAP if it has host rings, its generator if it has
        ``generate=``, else a sink."""
        if adapter.host_port is not None:
            return HostBridge(adapter)
        generator = self.generators.get(adapter.name)
        if generator is not None:
            return Source(adapter, *generator)
        return Sink(adapter)

    def attach(self, switch: str, port: str) -> Switch:
        """Attach ``port`` to ``switch`` (created if missing) at run time; the switch.

        Raises LookupError for an unknown port, ValueError for a port already on a switch or in a link, or a
        switch name that is not valid.
        """
        with self.worker.lock:
            adapter = self.adapter(port)
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
                self.check_switch_name(switch)  # a valid name, or a ValueError
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
            adapter = self.adapter(port)
            if self.serving[port] is not sw:
                raise ValueError(f"port {port!r} is not attached to switch {switch!r}")
            if port in self.pipes:
                raise ValueError(f"port {port!r} belongs to an application and goes with it")
            sw.detach(adapter)
            solo = self.serving[port] = self.solo(adapter)
            self.worker.add(solo)
        log.info("port %s detached from switch %s", port, switch, extra={"port": port, "switch": switch})

    # --- local applications (vhostmap.apps.client) --------------------------------------------------------
    def register(
        self, name: str, flags: int, pid: int | None, vnet_hdr: bool = False
    ) -> tuple[NetmapAdapter, ClientSession]:
        """Bind the rings ``name`` names (``vm0``, ``vm0-1``, ``vm0^``, ``vm0*``, ``vale0:app``) to a new
        application session; the adapter and the session.

        A plain port must not be in a link or on a switch (it is taken from its sink or TAP while held); a
        ``SWITCH:NAME`` port is made for the application and attached to SWITCH (made if missing), with
        ``vnet_hdr`` one whose frames carry their virtio-net header and offloads (PipeEnd).
        """
        spec = parse_port_spec(name)
        if vnet_hdr and not spec.switch:
            raise ValueError(f"{name}: the virtio-net header is for switch ports (SWITCH:NAME)")
        with self.worker.lock:
            adapter: NetmapAdapter | None = (
                self._client_switch_port(str(spec), spec.switch, spec.port, vnet_hdr) if spec.switch else None
            )
            try:
                if adapter is None:
                    adapter = self.adapter(spec.port)
                    current = self.serving.get(spec.port)
                    if isinstance(current, Switch | Link):
                        by = f"switch {current.name}" if isinstance(current, Switch) else current.name
                        raise ValueError(
                            f"port {spec.port!r} is served by {by}; open a switch port (SWITCH:NAME) "
                            "or detach it first"
                        )
                session = self._add_session(adapter, spec.mode, spec.ring_id, flags, name, pid)
            except BaseException:
                if spec.switch:
                    self._drop_client_switch_port(str(spec))
                raise
            self.worker.refresh()
        assert adapter is not None
        return adapter, session

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
                    self._flush_client_switch_port(master.name)
                    self._drop_client_switch_port(master.name)
                else:
                    solo = self.serving[adapter.name] = self.solo(adapter)
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

    def _client_switch_port(self, name: str, switch: str, port: str, vnet: bool = False) -> PipeEnd:
        """An application's switch port ``SWITCH:PORT``: a pipe whose master is attached to the switch; the
        slave end, which the application registers. ``vnet``: see PipeEnd."""
        if name in self.adapters:
            raise ValueError(f"switch port {name!r} is already open")
        if len(self.pipes) >= CLIENT_PORTS:
            raise ValueError(f"{CLIENT_PORTS} application switch ports are open already")
        master, slave = make_pipe(name, self.memory, num_desc=CLIENT_RING_SLOTS, vnet=vnet)
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

    def _flush_client_switch_port(self, name: str) -> None:
        """Forward what the application's pipe still holds, before the port goes.

        VALE forwards in the sender's own txsync: once an application's TX slots are back, its frames have
        left. Here the pipe takes them (the slots come back at once) and the switch forwards from the
        worker, later: an application that waited for its TX ring to empty and closed (pkt-gen does) lost
        the frames still in the pipe. One more round of the switch sends them on, or drops them, counted.
        """
        sw = self.serving.get(name)
        if isinstance(sw, Switch):
            sw.run()

    def _drop_client_switch_port(self, name: str) -> None:
        pipe = self.pipes.pop(name, None)
        if pipe is None:
            return
        master, slave = pipe
        sw = self.serving.pop(name, None)
        if isinstance(sw, Switch):
            sw.detach(master)
        try:
            master.close()
            slave.close()
        finally:
            # Last: a port gone from the table has given every ring and buffer back (what `status` and
            # the tests see without the datapath lock).
            del self.adapters[name]

    def close(self) -> None:
        """The daemon stops: end every application session, then close every port and pipe end."""
        for clients in self.clients.values():
            for session in clients.sessions:
                session.close()
        self.clients.clear()
        for adapter in self.adapters.values():
            adapter.close()
        for _, slave in self.pipes.values():
            slave.close()
        self.pipes.clear()

    def adapter(self, port: str) -> NetmapAdapter:
        """The port called ``port``; LookupError if there is none."""
        adapter = self.adapters.get(port)
        if adapter is None:
            raise LookupError(f"no port named {port!r}")
        return adapter

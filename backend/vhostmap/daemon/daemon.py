"""``vhostmap serve``: builds the ports and forwarders of a configuration and runs them until stopped.

The control plane (vhost-user sockets, the control socket) runs on an asyncio loop in the main thread; the
datapath runs in one worker thread per datapath CPU (one, unpinned, without ``--cpu``). They meet at the
datapath's lock (every thread's, taken in order: worker.DatapathLock).

Which forwarder consumes which port, and what changes at run time (switch ports attached and detached,
applications registering), is the topology's (topology.py); this module builds the ports, serves their
sockets and the control socket, and answers the control commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from vhostmap import __version__
from vhostmap.control.server import Connection, ControlServer
from vhostmap.daemon.config import DaemonConfig, PortConfig, SwitchConfig
from vhostmap.daemon.metrics import registry
from vhostmap.daemon.topology import CLIENT_PORTS, CLIENT_RING_SLOTS, Topology
from vhostmap.daemon.worker import Datapath, Forwarder, RxQueue
from vhostmap.ethernet import format_mac
from vhostmap.forwarding.switch import Switch
from vhostmap.ivshmem.protocol import DAEMON_PEER_ID
from vhostmap.ivshmem.server import IvshmemEndpoint
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.capture import DEFAULT_RING_BYTES, MAX_SNAPLEN, CaptureRings, port_krings
from vhostmap.netmap.generic import GenericAdapter
from vhostmap.netmap.host import HostStack
from vhostmap.netmap.passthrough import PassthroughPort
from vhostmap.netmap.pipe import PipeEnd
from vhostmap.netmap.stash import STASH_BUFFERS
from vhostmap.system.access import libvirt_access_problems, removal_problem
from vhostmap.system.cpu import pin_current_thread
from vhostmap.system.limits import raise_fd_limit
from vhostmap.system.privileges import become, lookup
from vhostmap.system.service import notify
from vhostmap.vhost_user import PORT_RING_SLOTS, Endpoint, NetConfig, SocketMode, VhostUserPort
from vhostmap.virtio.spec import feature_names

log = logging.getLogger(__name__)

# Buffers beyond the ports' own rings, for in-flight swaps.
SPARE_BUFFERS = 4096


def allocator_params(config: DaemonConfig) -> AllocatorParams:
    """An allocator big enough for every ring of every port (one buffer per slot) and the buffer stash of
    every vhost-user port, room for CLIENT_PORTS application switch ports (a pipe: four rings) and spares."""
    rings = sum(2 * (p.ring_pairs + 1) for p in config.ports)
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
        pinned = {pc.name: dict(pc.rxq_affinity) for pc in config.ports if pc.rxq_affinity}
        # The datapath threads (named `worker` since there was one).
        self.worker = Datapath(config.cpu, poll=config.poll, pinned=pinned, isolate=config.rxq_isolate)
        # Every port, by name; ``ports`` holds the vhost-user ones (the sockets' handlers).
        self.adapters: dict[str, NetmapAdapter] = {}
        self.ports: dict[str, VhostUserPort] = {}
        self.passthrough: dict[str, PassthroughPort] = {}
        try:
            for pc in config.ports:
                self.adapters[pc.name] = self._make_port(pc)
        except BaseException:
            for adapter in self.adapters.values():
                adapter.close()
            self.memory.close()
            raise
        # Round-robin in the order of the configuration, as OVS assigns a port's queues in turn.
        for queue in self.rx_queues():
            self.worker.assignment.owner(*queue)
        generators = {p.name: (p.generate, p.mac, p.mtu) for p in config.ports if p.generate is not None}
        self.topology = Topology(
            self.adapters, self.memory, self.worker, generators=generators, check_switch_name=SwitchConfig
        )
        switches = {sc.name: (list(sc.ports), sc.aging) for sc in config.switches}
        self.forwarders: list[Forwarder] = self.topology.build(list(config.links), switches)
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
        # The passthrough ports' ivshmem server sockets.
        self.pt_endpoints = [
            IvshmemEndpoint(
                self.passthrough[pc.name], pc.path, owner=pc.uid, group=pc.gid, perm=pc.socket_perm
            )
            for pc in config.ports
            if pc.name in self.passthrough
        ]
        self.control = ControlServer(
            config.control_socket,
            {"stats": self.stats, "status": self.status, "switch": self.switch, "inspect": self.inspect},
            {"register": self.register_client, "client_stats": self.client_stats, "capture": self.capture},
        )
        # Live captures (vhostmap capture): the port spec and the client's pid of each.
        self.captures: list[tuple[str, int | None, CaptureRings]] = []
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # prometheus_client's HTTP server and its thread while --metrics serves.
        self._metrics: tuple[WSGIServer, threading.Thread] | None = None
        self.ready = threading.Event()

    def _make_port(self, pc: PortConfig) -> NetmapAdapter:
        """The adapter of one configured port, with its host rings bound to a TAP when ``host=``."""
        adapter: NetmapAdapter
        if pc.type == "generic":
            assert pc.ifname is not None  # checked by PortConfig
            adapter = GenericAdapter(pc.name, self.memory, pc.ifname, num_desc=PORT_RING_SLOTS)
        elif pc.type == "passthrough":
            adapter = self.passthrough[pc.name] = PassthroughPort(
                pc.name,
                self.memory,
                self.worker.lock,
                self.worker.refresh,
                num_rings=pc.rings,
                num_desc=PORT_RING_SLOTS,
                guest_slots=pc.slots,
                doorbell=(DAEMON_PEER_ID, 0),
            )
        else:
            net = NetConfig(pc.mac, pc.mtu, pc.queues, pc.offloads, pc.packed)
            port = VhostUserPort(
                pc.name, net, self.memory, self.worker.lock, self.worker.refresh, poll=self.worker.poll
            )
            self.ports[pc.name] = port
            adapter = port
        if pc.host is not None:
            try:
                HostStack(adapter, pc.host)
            except BaseException:
                adapter.close()
                self.ports.pop(pc.name, None)
                self.passthrough.pop(pc.name, None)
                raise
        return adapter

    def rx_queues(self) -> list[RxQueue]:
        """Every receive queue of every port (the unit the datapath threads share): its RX rings, and its host
        RX ring when it has one."""
        queues: list[RxQueue] = []
        for name, adapter in self.adapters.items():
            queues += [(name, i) for i in range(adapter.num_rx_rings)]
            if adapter.host_port is not None:
                queues.append((name, adapter.num_rx_rings))
        return queues

    # --- the topology, as tests and commands look at it -----------------------------------------------------
    @property
    def serving(self) -> dict[str, Forwarder]:
        """The forwarder consuming each port."""
        return self.topology.serving

    @property
    def switches(self) -> dict[str, Switch]:
        """The switches, by name."""
        return self.topology.switches

    def attach(self, switch: str, port: str) -> Switch:
        """Attach ``port`` to ``switch`` at run time (Topology.attach)."""
        return self.topology.attach(switch, port)

    def detach(self, switch: str, port: str) -> None:
        """Detach ``port`` from ``switch`` at run time (Topology.detach)."""
        self.topology.detach(switch, port)

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until ``stop()``, or SIGINT/SIGTERM when ``handle_signals`` (main thread only)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopping = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stopping.set)
        started: list[Endpoint] = []
        pt_started: list[IvshmemEndpoint] = []
        try:
            try:
                old, new = raise_fd_limit()
            except (OSError, ValueError) as e:  # a sandbox that forbids it: serve with what there is
                log.warning("cannot raise the open file limit: %s", e)
            else:
                if new != old:
                    log.info("open file limit raised from %d to %d", old, new)
            self.worker.start()  # in the try: a CPU the kernel refuses still gets everything cleaned up
            for fwd in self.forwarders:
                self.worker.add(fwd)
            if self.config.control_cpu is not None:
                # After the worker started: a thread starts on the CPUs of the thread that made it.
                pin_current_thread(self.config.control_cpu, "control thread")
            await self.control.start()
            if self.config.metrics is not None:
                addr, port = self.config.metrics
                self._metrics = start_http_server(port, addr, registry(self.counters, loop))
                log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
            for ep in self.endpoints:
                ep.start()
                started.append(ep)
            for pt in self.pt_endpoints:
                pt.start()
                pt_started.append(pt)
            if self.config.user is not None:
                self._become(self.config.user)
            log.info("vhostmap %s serving %d port(s)", __version__, len(self.adapters))
            listening = {ep.handler.name: ep.path for ep in self.endpoints if ep.mode is SocketMode.SERVER}
            listening |= {pt.handler.name: pt.path for pt in self.pt_endpoints}
            for problem in libvirt_access_problems(listening):
                log.warning("%s", problem)
            self.ready.set()
            notify("READY=1")
            await self._stopping.wait()
        finally:
            notify("STOPPING=1")
            for ep in started:
                ep.close()
            for pt in pt_started:
                pt.close()
            if self._metrics is not None:
                server, thread = self._metrics
                server.shutdown()
                server.server_close()
                thread.join()
                self._metrics = None
            await self.control.close()
            self.worker.stop()
            with self.worker.lock:  # application connections may still be closing on this loop
                self.topology.close()
                self.memory.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):
                    loop.remove_signal_handler(sig)

    def _become(self, user: str) -> None:
        """Give up root for ``user`` (config ``user``, system/privileges.py), once every socket, TAP and raw
        socket exists; warn about sockets the user will not be able to remove when the daemon stops."""
        who = lookup(user)
        ours = [self.config.control_socket] + [
            ep.path for ep in self.endpoints if ep.mode is SocketMode.SERVER
        ]
        ours += [pt.path for pt in self.pt_endpoints]
        for path in ours:
            problem = removal_problem(path, who.uid, frozenset(who.groups))
            if problem is not None:
                log.warning("as %s, vhostmap cannot remove %s when it stops: %s", who.name, path, problem)
        become(who)
        log.info("running as %s, without privileges", who)

    def stop(self) -> None:
        """Ask ``run`` to return (from any thread); nothing to do once it has."""
        if self._stopping is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: run() returned already
                self._loop.call_soon_threadsafe(self._stopping.set)

    # --- control commands ---------------------------------------------------------------------------------
    def stats(self, request: Any) -> dict[str, Any]:
        """Per-port and per-queue counters (host rings' too), and the switches' when there are any."""
        with self.worker.lock:
            kicks = self.worker.kicks()
            reply: dict[str, Any] = {
                "ports": {name: port_stats(adapter, kicks) for name, adapter in self.adapters.items()}
            }
            if self.switches:
                reply["switches"] = {name: sw.stats() for name, sw in self.switches.items()}
            return reply

    def counters(self) -> dict[str, Any]:
        """What the Prometheus metrics export (vhostmap.daemon.metrics), without the datapath lock: call it on
        the control thread, the only one that changes ports and switches; the datapath threads' counters are
        read as they are meanwhile, each one whole."""
        ports: dict[str, Any] = {}
        kicks = self.worker.kicks()
        for name, adapter in self.adapters.items():
            p = port_stats(adapter, kicks)
            if isinstance(adapter, VhostUserPort):
                features = ",".join(feature_names(adapter.device.features))
                p["info"] = {"type": "vhost-user", "features": features}
            elif isinstance(adapter, GenericAdapter):
                p["info"] = {"type": "generic", "ifname": adapter.ifname}
            elif isinstance(adapter, PassthroughPort):
                p["info"] = {"type": "passthrough"}
            else:
                p["info"] = {"type": "application"}
            ports[name] = p
        switches = {
            name: {"ports": {p.name: asdict(p.stats) for p in sw.ports}, "addresses": len(sw.table)}
            for name, sw in self.switches.items()
        }
        pools = self.memory.stats()
        cpus = self.worker.assignment.cpus
        threads = [
            {"thread": k, "cpu": cpu, **load}
            for k, (cpu, load) in enumerate(zip(cpus, self.worker.loads(), strict=True))
        ]
        return {
            "ports": ports,
            "switches": switches,
            "memory": {k: v for k, v in pools.items() if isinstance(v, dict)},
            "threads": threads,
        }

    def inspect(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The ``inspect`` control command, ``{"port": NAME[, "queue": N][, "chains": K]}``: a vhost-user
        port's virtqueues, krings and stall reasons (VhostUserPort.inspect), read under the datapath lock."""
        name = request.get("port")
        adapter = self.adapters.get(name) if isinstance(name, str) else None
        if not isinstance(adapter, VhostUserPort):
            raise ValueError(f"no vhost-user port {name!r} (inspect shows vhost-user ports)")
        queue, chains = request.get("queue"), request.get("chains", 0)
        if (queue is not None and not isinstance(queue, int)) or not isinstance(chains, int) or chains < 0:
            raise ValueError("queue must be a queue pair number and chains a count")
        with self.worker.lock:
            return adapter.inspect(queue, min(chains, 64))

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
                    "packed": self.config.port(ep.handler.name).packed,
                    "broken": self.ports[ep.handler.name].device.broken,
                    "features": feature_names(self.ports[ep.handler.name].device.features),
                    "ring": self.ports[ep.handler.name].device.layout,
                }
                for ep in self.endpoints
            }
            for name, adapter in self.adapters.items():
                if isinstance(adapter, GenericAdapter):
                    ports[name] = {"type": "generic", "ifname": adapter.ifname, "broken": adapter.broken}
                elif isinstance(adapter, PipeEnd):
                    ports[name] = {"type": "application", "broken": adapter.broken}
                elif isinstance(adapter, PassthroughPort):
                    ep = next(pt for pt in self.pt_endpoints if pt.handler is adapter)
                    ports[name] = {
                        "type": "passthrough",
                        "path": ep.path,
                        "connected": ep.is_connected,
                        "rings": adapter.num_rx_rings,
                        "slots": adapter.guest_slots,
                        "broken": adapter.broken,
                    }
                if adapter.host_port is not None:
                    ports[name]["host"] = adapter.host_port.name
                ports[name]["forwarder"] = self.serving[name].name
            switches = {name: [p.name for p in sw.ports] for name, sw in self.switches.items()}
            clients = [s.stats() for c in self.topology.clients.values() for s in c.sessions]
            captures = [{"port": spec, "pid": pid, **rings.counts()} for spec, pid, rings in self.captures]
            threads = self.worker.assignment.show(self.rx_queues())
            for entry, load in zip(threads, self.worker.loads(), strict=True):
                entry |= load
        return {
            "version": __version__,
            "ports": ports,
            "switches": switches,
            "clients": clients,
            "captures": captures,
            "memory": self.memory.stats(),
            # Which thread serves each receive queue (ovs-appctl dpif-netdev/pmd-rxq-show), and how long each
            # had nothing to do: between two readings, busy = 1 - (idle_ns delta) / (clock_ns delta); rounds
            # counts its forwarder rounds that moved frames.
            "datapath": {"poll": self.worker.poll, "threads": threads, "clock_ns": time.perf_counter_ns()},
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

    # --- local applications (vhostmap.apps.client) -----------------------------------------------------
    def register_client(
        self, request: Mapping[str, Any], conn: Connection
    ) -> tuple[dict[str, Any], list[int]]:
        """The ``register`` command (NIOCGINFO + NIOCREGIF): bind the rings ``port`` names to the connection.

        ``{"port": "vm0" | "vm0-1" | "vm0^" | "vm0*" | "vale0:app", "flags": NETMAP_NO_TX_POLL...,
        "vnet_hdr": false}``. A plain port must not be in a link or on a switch (it is taken from its sink or
        TAP while held); a ``SWITCH:NAME`` port is made for the application and attached to SWITCH (made if
        missing), its frames with their virtio-net header when ``vnet_hdr`` (netmap/pipe.py). The reply
        says where the netmap_if is and which rings are bound; the fds are the allocator's memfd, the kick
        eventfd and the irq eventfd. Everything is released when the connection ends.
        """
        name = request.get("port")
        flags = request.get("flags", 0)
        vnet_hdr = request.get("vnet_hdr", False)
        if not isinstance(name, str) or not isinstance(flags, int) or not isinstance(vnet_hdr, bool):
            raise ValueError('register: expected {"port": NAME[, "flags": INT][, "vnet_hdr": BOOL]}')
        adapter, session = self.topology.register(name, flags, conn.peer_pid, vnet_hdr)
        conn.on_close(lambda: self.topology.release_client(session))
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

    def capture(self, request: Mapping[str, Any], conn: Connection) -> tuple[dict[str, Any], list[int]]:
        """The ``capture`` command (vhostmap capture): tap a port's krings while the connection lives.

        ``{"port": "vm0" | "vm0^" | "vm0*" | "vale0:app", "direction": "in"|"out"|"both", "snaplen": BYTES,
        "ring_bytes": BYTES}``. The reply lists the capture rings (interface, direction, kring, offset, size)
        in the memfd that comes with it (netmap/capture.py). One capture at a time per kring.
        """
        spec, direction = request.get("port"), request.get("direction", "both")
        snaplen = request.get("snaplen", MAX_SNAPLEN)
        ring_bytes = request.get("ring_bytes", DEFAULT_RING_BYTES)
        if not (isinstance(spec, str) and isinstance(direction, str)) or not (
            isinstance(snaplen, int) and isinstance(ring_bytes, int)
        ):
            raise ValueError(
                'capture: expected {"port": NAME[, "direction": ..., "snaplen": N, "ring_bytes": N]}'
            )
        adapter = self.topology.adapter(spec.rstrip("^*"))
        rings = CaptureRings(port_krings(adapter, spec, direction), ring_bytes, snaplen)
        entry = (spec, conn.peer_pid, rings)
        try:
            with self.worker.lock:
                rings.install()
                self.captures.append(entry)
        except BaseException:
            rings.close()
            raise

        def release() -> None:
            with self.worker.lock:
                rings.remove()
                self.captures.remove(entry)
            counts = rings.counts()
            rings.close()
            log.info(
                "capture of %s (pid %s) ended: %d frames, %d dropped",
                spec,
                conn.peer_pid,
                counts["frames"],
                counts["dropped"],
                extra={"port": adapter.name},
            )

        conn.on_close(release)
        log.info("capture of %s (pid %s) started", spec, conn.peer_pid, extra={"port": adapter.name})
        reply = {"memsize": rings.memsize, "snaplen": snaplen, "rings": [asdict(r) for r in rings.rings]}
        return reply, [rings.fd]

    def client_stats(self, request: Mapping[str, Any], conn: Connection) -> tuple[dict[str, Any], list[int]]:
        """The ``client_stats`` command: the sessions of this connection (reinits, errors...)."""
        with self.worker.lock:
            return {"sessions": [s.stats() for s in conn.state.get("sessions", [])]}, []


def port_stats(adapter: NetmapAdapter, kicks: Mapping[int, int] | None = None) -> dict[str, Any]:
    """The counters of one port in the shape of VhostUserPort.stats_dict (queues, totals, broken), plus the
    generic adapter's own counters and its host rings' (``host``) when it has them; per queue ``drops``, the
    dropped frames by direction and reason. ``kicks``: Datapath.kicks."""
    out: dict[str, Any]
    if isinstance(adapter, VhostUserPort):
        out = adapter.stats_dict(kicks)
        for q in out["queues"]:
            invalid = q["rx_dropped"] - q["rx_unconnected"] - q["rx_bad_header"]
            q["drops"] = {
                "rx": {
                    "unconnected": q["rx_unconnected"],
                    "bad_header": q["rx_bad_header"],
                    "invalid": invalid,
                },
                "tx": {
                    "no_carrier": q["tx_no_carrier"],
                    "bad_header": q["tx_bad_header"],
                    "too_big": q["tx_dropped"] - q["tx_no_carrier"] - q["tx_bad_header"],
                },
            }
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
        drops = {
            "rx": {"ring_full": g["rx_drops"], "oversize": g["rx_oversize"], "kernel": g["kernel_drops"]},
            "tx": {"send_failed": g["tx_drops"]},
        }
        out = {
            "queues": [{"queue": 0, **queue, "drops": drops}],
            "totals": queue,
            "broken": adapter.broken,
            "generic": g,
        }
    elif isinstance(adapter, PassthroughPort):
        queues = adapter.queue_counters()
        for q in queues:
            q["drops"] = {"rx": {"consumer": q["rx_dropped"]}, "tx": {"no_guest": q["tx_dropped"]}}
        keys = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped", "errors")
        # ``doorbells``: the guest's kicks the datapath read (its doorbell writes, coalesced).
        doorbells = (kicks or {}).get(adapter.kick, 0) if adapter.kick >= 0 else 0
        out = {
            "queues": queues,
            "totals": {k: sum(q[k] for q in queues) for k in keys},
            "broken": adapter.broken,
            "passthrough": {**adapter.counters(), "doorbells": doorbells},
        }
    else:
        out = {"queues": [], "totals": {}, "broken": adapter.broken}
    if isinstance(adapter.host_port, HostStack):
        out["host"] = {"tap": adapter.host_port.name, **adapter.host_port.counters()}
    return out

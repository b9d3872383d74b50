"""Prometheus metrics of a running daemon: ``vhostmap serve --metrics [ADDR:]PORT`` (TOML ``metrics``).

prometheus_client serves the text exposition format over HTTP from a thread of its own; each scrape asks the
daemon's control thread (its asyncio loop, the only thread that changes ports, links and switches) for the
counters and turns them into metric families. The datapath lock is not taken: a scrape never stalls
forwarding. Counters the datapath threads are writing meanwhile are read as they are (each one whole), so a
scrape is a consistent list of ports with counters that may be a few frames apart, as OVS's and DPDK's are.

Names follow Prometheus' conventions (``vhostmap_port_rx_packets_total{port,queue}``, bytes and seconds,
``_total`` counters); no MAC address is a label.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

# vhostmap stats' queue counters: (name, help); the directions are the port's (rx: from its guest or peer).
QUEUE_COUNTERS = (
    ("rx_packets", "Frames the port received from its guest or peer."),
    ("rx_bytes", "Bytes the port received from its guest or peer."),
    ("tx_packets", "Frames the port delivered to its guest or peer."),
    ("tx_bytes", "Bytes the port delivered to its guest or peer."),
    ("errors", "Driver faults and refused interrupts on the queue."),
    ("kicks", "Notifications from the guest on the queue pair's virtqueues (none while polled)."),
    ("calls", "Interrupts signalled to the guest on the queue pair's virtqueues."),
    ("rx_offloaded", "Frames from the guest whose checksum or segmentation vhostmap completed."),
    ("rx_offload_passed", "Frames from the guest passed on with their offloads to ports that take them."),
    (
        "tx_offloaded",
        "Frames to the guest whose offloads vhostmap completed for it (it did not negotiate them).",
    ),
)
# The drops of vhostmap stats' queues, by direction: rx (received, then dropped: reason unconnected when
# nothing is attached to the port, invalid for a guest's empty or oversized frame, bad_header for an offload
# header the frame does not bear out; a generic port's
# ring_full, oversize, kernel) and tx (for the port, not delivered: no_carrier while the guest has no
# receive queue, bad_header for a frame's header that fails the checks on the way out, too_big for its
# receive chains; a generic port's send_failed).
DROPS = (
    ("rx", "Frames the port received and dropped, by reason."),
    ("tx", "Frames for the port that it could not deliver, by reason."),
)
# vhostmap stats' occupancy: what waits per queue pair now.
OCCUPANCY = (
    ("guest_tx_waiting", "Chains the guest queued for transmission that vhostmap has not taken yet."),
    ("guest_rx_buffers", "Receive buffers the guest posted that vhostmap has not filled yet."),
    ("held", "Frames for the guest held until it posts receive buffers."),
)
SWITCH_COUNTERS = (
    ("rx_frames", "Frames the switch received from the port."),
    ("forwarded", "Frames from the port forwarded to a learnt port."),
    ("flooded", "Frames from the port flooded to every other port."),
    ("filtered", "Frames from the port whose destination was learnt on the port itself."),
    (
        "dropped",
        "Frames from the port dropped (malformed, or no room at a destination, once per destination).",
    ),
    ("tx_frames", "Frames the switch put in the port's TX rings."),
    ("tx_dropped", "Frames for the port that found its TX ring full."),
)

SCRAPE_TIMEOUT = 5.0  # seconds a scrape waits for the control thread


class DaemonCollector(Collector):
    """The metric families of the daemon whose counters ``read`` returns (Daemon.counters, called on its
    control thread by ``loop``)."""

    def __init__(self, read: Callable[[], dict[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        self.read = read
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        """The families of one scrape (prometheus_client calls this from its HTTP thread)."""
        future = asyncio.run_coroutine_threadsafe(_call(self.read), self.loop)
        yield from families(future.result(SCRAPE_TIMEOUT))


async def _call(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return read()


def families(c: dict[str, Any]) -> list[Metric]:
    """The metric families of the counters ``c`` (Daemon.counters)."""
    port_q = ["port", "queue"]
    queue = {n: CounterMetricFamily(f"vhostmap_port_{n}", text, labels=port_q) for n, text in QUEUE_COUNTERS}
    drops = {
        way: CounterMetricFamily(f"vhostmap_port_{way}_dropped", text, labels=[*port_q, "reason"])
        for way, text in DROPS
    }
    waiting = {n: GaugeMetricFamily(f"vhostmap_port_{n}", text, labels=port_q) for n, text in OCCUPANCY}
    broken = GaugeMetricFamily(
        "vhostmap_port_broken", "1 while the port is broken (its log says why).", labels=["port"]
    )
    info = InfoMetricFamily("vhostmap_port", "What the port is, and what it negotiated.", labels=["port"])
    for port, p in c["ports"].items():
        for q in p["queues"]:
            labels = [port, str(q["queue"])]
            for n, counter in queue.items():
                if n in q:  # kicks and calls are a vhost-user port's
                    counter.add_metric(labels, q[n])
            for way, family in drops.items():
                for reason, count in q["drops"][way].items():
                    family.add_metric([*labels, reason], count)
        for q in p.get("occupancy", ()):
            for n, gauge in waiting.items():
                gauge.add_metric([port, str(q["queue"])], q[n])
        broken.add_metric([port], 1 if p["broken"] else 0)
        info.add_metric([port], {k: str(v) for k, v in p["info"].items()})

    sw_p = ["switch", "port"]
    sw = {
        n: CounterMetricFamily(f"vhostmap_switch_port_{n}", text, labels=sw_p) for n, text in SWITCH_COUNTERS
    }
    learnt = GaugeMetricFamily("vhostmap_switch_addresses", "Addresses the switch learnt.", labels=["switch"])
    for switch, s in c["switches"].items():
        for port, counters in s["ports"].items():
            for n, counter in sw.items():
                counter.add_metric([switch, port], counters[n])
        learnt.add_metric([switch], s["addresses"])

    free = GaugeMetricFamily("vhostmap_allocator_free", "Free objects of an allocator pool.", labels=["pool"])
    total = GaugeMetricFamily("vhostmap_allocator_objects", "Objects of an allocator pool.", labels=["pool"])
    for pool, counts in c["memory"].items():
        free.add_metric([pool], counts["objfree"])
        total.add_metric([pool], counts["objtotal"])

    # rate(vhostmap_datapath_busy_seconds_total): the share of a thread's time that was work.
    thread = ["thread", "cpu"]
    idle = CounterMetricFamily("vhostmap_datapath_idle_seconds", "Time with nothing to do.", labels=thread)
    busy = CounterMetricFamily("vhostmap_datapath_busy_seconds", "Time with work to do.", labels=thread)
    rounds = CounterMetricFamily(
        "vhostmap_datapath_rounds", "Forwarder runs that moved frames.", labels=thread
    )
    for t in c["threads"]:
        labels = [str(t["thread"]), "" if t["cpu"] is None else str(t["cpu"])]
        idle.add_metric(labels, t["idle_ns"] / 1e9)
        busy.add_metric(labels, t["busy_ns"] / 1e9)
        rounds.add_metric(labels, t["rounds"])
    return [
        *queue.values(),
        *drops.values(),
        *waiting.values(),
        broken,
        info,
        *sw.values(),
        learnt,
        free,
        total,
        idle,
        busy,
        rounds,
    ]


def registry(read: Callable[[], dict[str, Any]], loop: asyncio.AbstractEventLoop) -> CollectorRegistry:
    """A registry with the daemon's collector and the process' (RSS, CPU seconds, open fds: what a soak
    watches), and nothing else of the client library's."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(read, loop))
    ProcessCollector(namespace="vhostmap", registry=reg)
    return reg

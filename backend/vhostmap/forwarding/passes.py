"""Compiled passes: a forwarder's whole round over ports with compiled queues, as one C call.

A forwarder asks each port for its C queue handles (``NetmapAdapter.fast_queues``, None for a port that takes
the Python path) and builds, once per control-plane change (the handles' ``version``), the C array its pass
runs over (struct vhu_queue, vhu_lane or vhu_switch_source: datapath/vhost_sync.cdef). When the pass stops at
a sync, ``PassOutcome`` hands that sync back to its port (``NetmapAdapter.fast_failed``): a driver fault marks
that device broken, a ring the compiled prologue refused is synced the Python way, and nothing else stops.

The link and switch passes copy each frame once, from the source guest's transmit buffers into the
destination guest's receive buffers: the source's slots refer to guest memory through the pass's private
table of references (``OneCopy``, struct vq_refs in datapath/virtio.cdef) while the pass runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vhostmap.datapath import ffi, lib
from vhostmap.forwarding.rings import ring_lock
from vhostmap.netmap.adapter import FastQueues, NetmapAdapter
from vhostmap.netmap.kring import Kring

# A link, switch or sink pass takes at most BURST slots from a source per round, so that frames go out and the
# source's used entries come back every burst rather than once per ring: a driver whose transmit ring is full
# meanwhile drops (testpmd) or stops its queue. BURST is the burst of small frames; of large ones a round
# takes about the bytes of 32 MTU frames, DPDK's burst (vhu_round_burst, by the source's last mean frame).
# Measured by core state, P3 over 256-entry rings: 128 frames of 64 bytes a round moved 1.15x more near and
# 1.24x far than 32 (what a round pays once, a chain of misses on the guest's lines, paid a quarter as often),
# while 128 of 1500 bytes moved 0.80x. One call runs rounds while they move frames, up to BUDGET slots, so
# that entering C and the Python around it are paid once per up to BUDGET slots: when a call stopped after 8
# rounds, rounds of 32 frames of 1500 bytes (256 a call) left a sixth of a sink's time to that Python. The
# control plane waits for the datapath lock at most that long (well under a ms).
BURST = 128
BUDGET = 8 * BURST
# A source pass (generate=) runs up to ROUNDS rounds, while they deliver frames.
ROUNDS = 8

# (port, kring, whether it is an RX kring) of one sync of a pass, in the order the pass numbers them.
Side = tuple[NetmapAdapter, Kring, bool]

# Which receive queues (port, RX ring index) a part of a forwarder serves, when several datapath threads
# share the forwarder's queues (vhostmap.daemon.worker.Datapath); None: all of them (one thread).
Owns = Callable[[NetmapAdapter, int], bool] | None


def owned(owns: Owns, port: NetmapAdapter, ring_index: int) -> bool:
    """Whether RX ring ``ring_index`` of ``port`` is served by the part ``owns`` describes."""
    return owns is None or owns(port, ring_index)


def owned_wake_fds(owns: Owns, ports: list[NetmapAdapter], rx_rings: list[list[int]]) -> list[int]:
    """The fds a part wakes on: every fd of ``ports`` for the whole forwarder (``owns`` None), else those of
    the receive queues it serves (NetmapAdapter.queue_wake_fds; ``rx_rings[k]``: the RX rings of
    ``ports[k]`` the forwarder reads). An eventfd is drained by the thread that wakes on it: one only."""
    fds: list[int] = []
    for port, rings in zip(ports, rx_rings, strict=True):
        wanted = (
            port.wake_fds()
            if owns is None
            else [fd for r in rings if owns(port, r) for fd in port.queue_wake_fds(r)]
        )
        fds += [fd for fd in wanted if fd not in fds]
    return fds


def struct_array(ctype: str, items: list[Any]) -> Any:
    """A C array of ``ctype`` holding copies of the structs ``items`` point to (at least one element)."""
    array = ffi.new(f"{ctype}[]", max(len(items), 1))
    for k, item in enumerate(items):
        array[k] = item[0]
    return array


def with_stash(q: Any, queues: FastQueues) -> Any:
    """A copy of struct vhu_queue ``q`` whose syncs recycle buffers through the stash of the port ``queues``
    came from: for the forwarders' passes, where the daemon is the ring user (netmap/stash.py)."""
    copy = ffi.new("struct vhu_queue *", q[0])
    copy.stash = queues.stash
    return copy


class OneCopy:
    """The table of references to guest memory a one-copy pass (vhu_link_pass, vhu_switch_pass) hands out
    tickets into: ``cap`` entries, one per slot a source sync may fill (its kring's size at most), allocated
    once per plan. ``min_head``: bytes the first slot of a frame must refer to, else it is copied (the switch
    reads the Ethernet header there)."""

    def __init__(self, cap: int, min_head: int = 0) -> None:
        if not 0 < cap <= lib.VQ_REF_MAX:
            raise ValueError(f"{cap} references: at most {lib.VQ_REF_MAX}")
        self.entries = ffi.new("struct vq_ref[]", cap)
        self.c = ffi.new("struct vq_refs *")
        self.c.refs, self.c.cap, self.c.min_head = self.entries, cap, min_head


class CompiledPass:
    """The compiled form of a forwarder's round: the C array it runs and, for each kring it syncs, who to
    tell when that sync fails (``sides``). Good while the ports' FastQueues ``versions`` hold."""

    def __init__(
        self, queues: tuple[FastQueues, ...], ctype: str, items: list[Any], sides: list[Side]
    ) -> None:
        # The FastQueues hold the objects the items point into.
        self.queues = queues
        self.versions = tuple(q.version for q in queues)
        self.n = len(items)
        self.c = struct_array(ctype, items)
        self.sides = sides


def port_pass(
    port: NetmapAdapter, plan: CompiledPass | None, receive: bool, stash: bool, owns: Owns = None
) -> CompiledPass | None:
    """The compiled pass over one port's running RX (``receive``) or TX queues, ``plan`` again while it holds,
    or None when the port takes the Python path. ``stash``: the queues recycle buffers through the port's
    stash (netmap/stash.py). ``owns``: only the receive queues it names."""
    q = port.fast_queues()
    if q is None:
        return None
    if plan is not None and plan.versions == (q.version,):
        return plan
    queues, krings = (q.rx, port.rx_rings) if receive else (q.tx, port.tx_rings)
    rings = sorted(i for i in queues if not receive or owned(owns, port, i))
    sides: list[Side] = [(port, krings[i], receive) for i in rings]
    items = [with_stash(queues[i], q) if stash else queues[i] for i in rings]
    return CompiledPass((q,), "struct vhu_queue", items, sides)


class PassOutcome:
    """Where a compiled pass says which sync stopped it, and why."""

    def __init__(self) -> None:
        self.failed = ffi.new("int32_t *")
        self.status = ffi.new("int32_t *")

    def check(self, sides: list[Side]) -> bool:
        """Hand a stopped sync to its port (fault, or the Python sync); True if one did stop. ``sides`` lists
        the syncs of the pass in the order the pass numbers them."""
        k = int(self.failed[0])
        if k < 0:
            return False
        port, kring, receive = sides[k]
        if receive:
            port.fast_failed(kring, receive, int(self.status[0]))
        else:
            # Another thread may sync that TX ring too: its fault is read and handled under the ring's lock.
            with ring_lock(port, kring.ring_id):
                port.fast_failed(kring, receive, int(self.status[0]))
        return True

"""Host rings bound to a TAP device, and netmap's transparent mode between host and hardware rings.

Follows netmap.c: netmap_transmit (frames the host stack sends enter the host RX
kring at nr_hwtail, dropped when it is full), netmap_txsync_to_host with netmap_grab_packets/netmap_send_up
(what the user puts in the host TX kring goes to the stack, then the slots are reclaimed at once),
netmap_rxsync_from_host, and transparent mode (NR_FORWARD on a ring, NS_FORWARD on slots) re-expressed with
modern netmap's rules: on an rxsync of a hardware RX ring with NR_FORWARD, the slots the user releases with
NS_FORWARD go up to the stack (the seed's grab_packets before nm_rxsync); on an rxsync of the host RX ring
with NR_FORWARD, the released slots with NS_FORWARD go out through the hardware TX rings by swapping buffers
(netmap_sw_to_nic), and those rings are then txsynced, as netmap_poll's second tx flush does.

For vhostmap the host stack of a port is a TAP device: reading the TAP gives what the stack sends, writing it
injects frames into the stack. The TAP fd is non-blocking and is the host rings' wake-up fd; every host
rxsync drains it (importing what fits, dropping the rest), so a level-triggered poller never spins on it.

``HostStack(adapter, "tap0")`` attaches itself as the adapter's host port (``adapter.host_port``): from then
on the adapter's host syncs, its transparent mode and its wake-up fds go through it, and closing the adapter
closes it. Without a host port the adapter's host rings keep the default behaviour (adapter.py).

Frames are read from and written to slots with ``SlotFrames``, ``send_frames`` and ``RxFill``, and drops are
reported with ``DropReport`` (frames.py, shared with the generic adapter).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vhostmap.ethernet import ETH_HLEN
from vhostmap.netmap.abi import (
    NM_RESERVED_BUFS,
    NR_FORWARD,
    NS_BUF_CHANGED,
    NS_FORWARD,
    NS_MOREFRAG,
    NS_VNET_HDR,
)
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.frames import DropReport, RxFill, SlotFrames, frame_out, send_frames
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.offload import STACK_OFFLOADS, OffloadError, StackIngress, VnetHeader
from vhostmap.netmap.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TapDevice
from vhostmap.virtio.spec import VIRTIO_NET_HDR, VIRTIO_NET_HDR_LEGACY

log = logging.getLogger(__name__)

# Reads of the TAP per host rxsync. Enough to drain a TAP queue (txqueuelen 1000) at once, and a bound on the
# time one sync may take while the stack keeps sending; what is left wakes the worker again.
HOST_RX_BUDGET = 1024
# Largest frame a TAP read can return (MTU 65535 plus Ethernet and VLAN headers), rounded up.
TAP_FRAME_MAX = 1 << 17
# Shortest frame passed to the stack (an Ethernet header), as netmap_grab_packets requires.


# --- the host stack -----------------------------------------------------------------------------------------
@dataclass
class HostStats:
    """Counters of a host stack, from the rings' point of view: ``rx_*`` are frames the stack sent into the
    host RX kring, ``tx_*`` frames written to the stack (host TX kring and forwarded_up). ``forwarded_up``
    counts frames passed from hardware RX rings to the stack, ``forwarded_down`` frames passed from the host
    RX ring to hardware TX rings, ``forward_drops`` NS_FORWARD frames that could not be passed on;
    ``rx_offloaded`` frames from the stack whose offloads were completed, ``rx_offload_passed`` those that
    kept them with their header (NS_VNET_HDR), ``rx_bad_header`` those dropped for a virtio-net header they
    did not bear out."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0
    forwarded_up: int = 0
    forwarded_down: int = 0
    forward_drops: int = 0
    rx_offloaded: int = 0
    rx_offload_passed: int = 0
    rx_bad_header: int = 0


class HostStack:
    """The host rings of ``adapter`` bound to the TAP ``ifname``.

    ``create``: create the TAP if it does not exist (it is then deleted by ``close``; a TAP that existed is
    left in place). ``up``: bring it up (writes to a TAP that is down fail). The stack attaches itself as
    ``adapter.host_port`` and detaches on ``close``. Raises TapError when the TAP cannot be opened, and
    ValueError when the adapter's host rings are already bound.
    """

    def __init__(
        self,
        adapter: NetmapAdapter,
        ifname: str,
        *,
        create: bool = True,
        up: bool = True,
        multi_queue: bool = False,
        rx_budget: int = HOST_RX_BUDGET,
    ) -> None:
        if adapter.host_port is not None:
            raise ValueError(f"{adapter.name}: host rings already bound to {adapter.host_port.name}")
        self.adapter = adapter
        self.memory = adapter.memory
        self.rx_budget = rx_budget
        self.stats = HostStats()
        # With a virtio-net header each way, the stack may hand over partial checksums and 64 KiB GSO frames
        # (no segmentation in the kernel for our sake); they keep their header or are completed on the way in.
        self.tap = TapDevice.open(ifname, create=create, multi_queue=multi_queue, vnet_hdr=True)
        try:
            self.tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            if up:
                self.tap.set_up()
        except BaseException:
            self.tap.close()
            raise
        self._scratch = memoryview(bytearray(TAP_FRAME_MAX))
        self._vnet = memoryview(bytearray(VIRTIO_NET_HDR_LEGACY.size))
        self._ingress = StackIngress()
        self._drops = DropReport(log, self.stats, adapter.name)
        adapter.host_port = self

    @property
    def name(self) -> str:
        """The TAP's name."""
        return self.tap.name

    def wake_fds(self) -> list[int]:
        """The TAP fd: readable when the stack has sent something. Not an eventfd: host rxsync drains it."""
        return [] if self.tap.closed else [self.tap.fd]

    def counters(self) -> dict[str, int]:
        """The counters as a dict."""
        return asdict(self.stats)

    # --- host TX: ring -> stack -----------------------------------------------------------------------------
    def txsync(self, kring: Kring, flags: int) -> None:
        """Write the frames of [nr_hwcur, rhead) of the host TX kring to the TAP and reclaim their slots.

        A trailing frame whose last slot is not handed over yet is kept for the next sync, unless it alone
        takes every slot the user can hand over: it can never complete, and is dropped.
        """
        # Writes to a TAP complete at once: everything sent is reclaimed (netmap_txsync_to_host).
        send_frames(kring, self.memory, self._write_frame, self._drops, offloads=self.accepted_offloads)

    @property
    def accepted_offloads(self) -> int:
        """The offloads a frame may keep on its way into the stack (a TAP with IFF_VNET_HDR takes them)."""
        return STACK_OFFLOADS

    def pass_offloads(self, needs: int) -> None:
        """Frames from the stack may keep the offloads ``needs`` names (NetmapAdapter.pass_offloads)."""
        self._ingress.passed = needs

    def send_up(self, kring: Kring) -> int:
        """Transparent mode, NIC -> host: write to the TAP the frames released with NS_FORWARD among
        [nr_hwcur, rhead) of hardware RX ``kring`` (call before the adapter's hook releases them), clearing
        the flag as netmap_grab_packets does. Returns the frames forwarded."""
        frames = SlotFrames(kring, self.memory, kring.nr_hwcur, kring.pending())
        sent = 0
        for i in range(len(frames)):
            if not frames.first_flags[i] & NS_FORWARD:
                continue
            frames.clear_flags(i, NS_FORWARD)
            if not frames.valid[i] or frames.lengths[i] < ETH_HLEN:
                self.stats.forward_drops += 1
                continue
            try:
                payload, length = frame_out(frames, i, self.accepted_offloads)
            except OffloadError as e:
                self._drops.report(kring, f"offload header: {e}")
                self.stats.forward_drops += 1
                continue
            if self._write(kring, payload, length):
                sent += 1
        self.stats.forwarded_up += sent
        return sent

    def _write(self, kring: Kring, payload: Sequence[bytes | memoryview], length: int) -> bool:
        """Write one frame, ``payload`` starting with its virtio-net header."""
        try:
            os.writev(self.tap.fd, payload)
        except OSError as e:
            # EIO: the TAP is down; EAGAIN/ENOBUFS: no room in the stack. Counted, never retried.
            self._drops.tx(kring, f"write to {self.tap.name}: {errno.errorcode.get(e.errno or 0, e.errno)}")
            return False
        self.stats.tx_packets += 1
        self.stats.tx_bytes += length
        return True

    def _write_frame(self, kring: Kring, payload: list[bytes | memoryview], length: int) -> bool:
        # A failed write is a counted drop, never a reason to keep the frame in the ring.
        self._write(kring, payload, length)
        return True

    # --- host RX: stack -> ring -----------------------------------------------------------------------------
    def rxsync(self, kring: Kring, flags: int) -> None:
        """Host RX kring: pass released NS_FORWARD slots down (transparent mode), take back [nr_hwcur, rhead),
        then import what the stack sent at nr_hwtail. Frames that find no room are dropped and counted; the
        TAP is drained either way (at most ``rx_budget`` reads)."""
        if kring.ring.flags & NR_FORWARD and kring.pending():
            moved, dropped = sw_to_nic(self.adapter, kring)
            self.stats.forwarded_down += moved
            self.stats.forward_drops += dropped
        kring.nr_hwcur = kring.rhead
        self._read(kring)

    def _read(self, kring: Kring) -> None:
        with RxFill(kring, self.memory) as fill:
            self._read_into(kring, fill)

    def _read_into(self, kring: Kring, fill: RxFill) -> None:
        scratch = self._scratch
        for _ in range(self.rx_budget):
            # Read straight into the next free slot's buffer; only a frame longer than a slot spills into the
            # scratch buffer, and only the spill is copied again.
            iov = [self._vnet, fill.view(), scratch] if fill.room else [self._vnet, scratch]
            try:
                length = os.readv(self.tap.fd, iov) - len(self._vnet)
            except BlockingIOError:
                return
            except OSError as e:
                self._drops.report(
                    kring, f"read from {self.tap.name}: {errno.errorcode.get(e.errno or 0, e.errno)}"
                )
                return
            if length <= 0:
                return
            h = VnetHeader.unpack(self._vnet)
            if h.asks_for_work:
                # The stack left work to do: the frame is gathered, and it or its completed frames copied in.
                head = fill.view()[: min(length, fill.cap)] if fill.room else memoryview(b"")
                self._import_offloaded(kring, fill, h, bytes(head) + bytes(scratch[: length - len(head)]))
                continue
            k = fill.slots_for(length)
            if k > fill.room:
                self._drop_rx(kring, "host RX ring full")
                continue
            spill = length - fill.cap
            for j in range(1, k):
                part = scratch[(j - 1) * fill.cap : min(j * fill.cap, spill)]
                fill.view(j)[: len(part)] = part
            fill.commit(length)
            self.stats.rx_packets += 1
            self.stats.rx_bytes += length

    def _import_offloaded(self, kring: Kring, fill: RxFill, h: VnetHeader, frame: bytes) -> None:
        """A frame the stack left a checksum or segmentation to: it with its header, or its completed frames,
        go in (StackIngress)."""
        try:
            frames, flags = self._ingress(h, frame)
        except OffloadError as e:
            self.stats.rx_bad_header += 1
            self._drop_rx(kring, f"offload header: {e}")
            return
        if flags:
            self.stats.rx_offload_passed += 1
        else:
            self.stats.rx_offloaded += 1
        header = VIRTIO_NET_HDR.size if flags else 0
        for f in frames:
            if fill.put(f, flags):
                self.stats.rx_packets += 1
                self.stats.rx_bytes += len(f) - header
            else:
                self._drop_rx(kring, "host RX ring full")

    def _drop_rx(self, kring: Kring, reason: str) -> None:
        self.stats.rx_drops += 1
        kring.dropped += 1
        log.debug("%s: dropped a frame from %s: %s", kring.name, self.tap.name, reason)

    # --- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the adapter (its host rings fall back to the default) and close the TAP, which goes
        away if this stack created it. Idempotent."""
        if self.adapter.host_port is self:
            self.adapter.host_port = None
        self.tap.close()


def _tx_room(kring: Kring, nslots: int, nbufs: int) -> bool:
    """Whether the user's view of TX ``kring`` has ``nslots`` free slots from head holding usable buffers."""
    ring = kring.ring
    n = kring.nkr_num_slots
    head, tail = ring.head, ring.tail
    if head >= n or (tail - head) % n < nslots:
        return False
    bufs = ring.slots["buf_idx"][(head + np.arange(nslots)) % n]
    return bool(np.all((bufs >= NM_RESERVED_BUFS) & (bufs < nbufs)))


def sw_to_nic(adapter: NetmapAdapter, kring: Kring) -> tuple[int, int]:
    """Transparent mode, host -> NIC (netmap_sw_to_nic): move the frames released with NS_FORWARD among
    [nr_hwcur, rhead) of the host RX ``kring`` to the hardware TX rings, zero copy, then txsync the rings
    that got some.

    Each frame goes, whole, to the first TX ring (in order) whose user side has room: the slot at the ring's
    head swaps buffers with the host slot and head/cur advance, exactly as a user would. Call before the
    host rxsync releases the slots. Returns (frames moved, NS_FORWARD frames dropped for lack of room or
    for being malformed).
    """
    frames = SlotFrames(kring, adapter.memory, kring.nr_hwcur, kring.pending())
    src = kring.ring.slots
    n = kring.nkr_num_slots
    moved = dropped = 0
    t = 0
    touched: list[int] = []
    for i in range(len(frames)):
        if not frames.first_flags[i] & NS_FORWARD:
            continue
        if not frames.valid[i]:
            dropped += 1
            continue
        nslots = frames.ends[i] - frames.starts[i]
        while t < adapter.num_tx_rings and not _tx_room(adapter.tx_rings[t], nslots, kring.nbufs):
            t += 1
        if t == adapter.num_tx_rings:
            dropped += 1
            continue
        dst_kring = adapter.tx_rings[t]
        dst = dst_kring.ring
        dn = dst_kring.nkr_num_slots
        head = dst.head
        for j in range(frames.starts[i], frames.ends[i]):
            s = (frames.first + j) % n
            spare = int(dst.slots["buf_idx"][head])
            dst.slots["buf_idx"][head] = frames.bufs[j]
            dst.slots["len"][head] = frames.lens[j]
            dst.slots["flags"][head] = (src["flags"][s] & (NS_MOREFRAG | NS_VNET_HDR)) | NS_BUF_CHANGED
            src["buf_idx"][s] = spare
            src["flags"][s] = NS_BUF_CHANGED
            head = (head + 1) % dn
        dst.head = dst.cur = head
        if t not in touched:
            touched.append(t)
        moved += 1
    for t in touched:
        adapter.txsync(t)
    return moved, dropped

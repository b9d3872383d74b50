"""A fake modern virtio-net PCI device for the guest driver's tests, built on vhostmap's device-side code.

Registers are laid out as QEMU lays out virtio-net-pci's modern BAR (common configuration at 0x0, ISR at
0x1000, device configuration at 0x2000, notifications at 0x3000 with a multiplier of 4) and answer exactly
the accesses the spec allows, at exactly their width. Virtqueues are handled by vhostmap's own back-end
virtqueue code (SplitVirtqueue and the reference dequeue/enqueue kernels of rxtx.py), over a GuestMemory
whose "physical" addresses are those of the driver's fake DMA memory: the driver and the device meet in the
middle exactly as a guest and vhostmap do, but in one process and synchronously.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.abi import NS_MOREFRAG, RING_HEADER_SIZE, SLOT_DTYPE
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.messages import MemoryRegion
from vhostmap.vhost_user.rxtx import Buffers, dequeue, enqueue
from vhostmap.vhost_user.virtqueue import SplitVirtqueue, VringAddresses
from vhostmap.virtio.spec import (
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_PAIRS,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_SIZE,
    VIRTIO_NET_OK,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_DESC,
    VRING_DESC_F_NEXT,
    VirtioPciCap,
    VirtioPciCommonCfg,
    VirtioPciNotifyCap,
    bit,
)
from vhostmap_guest.dma import DmaMemory
from vhostmap_guest.virtio_pci import VirtioCap, VirtioPciModern

COMMON, ISR, DEVICE, NOTIFY = 0x0, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
BAR = 4
DEFAULT_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(0)  # VIRTIO_NET_F_CSUM: offered, and a driver without offloads must leave it
)
FIELDS = {
    f: (getattr(VirtioPciCommonCfg, f).offset, getattr(VirtioPciCommonCfg, f).size)
    for f, _ in VirtioPciCommonCfg._fields_
}
BY_OFFSET = {off: (name, size) for name, (off, size) in FIELDS.items()}


def pci_config() -> bytes:
    """A PCI configuration space with the four virtio capabilities QEMU gives virtio-net-pci."""
    cfg = bytearray(256)
    cfg[0:4] = (0x1AF4).to_bytes(2, "little") + (0x1041).to_bytes(2, "little")
    cfg[PCI_STATUS] = PCI_STATUS_CAP_LIST
    caps = [
        (VIRTIO_PCI_CAP_COMMON_CFG, COMMON, 0x1000),
        (VIRTIO_PCI_CAP_ISR_CFG, ISR, 0x1000),
        (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE, 0x1000),
        (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY, 0x1000),
    ]
    pos = 0x84
    cfg[PCI_CAPABILITY_LIST] = pos
    for i, (cfg_type, offset, length) in enumerate(caps):
        nxt = pos + 20 if i + 1 < len(caps) else 0
        if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
            cap = VirtioPciNotifyCap()
            cap.notify_off_multiplier = NOTIFY_MULTIPLIER
            inner = cap.cap
        else:
            cap = inner = VirtioPciCap()  # type: ignore[assignment]
        inner.cap_vndr, inner.cap_next, inner.cap_len = PCI_CAP_ID_VNDR, nxt, ctypes.sizeof(cap)
        inner.cfg_type, inner.bar, inner.offset, inner.length = cfg_type, BAR, offset, length
        raw = bytes(cap)
        cfg[pos : pos + len(raw)] = raw
        pos = nxt
    return bytes(cfg)


@dataclass
class QueueRegs:
    size: int = 256
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0


@dataclass
class Accesses:
    """Every register access, as (kind, offset, width)."""

    log: list[tuple[str, int, int]] = field(default_factory=list)


class FakeVirtioNet:
    """The device: `Registers` of BAR 4, the virtqueues behind them, and frames in and out.

    ``sent`` collects frames the driver transmitted (as the device received them); `deliver` puts frames
    into the driver's receive queue. With ``auto`` (the default) the device processes a queue whenever the
    driver notifies it, as a vhost-user back-end woken by a kick would.
    """

    def __init__(
        self,
        *,
        features: int = DEFAULT_FEATURES,
        queue_size: int = 256,
        max_pairs: int = 1,
        mac: bytes = bytes.fromhex("525400000001"),
        auto: bool = True,
    ) -> None:
        self.features = features
        self.max_pairs = max_pairs
        self.mac = mac
        self.auto = auto
        nq = 2 * max_pairs + (1 if features & bit(VIRTIO_NET_F_CTRL_VQ) else 0)
        self.regs = [QueueRegs(size=queue_size) for _ in range(nq)]
        self.ctrl_size = 64
        if features & bit(VIRTIO_NET_F_CTRL_VQ):
            self.regs[-1].size = self.ctrl_size
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.isr = 0
        self.generation = 0
        self.mem = GuestMemory()
        self.vqs: list[SplitVirtqueue] = []
        self.sent: list[bytes] = []
        self.active_pairs = 1
        self.accesses = Accesses()
        self.resets = 0
        # Device-side netmap ring for the kernels to copy through.
        self.nm = NetmapMemory(AllocatorParams(if_num=1, ring_num=2, ring_size=256 + 16 * 1024, buf_num=4096))
        self.layout = self.nm.create_if("dev", 1, 1, 1024, 1024, 0, 0)
        self.bufs = Buffers(self.nm.array, self.nm.buffers_offset, self.nm.buf_size)

    # --- memory ---------------------------------------------------------------------------------------
    def attach(self, dma: DmaMemory) -> None:
        """Let the device reach ``dma`` at its fake physical addresses."""
        base = int(dma.pages[0])
        self.mem.add_region(MemoryRegion(base, dma.size, base, 0), os.dup(dma.fd))

    def transport(self) -> VirtioPciModern:
        """A driver-side transport over this device's registers."""
        caps = {
            VIRTIO_PCI_CAP_COMMON_CFG: VirtioCap(VIRTIO_PCI_CAP_COMMON_CFG, BAR, COMMON, 0x1000),
            VIRTIO_PCI_CAP_ISR_CFG: VirtioCap(VIRTIO_PCI_CAP_ISR_CFG, BAR, ISR, 0x1000),
            VIRTIO_PCI_CAP_DEVICE_CFG: VirtioCap(VIRTIO_PCI_CAP_DEVICE_CFG, BAR, DEVICE, 0x1000),
            VIRTIO_PCI_CAP_NOTIFY_CFG: VirtioCap(
                VIRTIO_PCI_CAP_NOTIFY_CFG, BAR, NOTIFY, 0x1000, NOTIFY_MULTIPLIER
            ),
        }
        return VirtioPciModern(caps, {BAR: self}, name="fake")

    # --- Registers --------------------------------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        self.accesses.log.append(("r", offset, width))
        if COMMON <= offset < ISR:
            name, _ = self._field(offset, width)
            return self._common_read(name)
        if offset == ISR and width == 1:
            isr, self.isr = self.isr, 0
            return isr
        if DEVICE <= offset < NOTIFY:
            cfg = VIRTIO_NET_CONFIG.pack(self.mac, 1, self.max_pairs, 1500)
            off = offset - DEVICE
            return int.from_bytes(cfg[off : off + width], "little")
        raise AssertionError(f"read of {width} bytes at {offset:#x}")

    def write(self, offset: int, width: int, value: int) -> None:
        self.accesses.log.append(("w", offset, width))
        if COMMON <= offset < ISR:
            name, _ = self._field(offset, width)
            self._common_write(name, value)
            return
        if NOTIFY <= offset < NOTIFY + 0x1000:
            assert width == 2, "notifications are 16-bit writes"
            index = (offset - NOTIFY) // NOTIFY_MULTIPLIER
            assert value == index, f"notify for queue {value} at queue {index}'s address"
            self.notified(index)
            return
        raise AssertionError(f"write of {width} bytes at {offset:#x}")

    @staticmethod
    def _field(offset: int, width: int) -> tuple[str, int]:
        name, size = BY_OFFSET[offset - COMMON]
        assert size == width, f"{name} accessed with {width} bytes, it has {size}"
        return name, size

    def _q(self) -> QueueRegs:
        return self.regs[self.queue_select]

    def _common_read(self, name: str) -> int:
        q = self._q() if self.queue_select < len(self.regs) else QueueRegs(size=0)
        match name:
            case "device_feature":
                return (self.features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
            case "device_status":
                return self.status
            case "num_queues":
                return len(self.regs)
            case "config_generation":
                return self.generation
            case "queue_size":
                return q.size
            case "queue_enable":
                return q.enable
            case "queue_notify_off":
                return self.queue_select
            case _:
                raise AssertionError(f"read of {name}")

    def _common_write(self, name: str, value: int) -> None:
        q = self._q()
        match name:
            case "device_feature_select":
                self.device_feature_select = value
            case "driver_feature_select":
                self.driver_feature_select = value
            case "driver_feature":
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            case "device_status":
                self._set_status(value)
            case "queue_select":
                self.queue_select = value
            case "queue_size":
                assert value and not value & (value - 1) and value <= q.size
                q.size = value
            case "queue_msix_vector":
                pass
            case "queue_enable":
                q.enable = value
            case _ if name.startswith("queue_") and name[-3:] in ("_lo", "_hi"):
                part = name[6:-3]
                old = getattr(q, part)
                if name.endswith("_lo"):
                    setattr(q, part, (old & ~0xFFFFFFFF) | value)
                else:
                    setattr(q, part, (old & 0xFFFFFFFF) | (value << 32))
            case _:
                raise AssertionError(f"write of {name}")

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.resets += 1
            self.status = 0
            self.vqs = []
            self.driver_features = 0
            for q in self.regs:
                q.enable = 0
            return
        newly = value & ~self.status
        if newly & VIRTIO_CONFIG_S_FEATURES_OK and self.driver_features & ~self.features:
            value &= ~VIRTIO_CONFIG_S_FEATURES_OK  # features the device never offered
        if value & VIRTIO_CONFIG_S_DRIVER_OK and not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            self._start()
        self.status = value

    def _start(self) -> None:
        event_idx = bool(self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX))
        self.vqs = []
        for i, q in enumerate(self.regs):
            vq = SplitVirtqueue(i)
            if q.enable:
                vq.set_num(q.size)
                vq.addresses = VringAddresses(q.desc, q.driver, q.device)
                vq.event_idx = event_idx
                vq.started = vq.enabled = True
                vq.map(self.mem)
            self.vqs.append(vq)

    # --- the device's work --------------------------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        return bool(self.driver_features & bit(VIRTIO_NET_F_MRG_RXBUF))

    def notified(self, index: int) -> None:
        if not self.auto or not self.vqs:
            return
        if index == len(self.regs) - 1 and self.features & bit(VIRTIO_NET_F_CTRL_VQ):
            self.control()
        elif index % 2 == 1:
            self.take_sent(index)

    def _signal(self, vq: SplitVirtqueue) -> None:
        if vq.needs_call():
            self.isr |= VIRTIO_PCI_ISR_QUEUE
        vq.signalled_used = vq.used_idx

    def take_sent(self, index: int = 1) -> int:
        """Dequeue what the driver made available on TX queue ``index`` into ``sent``; frames taken."""
        vq = self.vqs[index]
        slots = self._slots(self.layout.rx_rings[0].offset)
        res = dequeue(vq, self.mem, VIRTIO_NET_HDR_SIZE, slots, 0, len(slots) - 1, self.bufs)
        vq.flush_used()
        self._signal(vq)
        vq.enable_kicks()
        cur = b""
        for i in range(res.slots):
            s = slots[i]
            cur += self.nm.array[self.bufs.base + int(s["buf_idx"]) * self.bufs.size :][
                : int(s["len"])
            ].tobytes()
            if not int(s["flags"]) & NS_MOREFRAG:
                self.sent.append(cur)
                cur = b""
        return res.packets

    def deliver(self, frames: list[bytes], index: int = 0) -> int:
        """Enqueue ``frames`` into RX queue ``index`` (as far as it has buffers); frames delivered."""
        vq = self.vqs[index]
        slots = self._slots(self.layout.tx_rings[0].offset)
        pos = 0
        for f in frames:
            for k in range(0, len(f), self.bufs.size):
                part = f[k : k + self.bufs.size]
                s = slots[pos]
                start = self.bufs.base + int(s["buf_idx"]) * self.bufs.size
                self.nm.array[start : start + len(part)] = np.frombuffer(part, np.uint8)
                slots["len"][pos] = len(part)
                slots["flags"][pos] = NS_MOREFRAG if k + self.bufs.size < len(f) else 0
                pos += 1
        res = enqueue(vq, self.mem, VIRTIO_NET_HDR_SIZE, self.mergeable, slots, 0, pos, self.bufs)
        vq.flush_used()
        self._signal(vq)
        return res.packets

    def control(self) -> None:
        """Answer the control queue (its chains mix readable and writable parts, so walk them here)."""
        vq = self.vqs[-1]
        while vq.pending():
            assert vq._avail16 is not None and vq._desc is not None
            head = int(vq._avail16[2 + vq.last_avail_idx % vq.num])
            vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
            parts = []
            i = head
            while True:
                addr, length, flags, nxt = VRING_DESC.unpack_from(vq._desc, VRING_DESC.size * i)
                parts.append((addr, length))
                if not flags & VRING_DESC_F_NEXT:
                    break
                i = nxt
            cls, cmd = VIRTIO_NET_CTRL_HDR.unpack(self.mem.read(parts[0][0], 2))
            data = self.mem.read(parts[1][0], parts[1][1])
            if cls == VIRTIO_NET_CTRL_MQ and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET:
                (self.active_pairs,) = VIRTIO_NET_CTRL_MQ_PAIRS.unpack(data)
            self.mem.write(parts[-1][0], bytes([VIRTIO_NET_OK]))
            vq.push_used(head, 1)
        vq.flush_used()

    def _slots(self, ring_offset: int) -> npt.NDArray[np.void]:
        return np.frombuffer(self.nm.region.mm, SLOT_DTYPE, 1024, ring_offset + RING_HEADER_SIZE)

    def take_sent_reversed(self, index: int = 1) -> int:
        """Like `take_sent` for single-chain frames, but completing the chains in reverse order."""
        vq = self.vqs[index]
        chains = [vq.pop(writable=False) for _ in range(vq.pending())]
        for chain in chains:
            data = b"".join(self.mem.read(gpa, length) for gpa, length in chain.segments)
            self.sent.append(data[VIRTIO_NET_HDR_SIZE:])
        for chain in reversed(chains):
            vq.push_used(chain.head, 0)
        vq.flush_used()
        vq.enable_kicks()
        return len(chains)

    def deliver_reversed(self, frames: list[bytes], index: int = 0) -> None:
        """Write each frame into its own receive chain, then publish the used entries in reverse order."""
        vq = self.vqs[index]
        used = []
        for f in frames:
            chain = vq.pop(writable=True)
            data = VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + f
            off = 0
            for gpa, length in chain.segments:
                part = data[off : off + length]
                self.mem.write(gpa, part)
                off += len(part)
            used.append((chain.head, len(data)))
        for head, length in reversed(used):
            vq.push_used(head, length)
        vq.flush_used()

    # --- hostile writes -----------------------------------------------------------------------------------
    def forge_used(self, index: int, head: int, length: int) -> None:
        """Publish a used entry of the device's choosing on queue ``index``."""
        vq = self.vqs[index]
        vq.push_used(head, length)
        vq.flush_used()

    def close(self) -> None:
        self.mem.close()
        self.nm.close()

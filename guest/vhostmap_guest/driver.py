"""Native mode: the guest's own virtio-net device driven from userspace, its virtqueues behind netmap rings.

The device is taken from the kernel (unbound from virtio-pci and bound to uio_pci_generic, bus mastering
switched on), initialised as spec 3.1.1 says (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
DRIVER_OK) with VERSION_1, MRG_RXBUF, MQ (+CTRL_VQ, which MQ needs to switch queue pairs on), EVENT_IDX,
MAC and STATUS as the device offers them, and becomes a `VirtioNetAdapter`: a netmap adapter with one kring
pair per queue pair whose buffers, allocated by vhostmap's allocator in guest huge pages, are the very
buffers the descriptors point at (see virtqueue.py). txsync publishes [hwcur, head) and reclaims what the
device used; rxsync re-posts released slots and imports received frames.

Waiting: INTx through /dev/uioN (uio_pci_generic masks INTx in its handler; the waiter acknowledges the ISR,
asks the queues for an interrupt, re-checks, unmasks and sleeps in select), or busy polling.

Giving the device back: closing the port resets the device (which stops its DMA) and rebinds it to the
kernel's virtio-pci, so virtio_net makes the interface again. So does an exit through atexit or SIGTERM, and,
for deaths nothing in the process can catch (SIGKILL), a forked guardian that waits on a pipe: when the pipe
closes without the word "the owner gave it back", the guardian resets and rebinds the device itself.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vhostmap.netmap.abi import IF_HEADER_SIZE, if_size, ring_size
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory, region_size
from vhostmap.netmap.errors import PortBroken
from vhostmap.netmap.kring import Kring
from vhostmap.netmap.user import POLLIN, POLLOUT, PortSpec
from vhostmap.virtio.spec import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_VENDOR_ID,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_PAIRS,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_SIZE,
    VIRTIO_NET_OK,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_MODERN_DEVICE_ID_BASE,
    VIRTIO_PCI_TRANSITIONAL_NET_DEVICE_ID,
    VIRTIO_PCI_VENDOR_ID,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VirtioNetConfig,
    bit,
    vring_avail_size,
    vring_desc_size,
    vring_used_size,
)
from vhostmap_guest.dma import DmaArea, DmaError, DmaMemory, reserve_hugepages
from vhostmap_guest.pci import BDF, SYSFS_PCI_DEVICES, SYSFS_PCI_DRIVERS, SYSFS_PCI_PROBE
from vhostmap_guest.port import AdapterPort
from vhostmap_guest.virtio_pci import (
    MmioRegisters,
    PciConfigSpace,
    VirtioPciError,
    VirtioPciModern,
    open_sysfs,
    parse_virtio_caps,
)
from vhostmap_guest.virtqueue import (
    BufferAddresses,
    DeviceFault,
    DriverQueue,
    RxQueue,
    TxQueue,
    full_barrier,
)

log = logging.getLogger(__name__)

# What the driver accepts when offered. No offloads: headers stay zero and frames are plain.
DRIVER_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MQ)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MTU)
)
UIO_DRIVER = "uio_pci_generic"
KERNEL_DRIVER = "virtio-pci"
SYSFS_NET = Path("/sys/class/net")
# Spare buffers beyond one per slot, for applications that swap buffers in and out of slots.
EXTRA_BUFFERS = 256
# A control command is answered while QEMU handles the notification; allow a slow TCG guest plenty.
CTRL_TIMEOUT = 10.0
HUGEPAGE = 1 << 21


class NativeUnavailable(RuntimeError):
    """Native mode cannot work here (not a modern virtio-net device, no uio_pci_generic, not root...).

    Raised before anything is changed, so that "auto" mode can use generic mode instead.
    """


@dataclass(frozen=True)
class DeviceInfo:
    """What feature negotiation and the configuration space said about a virtio-net device."""

    features: int
    mac: bytes | None
    max_pairs: int
    mtu: int | None
    rx_size: int
    tx_size: int
    ctrl_size: int

    def has(self, feature: int) -> bool:
        """Whether feature bit number ``feature`` was negotiated."""
        return bool(self.features & bit(feature))


def negotiate(transport: VirtioPciModern, driver_features: int = DRIVER_FEATURES) -> DeviceInfo:
    """Reset the device, negotiate features (FEATURES_OK) and read what the driver needs to size itself."""
    transport.reset()
    transport.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    transport.add_status(VIRTIO_CONFIG_S_DRIVER)
    offered = transport.device_features()
    if not offered & bit(VIRTIO_F_VERSION_1):
        raise VirtioPciError(f"{transport.name}: the device does not offer VIRTIO_F_VERSION_1")
    features = offered & driver_features
    if not features & bit(VIRTIO_NET_F_CTRL_VQ):
        features &= ~bit(VIRTIO_NET_F_MQ)  # MQ cannot be used without the control queue
    transport.set_driver_features(features)
    fields = [(VirtioNetConfig.mac.offset + i, 1) for i in range(6)]
    fields += [
        (VirtioNetConfig.max_virtqueue_pairs.offset, VirtioNetConfig.max_virtqueue_pairs.size),
        (VirtioNetConfig.mtu.offset, VirtioNetConfig.mtu.size),
    ]
    values = transport.read_config(fields) if transport.device_cfg is not None else [0] * len(fields)
    mac = bytes(values[:6]) if features & bit(VIRTIO_NET_F_MAC) else None
    max_pairs = max(1, values[6]) if features & bit(VIRTIO_NET_F_MQ) else 1
    mtu = values[7] if features & bit(VIRTIO_NET_F_MTU) else None
    num_queues = transport.num_queues
    if num_queues < 2 * max_pairs:
        raise VirtioPciError(f"{transport.name}: {num_queues} queues for {max_pairs} queue pairs")
    ctrl_size = transport.queue_max_size(2 * max_pairs) if features & bit(VIRTIO_NET_F_CTRL_VQ) else 0
    return DeviceInfo(
        features=features,
        mac=mac,
        max_pairs=max_pairs,
        mtu=mtu,
        rx_size=transport.queue_max_size(0),
        tx_size=transport.queue_max_size(1),
        ctrl_size=ctrl_size,
    )


def allocator_params(pairs: int, rx_slots: int, tx_slots: int) -> AllocatorParams:
    """A netmap allocator just big enough for ``pairs`` ring pairs plus the host pair, and spare buffers."""
    rings = 2 * pairs + 2
    return AllocatorParams(
        if_size=max(if_size(rings), IF_HEADER_SIZE),
        if_num=1,
        ring_size=ring_size(max(rx_slots, tx_slots)),
        ring_num=rings,
        buf_size=2048,
        buf_num=(pairs + 1) * (rx_slots + tx_slots) + EXTRA_BUFFERS,
    )


def ring_area_size(info: DeviceInfo, pairs: int, page_size: int) -> int:
    """Bytes of DMA memory the virtqueues of ``pairs`` queue pairs (and the control queue) and their
    virtio-net headers take, in the order VirtioNetAdapter carves them."""

    def queue(size: int) -> list[int]:
        return [vring_desc_size(size), vring_avail_size(size), vring_used_size(size)]

    sizes: list[int] = []
    for _ in range(pairs):
        sizes += [*queue(info.rx_size), VIRTIO_NET_HDR_SIZE * (info.rx_size // 2)]
        sizes += [*queue(info.tx_size), VIRTIO_NET_HDR_SIZE]
    if info.ctrl_size:
        sizes += [*queue(info.ctrl_size), CtrlQueue.BUFFER]
    return DmaArea.need(sizes, page_size)


class CtrlQueue:
    """The control virtqueue (spec 5.1.6.5): one command at a time, answered synchronously by the device."""

    BUFFER = 64  # bytes for a command's header, data and ack

    def __init__(self, vq: DriverQueue, area: DmaArea) -> None:
        self.vq = vq
        self.area = area
        self.off = area.alloc(self.BUFFER, 16)
        self.phys = area.memory.phys(self.off)

    def command(self, cls: int, cmd: int, data: bytes, timeout: float = CTRL_TIMEOUT) -> None:
        """Send one command and wait for its ack; VirtioPciError if the device refuses or does not answer."""
        mem = self.area.memory.array
        hdr = VIRTIO_NET_CTRL_HDR.pack(cls, cmd)
        ack_at = len(hdr) + len(data)
        mem[self.off : self.off + ack_at] = list(hdr + data)
        mem[self.off + ack_at] = 0xFF
        d = self.vq.desc
        d[0] = (self.phys, len(hdr), VRING_DESC_F_NEXT, 1)
        d[1] = (self.phys + len(hdr), len(data), VRING_DESC_F_NEXT, 2)
        d[2] = (self.phys + ack_at, 1, VRING_DESC_F_WRITE, 0)
        self.vq.publish(np.zeros(1, dtype=np.int64))
        deadline = time.monotonic() + timeout
        while not self.vq.used_pending():
            if time.monotonic() > deadline:
                raise VirtioPciError(f"control queue: no answer to command {cls}/{cmd} within {timeout:g} s")
            time.sleep(0.001)
        ids, _ = self.vq.take_used(1)
        if int(ids[0]) != 0:
            raise DeviceFault(self.vq.index, f"control queue returned chain {int(ids[0])}, not 0")
        ack = int(mem[self.off + ack_at])
        if ack != VIRTIO_NET_OK:
            raise VirtioPciError(f"control command {cls}/{cmd} refused (ack {ack})")


class VirtioNetAdapter(NetmapAdapter):
    """A virtio-net device (through ``transport``) as a netmap adapter with ``pairs`` kring pairs.

    ``memory`` must live in ``buffers_dma`` (a NetmapMemory over its file); rings and headers are carved from
    ``rings_dma``; the adapter owns all three. Construction sets the device up to DRIVER_OK with every RX slot
    posted; ``close`` resets the device (its DMA stops) before freeing anything. `create` negotiates and
    allocates, then constructs.
    """

    def __init__(
        self,
        name: str,
        transport: VirtioPciModern,
        info: DeviceInfo,
        pairs: int,
        memory: NetmapMemory,
        buffers_dma: DmaMemory,
        rings_dma: DmaMemory,
    ) -> None:
        if not 1 <= pairs <= info.max_pairs:
            raise ValueError(f"{name}: {pairs} queue pairs asked, the device has {info.max_pairs}")
        self.transport = transport
        self.info = info
        self.pairs = pairs
        rx_slots, tx_slots = info.rx_size // 2, info.tx_size // 2
        super().__init__(
            name, memory, num_tx_rings=pairs, num_rx_rings=pairs, num_tx_desc=tx_slots, num_rx_desc=rx_slots
        )
        self._started = False
        self.buffers_dma = buffers_dma
        self.rings_dma = rings_dma
        area = DmaArea(rings_dma)
        bufs = BufferAddresses(buffers_dma, memory.buffers_offset, memory.buf_size, memory.nbufs)
        event_idx = info.has(VIRTIO_RING_F_EVENT_IDX)

        def queue(index: int, size: int) -> DriverQueue:
            return DriverQueue(index, size, rings_dma, area, event_idx=event_idx, notify=self._notify)

        self.rxq: list[RxQueue] = []
        self.txq: list[TxQueue] = []
        for i in range(pairs):
            mergeable = info.has(VIRTIO_NET_F_MRG_RXBUF)
            self.rxq.append(RxQueue(queue(2 * i, info.rx_size), rx_slots, bufs, area, mergeable=mergeable))
            self.txq.append(TxQueue(queue(2 * i + 1, info.tx_size), tx_slots, bufs, area))
        self.ctrl: CtrlQueue | None = None
        if info.has(VIRTIO_NET_F_CTRL_VQ) and info.ctrl_size:
            self.ctrl = CtrlQueue(queue(2 * info.max_pairs, info.ctrl_size), area)
        for q, kring in zip(self.rxq, self.rx_rings, strict=False):
            q.post(kring)
        queues = [q.vq for q in self.rxq] + [q.vq for q in self.txq]
        queues += [self.ctrl.vq] if self.ctrl is not None else []
        for vq in queues:
            transport.setup_queue(vq.index, vq.size, vq.desc_phys, vq.avail_phys, vq.used_phys)
        # Under TCG this store can take seconds: QEMU starts the vhost-user back-end before it returns.
        transport.add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        self._started = True
        if pairs > 1:
            assert self.ctrl is not None
            self.ctrl.command(
                VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_MQ_PAIRS.pack(pairs)
            )
        for q in self.rxq:
            transport.notify(q.vq.index)  # the buffers posted before DRIVER_OK

    @classmethod
    def create(
        cls,
        name: str,
        transport: VirtioPciModern,
        dma: Callable[[str, int], DmaMemory],
        pairs: int | None = None,
    ) -> VirtioNetAdapter:
        """Negotiate with the device, allocate DMA memory with ``dma(name, size)`` and build the adapter
        (``pairs`` queue pairs, default all the device has)."""
        info = negotiate(transport)
        npairs = info.max_pairs if pairs is None else pairs
        if not 1 <= npairs <= info.max_pairs:
            raise ValueError(f"{name}: {npairs} queue pairs asked, the device has {info.max_pairs}")
        params = allocator_params(npairs, info.rx_size // 2, info.tx_size // 2)
        ring_bytes = ring_area_size(info, npairs, HUGEPAGE)
        owned: list[Callable[[], None]] = []
        try:
            buffers_dma = dma(f"vhostmap-{name}-bufs", region_size(params))
            owned.append(buffers_dma.close)
            rings_dma = dma(f"vhostmap-{name}-rings", ring_bytes)
            owned.append(rings_dma.close)
            memory = NetmapMemory(params, fd=os.dup(buffers_dma.fd))
            owned.append(memory.close)
            return cls(name, transport, info, npairs, memory, buffers_dma, rings_dma)
        except BaseException:
            with contextlib.suppress(Exception):
                transport.reset()
            for close in reversed(owned):
                close()
            raise

    def _notify(self, index: int) -> None:
        if self._started:
            self.transport.notify(index)

    # --- NetmapAdapter hooks --------------------------------------------------------------------------
    def nm_txsync(self, kring: Kring, flags: int) -> None:
        """Publish [hwcur, head) and reclaim what the device has sent."""
        q = self.txq[kring.ring_id]
        try:
            q.transmit(kring)
            q.reclaim(kring)
        except DeviceFault as e:
            raise PortBroken(self.name, str(e)) from None

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        """Re-post released slots, then import what the device has received."""
        q = self.rxq[kring.ring_id]
        kring.nr_hwcur = kring.rhead
        try:
            q.post(kring)
            q.receive(kring, self.memory.array, self.memory.buffers_offset)
        except DeviceFault as e:
            raise PortBroken(self.name, str(e)) from None

    def queues_for(self, events: int, tx: Sequence[int], rx: Sequence[int]) -> list[DriverQueue]:
        """The virtqueues whose interrupts wake a poll for ``events`` on TX rings ``tx``, RX rings ``rx``."""
        queues = [self.rxq[i].vq for i in rx] if events & POLLIN else []
        if events & POLLOUT:
            queues += [self.txq[i].vq for i in tx]
        return queues

    def stop(self) -> None:
        """Reset the device: it stops using the rings and buffers. Idempotent."""
        if self._started:
            self._started = False
            self.transport.reset()

    def close(self) -> None:
        """Reset the device, then free the rings, the buffers and the DMA memory."""
        try:
            self.stop()
        finally:
            try:
                super().close()
            finally:
                self.memory.close()
                self.rings_dma.close()
                self.buffers_dma.close()


# --- interrupts ---------------------------------------------------------------------------------------------
class IntxWaiter:
    """Sleep until the device interrupts (INTx through uio_pci_generic's /dev/uioN) or a timeout."""

    def __init__(self, uio: Path, config: PciConfigSpace, transport: VirtioPciModern) -> None:
        self.fd = os.open(uio, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.config = config
        self.transport = transport
        self.wakeups = 0

    def wait(self, queues: Sequence[DriverQueue], timeout: float) -> None:
        """Ask ``queues`` for an interrupt, and sleep unless one of them already has used entries."""
        # Order matters: acknowledge what is pending first, then ask for interrupts and look again, and
        # only then unmask; anything arriving after the look raises a fresh interrupt.
        self.transport.read_isr()
        for q in queues:
            q.enable_interrupts()
        full_barrier()
        try:
            if any(q.used_pending() for q in queues):
                return
            command = self.config.read(PCI_COMMAND, 2)
            if command & PCI_COMMAND_INTX_DISABLE:
                self.config.write(PCI_COMMAND, 2, command & ~PCI_COMMAND_INTX_DISABLE)
            readable, _, _ = select.select([self.fd], [], [], timeout)
            if readable:
                self.wakeups += 1
                with contextlib.suppress(BlockingIOError):
                    os.read(self.fd, 4)  # the interrupt count; reading re-arms select
        finally:
            for q in queues:
                q.disable_interrupts()

    def close(self) -> None:
        """Close /dev/uioN."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- binding ------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def current_driver(bdf: str) -> str | None:
    """The kernel driver bound to PCI device ``bdf``, if any."""
    link = SYSFS_PCI_DEVICES / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def resolve_device(name: str) -> str:
    """The PCI address of ``name``: a PCI address itself, or a network interface of a virtio-pci device."""
    if BDF.match(name):
        if not (SYSFS_PCI_DEVICES / name).exists():
            raise NativeUnavailable(f"no PCI device {name}")
        return name
    dev = SYSFS_NET / name / "device"
    if not dev.exists():
        raise NativeUnavailable(
            f"no network interface {name!r} with a device (if a native port holds it, or held it when it "
            f"died without giving it back, name its PCI address instead)"
        )
    path = dev.resolve()
    # virtio_net's device is the virtio device (virtioN), a child of the PCI function.
    for candidate in (path, path.parent):
        if BDF.match(candidate.name) and (candidate / "config").exists():
            return candidate.name
    raise NativeUnavailable(f"{name} is not a PCI device (its device is {path})")


def check_native(bdf: str) -> None:
    """Raise NativeUnavailable unless ``bdf`` is a modern virtio-net device this process can drive."""
    if os.geteuid() != 0:
        raise NativeUnavailable("native mode needs root (PCI binding, BARs, pagemap)")
    dev = SYSFS_PCI_DEVICES / bdf
    try:
        cfg = PciConfigSpace(dev / "config")
    except OSError as e:
        raise NativeUnavailable(f"{bdf}: cannot open its configuration space: {e}") from None
    try:
        vendor, device = cfg.read(PCI_VENDOR_ID, 2), cfg.read(PCI_DEVICE_ID, 2)
        net_ids = (VIRTIO_PCI_MODERN_DEVICE_ID_BASE + VIRTIO_ID_NET, VIRTIO_PCI_TRANSITIONAL_NET_DEVICE_ID)
        if vendor != VIRTIO_PCI_VENDOR_ID or device not in net_ids:
            raise NativeUnavailable(f"{bdf} ({vendor:04x}:{device:04x}) is not a virtio-net device")
        try:
            caps = parse_virtio_caps(cfg.read)
        except VirtioPciError as e:
            raise NativeUnavailable(str(e)) from None
        if not {VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG} <= caps.keys():
            raise NativeUnavailable(f"{bdf} is a legacy-only virtio device (no modern capabilities)")
    finally:
        cfg.close()
    if not (SYSFS_PCI_DRIVERS / UIO_DRIVER).exists():
        subprocess.run(["modprobe", UIO_DRIVER], capture_output=True, check=False)
        if not (SYSFS_PCI_DRIVERS / UIO_DRIVER).exists():
            raise NativeUnavailable(f"no {UIO_DRIVER} driver (modprobe {UIO_DRIVER} failed)")


class PciBinding:
    """Moves PCI device ``bdf`` from its kernel driver to uio_pci_generic (`take`) and back (`give_back`)."""

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.dev = SYSFS_PCI_DEVICES / bdf

    def take(self, timeout: float = 10.0) -> Path:
        """Bind the device to uio_pci_generic; returns its /dev/uioN."""
        driver = current_driver(self.bdf)
        if driver != UIO_DRIVER:
            if driver is not None:
                _write(self.dev / "driver" / "unbind", self.bdf)
            _write(self.dev / "driver_override", UIO_DRIVER)
            _write(SYSFS_PCI_PROBE, self.bdf)
        if current_driver(self.bdf) != UIO_DRIVER:
            raise VirtioPciError(f"{self.bdf}: {UIO_DRIVER} did not take the device")
        deadline = time.monotonic() + timeout
        while True:
            names = sorted(p.name for p in (self.dev / "uio").glob("uio*"))
            if names and Path("/dev", names[0]).exists():
                return Path("/dev", names[0])
            if time.monotonic() > deadline:
                raise VirtioPciError(f"{self.bdf}: no /dev/uioN appeared")
            time.sleep(0.01)

    def give_back(self) -> None:
        """Unbind from uio_pci_generic and let the kernel's own driver (virtio-pci) probe the device again."""
        with contextlib.suppress(OSError):
            _write(self.dev / "driver_override", "\n")
        if current_driver(self.bdf) == UIO_DRIVER:
            _write(SYSFS_PCI_DRIVERS / UIO_DRIVER / "unbind", self.bdf)
        if current_driver(self.bdf) is None:
            try:
                _write(SYSFS_PCI_PROBE, self.bdf)
            except OSError as e:
                if e.errno != errno.ENODEV:
                    raise
        driver = current_driver(self.bdf)
        if driver != KERNEL_DRIVER:
            log.warning("%s: given back, but bound to %s, not %s", self.bdf, driver, KERNEL_DRIVER)


def set_command_bits(config: PciConfigSpace, on: int = 0, off: int = 0) -> None:
    """Set ``on`` and clear ``off`` in the PCI command register."""
    command = config.read(PCI_COMMAND, 2)
    config.write(PCI_COMMAND, 2, (command | on) & ~off)


class Guardian:
    """A forked process that gives the device back with ``restore`` if this process dies holding it.

    It sits in its own session (a signal to our process group does not reach it) reading a pipe: the word
    ``x`` means "given back already"; end of file without it means we died, and it runs ``restore``.
    """

    def __init__(self, restore: Callable[[], None]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; exercised by the integration tests
            status = 0
            try:
                os.close(w)
                os.setsid()
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                if os.read(r, 1) != b"x":  # b"" (end of file): the owner is gone
                    restore()
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        os.close(r)
        self.pid = pid
        self._w = w

    def dismiss(self) -> None:
        """Tell the guardian the device is given back, and reap it."""
        if self._w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")
        os.close(self._w)
        self._w = -1
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


# --- opening ------------------------------------------------------------------------------------------------
class NativePort(AdapterPort):
    """A guest NIC driven natively (see the module doc). ``adapter`` is its VirtioNetAdapter."""

    adapter: VirtioNetAdapter


def hugepage_dma(name: str, size: int) -> DmaMemory:
    """DMA memory in huge pages, reserving more huge pages first if too few are free."""
    try:
        reserve_hugepages(-(-size // HUGEPAGE))
    except DmaError as e:
        log.debug("%s: %s; trying with the huge pages there are", name, e)
    return DmaMemory.hugepages(name, size)


def open_native(
    name: str,
    spec: PortSpec,
    *,
    pairs: int | None = None,
    interrupts: bool = True,
) -> NativePort:
    """Take the device behind ``name`` (interface or PCI address) and open ``spec``'s rings on it.

    ``pairs``: queue pairs to run (default: all the device has). ``interrupts``: sleep on INTx in poll;
    False spins (busy polling). Raises NativeUnavailable (nothing changed) when native mode cannot work
    here, and other errors (the device given back first) when setting it up fails.
    """
    bdf = resolve_device(name)
    check_native(bdf)
    binding = PciBinding(bdf)
    ifname = name if not BDF.match(name) else f"virtio-{bdf[-7:]}"
    try:
        uio = binding.take()
    except BaseException:
        binding.give_back()  # a device unbound from virtio-pci but not taken by uio would be lost
        raise
    transports: list[VirtioPciModern] = []

    def restore() -> None:
        for transport in transports:
            try:
                transport.reset()
            except Exception as e:  # the device is being given back anyway
                log.warning("%s: reset failed: %s", bdf, e)
        binding.give_back()

    guardian = Guardian(restore)
    config = PciConfigSpace(SYSFS_PCI_DEVICES / bdf / "config")
    bars: list[MmioRegisters] = []
    adapter: VirtioNetAdapter | None = None
    waiter: IntxWaiter | None = None
    try:
        # uio_pci_generic enables the device but not bus mastering (DMA), and leaves INTx as it was.
        set_command_bits(config, on=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, off=PCI_COMMAND_INTX_DISABLE)
        transport, bars = open_sysfs(bdf, config)
        transports.append(transport)
        adapter = VirtioNetAdapter.create(ifname, transport, hugepage_dma, pairs)
        waiter = IntxWaiter(uio, config, transport) if interrupts else None
        reg = adapter.register(spec.mode, spec.ring_id)
    except BaseException:
        for obj in (waiter, adapter):
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()
        with contextlib.suppress(Exception):
            restore()
        for regs in bars:
            regs.close()
        config.close()
        guardian.dismiss()
        raise

    native = adapter
    tx_ids = list(range(reg.tx_first, min(reg.tx_last, native.pairs)))
    rx_ids = list(range(reg.rx_first, min(reg.rx_last, native.pairs)))

    def wait(events: int, timeout: float) -> None:
        if waiter is None:
            return
        try:
            waiter.wait(native.queues_for(events, tx_ids, rx_ids), timeout)
        except DeviceFault as e:
            native.broken = str(e)
            log.error("%s: port broken: %s", native.name, e)

    def release() -> None:
        try:
            native.close()  # resets the device first: it lets go of our memory before anything is freed
        finally:
            if waiter is not None:
                waiter.close()
            for regs in bars:
                regs.close()
            try:
                binding.give_back()
            finally:
                config.close()
                guardian.dismiss()
                atexit.unregister(port.close)

    port = NativePort(ifname, reg, wait=wait if waiter is not None else None, release=release, mode="native")
    atexit.register(port.close)
    _exit_on_sigterm()
    return port


def _exit_on_sigterm() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit (so atexit gives the device back) unless already handled."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _raise_exit)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)

"""Passthrough mode: the netmap rings of a vhostmap passthrough port, used in place through QEMU's
ivshmem-doorbell device (netmap's ptnetmap, guest side).

The daemon hands the port's region to QEMU, which shows it as BAR 2 of PCI device 1af4:1110; BAR 0 holds the
device's registers, among them IVPosition (this guest's ivshmem ID) and the Doorbell. ``PtDevice`` maps both
through sysfs (``resource2``, ``resource0``: root, no driver needed). The region starts with the header
vhostmap wrote (vhostmap.netmap.abi, PtHeader: magic, offsets, the doorbell to ring), then one CSB entry per
ring, then the port's netmap_if, rings and buffers.

``PassthroughPort`` is the NetmapPort over such a region: its rings are the region's, used in place (zero
copy between the application and the daemon's side of the port). A sync is netmap's CSB-mode driver:
``txsync``/``rxsync`` write head/cur to the ring's CSB entry (cur, then head), ring the doorbell only when the
daemon asked for kicks (``kern_need_kick``), and copy hwtail back into the ring's tail. QEMU raises this
device's interrupt only as MSI-X, which only a kernel driver enables: where the guest has an IOMMU and
vfio-pci (vfio.py), ``open_passthrough`` opens the device through it and ``poll`` sleeps on the MSI-X
eventfd, asking for it through ``appl_need_kick`` and looking again before sleeping, as netmap's ptnet driver
does; elsewhere (no IOMMU: Debian's kernel has no VFIO no-IOMMU mode) it maps the BARs through sysfs and
``poll`` spins.

A daemon that stops writes the header's ``gone`` word, seen on the next sync. One SIGKILLed or hung cannot,
but its heartbeat (the header's ``heartbeat`` word, advanced by its control loop every
PT_HEARTBEAT_INTERVAL seconds) stands still: a ``poll`` that finds nothing ready looks at it, and once it has
not moved for ``heartbeat_timeout`` seconds (PT_HEARTBEAT_TIMEOUT by default) raises PassthroughGone saying
the daemon stopped answering, instead of waiting forever. A sleep on the interrupt is cut into slices of at
most half that timeout for the look.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from vhostmap.netmap.abi import (
    NR_REG_ALL_NIC,
    NR_REG_ONE_NIC,
    PT_HEARTBEAT_TIMEOUT,
    CsbView,
    PtRegionView,
    Region,
)
from vhostmap.netmap.errors import RegionError
from vhostmap.netmap.user import POLLIN, POLLOUT, PortSpec, UserRing, ready_events
from vhostmap_guest.pci import BDF, SYSFS_PCI_DEVICES
from vhostmap_guest.vfio import VfioPtDevice, VfioUnavailable

IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110
# BAR 0 registers (QEMU docs/specs/ivshmem-spec.rst).
IVPOSITION = 8
DOORBELL = 12
BAR0_SIZE = 256


class PassthroughUnavailable(RuntimeError):
    """No ivshmem device holding a vhostmap passthrough region (or no access to it)."""


class PassthroughGone(PassthroughUnavailable):
    """The daemon let go of the port's region (it stopped, or released this guest), or stopped answering (its
    heartbeat stood still: SIGKILLed or hung): nothing syncs the rings any more. QEMU never reconnects to an
    ivshmem server, so the guest gets the port back only once its QEMU restarted with the daemon running."""


def ivshmem_devices(sysfs: Path = SYSFS_PCI_DEVICES) -> list[str]:
    """PCI addresses of the ivshmem devices, in address order."""
    found = []
    for dev in sorted(sysfs.iterdir()) if sysfs.is_dir() else []:
        try:
            vendor = int((dev / "vendor").read_text(), 16)
            device = int((dev / "device").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE):
            found.append(dev.name)
    return found


class PtDevice:
    """An ivshmem-doorbell device through sysfs: ``region`` (BAR 2 mapped, the port's region) and its
    registers (BAR 0 mapped). Raises PassthroughUnavailable when the files cannot be mapped."""

    def __init__(self, address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> None:
        self.address = address
        path = sysfs / address
        try:
            self.region = Region(_map(path / "resource2", None))
            self._bar0 = _map(path / "resource0", BAR0_SIZE)
        except OSError as e:
            raise PassthroughUnavailable(f"{address}: cannot map its BARs: {e.strerror}") from None
        # One 32-bit access per register, as the device requires (a byte-wise copy would ring twice).
        self._position = ctypes.c_uint32.from_buffer(self._bar0, IVPOSITION)
        self._doorbell = ctypes.c_uint32.from_buffer(self._bar0, DOORBELL)

    @property
    def ivposition(self) -> int:
        """This guest's ivshmem ID."""
        return int(self._position.value)

    def ring(self, peer: int, vector: int) -> None:
        """Interrupt ``peer`` on ``vector`` (a write to the Doorbell register)."""
        self._doorbell.value = (peer << 16) | vector

    def close(self) -> None:
        """Unmap both BARs (once the views are gone)."""
        del self._position, self._doorbell
        self._bar0.close()
        self.region.close()


def _map(path: Path, size: int | None) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    try:
        return mmap.mmap(fd, size or os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class PassthroughPort:
    """A NetmapPort (vhostmap.netmap.user) over a passthrough region ``region``: the rings ``spec`` names
    (all pairs, or one), synced through their CSB entries; ``doorbell`` kicks the daemon. ``release`` runs
    once at close (unmapping the device). With ``irq_fd`` (an eventfd the daemon's interrupt reaches:
    vfio.VfioPtDevice) ``poll`` sleeps on it; without, it busy-polls. ``heartbeat_timeout``: seconds of a
    still heartbeat after which a waiting ``poll`` raises PassthroughGone (module docstring)."""

    def __init__(
        self,
        name: str,
        region: Region,
        doorbell: Callable[[], None],
        *,
        spec: PortSpec | None = None,
        release: Callable[[], None] | None = None,
        irq_fd: int | None = None,
        heartbeat_timeout: float = PT_HEARTBEAT_TIMEOUT,
    ) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError(f"{name}: heartbeat_timeout must be positive, not {heartbeat_timeout}")
        self.name = name
        self.mode = "passthrough"
        self.irq_fd = irq_fd
        self.sleeps = 0  # polls that slept on an interrupt
        self.interrupt_problem: str | None = None  # why there is no irq_fd, when open_passthrough knows
        self.view = PtRegionView(region)
        self._doorbell = doorbell
        self._release = release
        self.kicks = 0
        self._check_served()
        self.heartbeat_timeout = heartbeat_timeout
        # The heartbeat last seen, and when it was first seen at that value (this guest's monotonic clock).
        self._beat = (int(self.view.header.heartbeat), time.monotonic())
        nifp, buffers = self.view.nifp, self.view.buffers
        pairs = range(min(len(nifp.tx_rings), len(nifp.rx_rings)))
        if spec is not None and spec.mode == NR_REG_ONE_NIC:
            if spec.ring_id not in pairs:
                raise ValueError(f"{name}: ring pair {spec.ring_id} does not exist (0..{len(pairs) - 1})")
            pairs = range(spec.ring_id, spec.ring_id + 1)
        elif spec is not None and spec.mode != NR_REG_ALL_NIC:
            raise ValueError(f"{name}: a passthrough port has no host rings")
        self.tx_rings = [UserRing(nifp.tx_rings[i], buffers) for i in pairs]
        self.rx_rings = [UserRing(nifp.rx_rings[i], buffers) for i in pairs]
        self._csb = {id(r): self.view.tx_csb[i] for r, i in zip(self.tx_rings, pairs, strict=True)}
        self._csb |= {id(r): self.view.rx_csb[i] for r, i in zip(self.rx_rings, pairs, strict=True)}
        # Start from where the daemon says each ring is, its hwcur (as netmap's ptnet driver does when it
        # registers): a previous user of the region may have left the ring anywhere, and what it left in the
        # CSB may be nonsense the daemon reinitialised the ring over.
        for ring in (*self.tx_rings, *self.rx_rings):
            csb = self._csb[id(ring)]
            hwcur, _ = csb.read_hw()
            head = hwcur if hwcur < ring.num_slots else 0
            ring.view.cur = ring.view.head = head
            csb.atok.appl_need_kick = csb.atok.sync_flags = 0
            csb.write_head_cur(head, head)
            self._take_tail(ring, csb)

    @property
    def generation(self) -> int:
        """How many guests the daemon handed this port to (this one included)."""
        return int(self.view.header.generation)

    def csb(self, ring: UserRing) -> CsbView:
        """The CSB entry of one of the port's rings."""
        return self._csb[id(ring)]

    # --- syncs ----------------------------------------------------------------------------------------
    def _check_served(self) -> None:
        if self.view.header.gone:
            raise PassthroughGone(
                f"{self.name}: the vhostmap daemon let go of this port (it stopped or released this guest; "
                f"generation {self.generation}): restart the VM once the daemon runs again"
            )

    def _check_alive(self) -> None:
        """PassthroughGone if the daemon's heartbeat stood still for ``heartbeat_timeout`` seconds."""
        beat, since = self._beat
        now, current = time.monotonic(), int(self.view.header.heartbeat)
        if current != beat:
            self._beat = (current, now)
        elif now - since > self.heartbeat_timeout:
            raise PassthroughGone(
                f"{self.name}: the vhostmap daemon stopped answering (its heartbeat has not moved for "
                f"{now - since:.1f} s: SIGKILLed or hung; generation {self.generation}): restart the VM once "
                f"the daemon runs again"
            )

    def _sync(self, rings: Sequence[UserRing]) -> None:
        self._check_served()  # one load per sync
        kick = False
        for ring in rings:
            csb = self._csb[id(ring)]
            head = ring.head
            moved = head != int(csb.atok.head)
            csb.write_head_cur(head, ring.cur)
            # As netmap's ptnet driver: a kick only for something new (slots handed over or released), and
            # only when the daemon is idle on the ring.
            kick = kick or (moved and bool(csb.ktoa.kern_need_kick))
            self._take_tail(ring, csb)
        if kick:
            # One doorbell wakes the daemon for every ring of the port.
            self._doorbell()
            self.kicks += 1

    @staticmethod
    def _take_tail(ring: UserRing, csb: CsbView) -> None:
        _, hwtail = csb.read_hw()
        if hwtail < ring.num_slots:  # the daemon writes nothing else; never trust a region blindly
            ring.view.tail = hwtail

    def txsync(self) -> None:
        """Hand the TX rings' [hwcur, head) to the daemon and take reclaimed slots back."""
        self._sync(self.tx_rings)

    def rxsync(self) -> None:
        """Release the RX rings' slots before head and take what arrived."""
        self._sync(self.rx_rings)

    def poll(self, events: int = POLLIN, timeout: float | None = None) -> int:
        """Sync until ``events`` are ready or ``timeout`` seconds passed: sleeping on the interrupt with
        ``irq_fd``, spinning without. PassthroughGone once the daemon let go of the port or its heartbeat
        stood still for ``heartbeat_timeout`` seconds while nothing was ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.txsync()
            self.rxsync()
            ready = ready_events(self, events)
            if ready:
                return ready
            self._check_alive()  # only when waiting: a daemon moving the rings is alive
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return ready
            if self.irq_fd is None:
                time.sleep(0)  # let other threads run; the daemon is in another VM's host anyway
                continue
            slice_ = self.heartbeat_timeout / 2
            self._sleep(events, slice_ if left is None else min(left, slice_))

    def _sleep(self, events: int, timeout: float | None) -> None:
        """netmap's CSB-mode sleep: ask for interrupts on the rings waited on (appl_need_kick), sync and look
        again (the daemon may have moved them before it saw the flag: the double check), then sleep."""
        rings = (self.rx_rings if events & POLLIN else []) + (self.tx_rings if events & POLLOUT else [])
        for ring in rings:
            self._csb[id(ring)].atok.appl_need_kick = 1
        try:
            self.txsync()
            self.rxsync()
            if not ready_events(self, events):
                assert self.irq_fd is not None
                self.sleeps += 1
                if select.select([self.irq_fd], [], [], timeout)[0]:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self.irq_fd)
        finally:
            for ring in rings:
                self._csb[id(ring)].atok.appl_need_kick = 0

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the device (idempotent)."""
        release, self._release = self._release, None
        if release is None:
            return
        self.tx_rings = self.rx_rings = []
        self._csb = {}
        del self.view
        release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_passthrough(
    name: str,
    spec: PortSpec,
    sysfs: Path = SYSFS_PCI_DEVICES,
    *,
    interrupts: bool = True,
    heartbeat_timeout: float = PT_HEARTBEAT_TIMEOUT,
) -> PassthroughPort:
    """Open ``name``: ``pt:N``, the N-th ivshmem device holding a vhostmap passthrough region in PCI address
    order, or that device's PCI address (``pt:0000:00:05.0``, or the address alone with mode "passthrough");
    ``-R`` after either: its ring pair R only. PassthroughUnavailable if there is no such device. With
    ``interrupts`` the device is opened through vfio-pci when the guest can (an IOMMU, the vfio-pci module:
    vfio.py), and ``poll`` sleeps on its MSI-X interrupt; otherwise through sysfs, busy-polling
    (``interrupt_problem`` on the port says why). ``heartbeat_timeout``: see PassthroughPort."""
    device = _find_device(name, spec, sysfs)
    opened: PtDevice | VfioPtDevice = device
    irq_fd: int | None = None
    problem = "interrupts not asked for"
    if interrupts:
        address = device.address
        device.close()  # vfio-pci maps the BARs itself
        try:
            opened = VfioPtDevice(address, sysfs)
            irq_fd = opened.irq_fd
        except VfioUnavailable as e:
            problem = str(e)
            opened = PtDevice(address, sysfs)
    try:
        header = PtRegionView(opened.region).header
        peer, vector = int(header.doorbell_peer), int(header.doorbell_vector)
        port = PassthroughPort(
            name,
            opened.region,
            lambda: opened.ring(peer, vector),
            spec=spec,
            release=opened.close,
            irq_fd=irq_fd,
            heartbeat_timeout=heartbeat_timeout,
        )
    except BaseException:
        opened.close()
        raise
    port.interrupt_problem = None if irq_fd is not None else problem
    return port


def _find_device(name: str, spec: PortSpec, sysfs: Path) -> PtDevice:
    """The device ``spec`` names (open_passthrough), opened through sysfs, its region checked."""
    if BDF.match(spec.port):
        if spec.port not in ivshmem_devices(sysfs):
            raise PassthroughUnavailable(f"{name}: {spec.port} is no ivshmem device")
        device = PtDevice(spec.port, sysfs)
        try:
            PtRegionView(device.region)
        except RegionError as e:
            device.close()
            raise PassthroughUnavailable(
                f"{name}: no vhostmap passthrough region in {spec.port}: {e}"
            ) from None
        return device
    if spec.switch != "pt" or not spec.port.isdigit():
        raise ValueError(
            f"{name!r}: passthrough ports are named pt:N (the N-th ivshmem device) or by the device's "
            "PCI address"
        )
    index, usable = int(spec.port), list[PtDevice]()
    try:
        for address in ivshmem_devices(sysfs):
            try:
                device = PtDevice(address, sysfs)
            except PassthroughUnavailable:
                continue
            try:
                PtRegionView(device.region)
            except RegionError:
                device.close()
                continue
            usable.append(device)
        if not 0 <= index < len(usable):
            raise PassthroughUnavailable(
                f"{name}: {len(usable)} ivshmem device(s) hold a vhostmap passthrough region"
            )
        return usable.pop(index)
    finally:
        for other in usable:
            other.close()

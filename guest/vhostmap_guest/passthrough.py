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
daemon asked for kicks (``kern_need_kick``), and copy hwtail back into the ring's tail. ``poll`` syncs and
spins until something is ready: QEMU raises this device's interrupt only as MSI-X, which needs a driver that
enables it (VFIO, a kernel module), so this mode busy-polls and never sets ``appl_need_kick``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from vhostmap.netmap.abi import NR_REG_ALL_NIC, NR_REG_ONE_NIC, CsbView, PtRegionView, Region
from vhostmap.netmap.errors import RegionError
from vhostmap.netmap.user import POLLIN, PortSpec, UserRing, ready_events

SYSFS_PCI = Path("/sys/bus/pci/devices")
IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110
# BAR 0 registers (QEMU docs/specs/ivshmem-spec.rst).
IVPOSITION = 8
DOORBELL = 12
BAR0_SIZE = 256


class PassthroughUnavailable(RuntimeError):
    """No ivshmem device holding a vhostmap passthrough region (or no access to it)."""


class PassthroughGone(PassthroughUnavailable):
    """The daemon let go of the port's region (it stopped, or released this guest): nothing syncs the rings
    any more. QEMU never reconnects to an ivshmem server, so the guest gets the port back only once its QEMU
    restarted with the daemon running."""


def ivshmem_devices(sysfs: Path = SYSFS_PCI) -> list[str]:
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

    def __init__(self, address: str, sysfs: Path = SYSFS_PCI) -> None:
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
    once at close (unmapping the device)."""

    def __init__(
        self,
        name: str,
        region: Region,
        doorbell: Callable[[], None],
        *,
        spec: PortSpec | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.mode = "passthrough"
        self.view = PtRegionView(region)
        self._doorbell = doorbell
        self._release = release
        self.kicks = 0
        self._check_served()
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
        """Sync and spin until ``events`` are ready or ``timeout`` seconds passed (busy polling)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.txsync()
            self.rxsync()
            ready = ready_events(self, events)
            if ready or (deadline is not None and time.monotonic() >= deadline):
                return ready
            time.sleep(0)  # let other threads run; the daemon is in another VM's host anyway

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


def open_passthrough(name: str, spec: PortSpec, sysfs: Path = SYSFS_PCI) -> PassthroughPort:
    """Open ``name``, ``pt:N``: the N-th ivshmem device holding a vhostmap passthrough region, in PCI address
    order (``pt:N-R``: its ring pair R only); PassthroughUnavailable if there is no such device."""
    if spec.switch != "pt" or not spec.port.isdigit():
        raise ValueError(f"{name!r}: passthrough ports are named pt:N (the N-th ivshmem device)")
    index, candidates = int(spec.port), ivshmem_devices(sysfs)
    usable: list[PtDevice] = []
    try:
        for address in candidates:
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
        device = usable.pop(index)
    finally:
        for other in usable:
            other.close()
    try:
        header = PtRegionView(device.region).header
        peer, vector = int(header.doorbell_peer), int(header.doorbell_vector)
        return PassthroughPort(
            name,
            device.region,
            lambda: device.ring(peer, vector),
            spec=spec,
            release=device.close,
        )
    except BaseException:
        device.close()
        raise

"""An ivshmem-doorbell device through vfio-pci: its BARs mapped through the VFIO device, and its MSI-X
vector 0 delivered to an eventfd (VFIO_DEVICE_SET_IRQS), so that a passthrough port's ``poll`` can sleep.

QEMU's ivshmem-doorbell raises its vectors as MSI-X only, and only a kernel driver can enable MSI-X; vfio-pci
is the stock one that hands the interrupt to userspace. Debian's kernel has vfio-pci as modules but no
CONFIG_VFIO_NOIOMMU, so the guest needs an IOMMU: QEMU's ``intel-iommu`` on a q35 machine (``-machine q35
-device intel-iommu,intremap=on``, the guest booted with ``intel_iommu=on``). The device then sits in an
IOMMU group of its own; it needs no DMA mapping (the region is a BAR, not guest RAM), but the container must
have an IOMMU type set before the device can be opened. Interrupts are MSI writes by the device, which QEMU
drops unless bus mastering is on: it is set through the VFIO config region.

The ioctl numbers and structures are linux/vfio.h's (_IO(';', 100 + n)).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path

from vhostmap.netmap.abi import Region
from vhostmap.virtio.spec import PCI_COMMAND, PCI_COMMAND_MASTER
from vhostmap_guest.pci import SYSFS_PCI_DEVICES, SYSFS_PCI_DRIVERS

DEV_VFIO = Path("/dev/vfio")
VFIO_PCI_DRIVER = SYSFS_PCI_DRIVERS / "vfio-pci"

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# struct vfio_group_status {argsz, flags}; vfio_region_info {argsz, flags, index, cap_offset, size, offset};
# vfio_irq_set {argsz, flags, index, start, count, data[]} (data: one s32 eventfd per vector).
GROUP_STATUS = struct.Struct("=II")
REGION_INFO = struct.Struct("=IIIIQQ")
IRQ_SET = struct.Struct("=IIIII")


def _io(n: int) -> int:
    return (ord(";") << 8) | (100 + n)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_SET_IRQS = _io(10)

_libc = ctypes.CDLL(None, use_errno=True)


class VfioUnavailable(RuntimeError):
    """The device cannot be used through vfio-pci here (no module, no IOMMU group, no access); says why."""


def bind_vfio(address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> None:
    """Bind PCI device ``address`` to vfio-pci (driver_override, then a probe), unless it already is."""
    dev = sysfs / address
    driver = dev / "driver"
    if driver.exists() and driver.resolve().name == "vfio-pci":
        return
    if not VFIO_PCI_DRIVER.is_dir():
        raise VfioUnavailable("vfio-pci is not loaded (modprobe vfio-pci; the guest needs an IOMMU too)")
    if not (dev / "iommu_group").exists():
        raise VfioUnavailable(
            f"{address} is in no IOMMU group (QEMU: -device intel-iommu; guest: intel_iommu=on)"
        )
    try:
        if driver.exists():
            (driver / "unbind").write_text(address)
        (dev / "driver_override").write_text("vfio-pci")
        (sysfs.parent / "drivers_probe").write_text(address)
    except OSError as e:
        raise VfioUnavailable(f"{address}: cannot bind it to vfio-pci: {e.strerror}") from None
    if not (driver.exists() and driver.resolve().name == "vfio-pci"):
        raise VfioUnavailable(f"{address}: vfio-pci did not take it")


class VfioPtDevice:
    """An ivshmem-doorbell device opened through vfio-pci: ``region`` (BAR 2, the port's region), the
    registers (BAR 0), and ``irq_fd``, an eventfd its MSI-X vector 0 signals. Raises VfioUnavailable."""

    def __init__(self, address: str, sysfs: Path = SYSFS_PCI_DEVICES) -> None:
        self.address = address
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        try:
            bind_vfio(address, sysfs)
            group = (sysfs / address / "iommu_group").resolve().name
            container = self._open(DEV_VFIO / "vfio")
            if fcntl.ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
                raise VfioUnavailable("unknown VFIO API version")
            if not fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU):
                raise VfioUnavailable("the VFIO container has no type1 IOMMU")
            group_fd = self._open(DEV_VFIO / group)
            status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
            fcntl.ioctl(group_fd, VFIO_GROUP_GET_STATUS, status)
            if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise VfioUnavailable(
                    f"IOMMU group {group} is not viable (another of its devices has a driver)"
                )
            fcntl.ioctl(group_fd, VFIO_GROUP_SET_CONTAINER, struct.pack("=i", container))
            fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)
            # The device fd is the return value, which fcntl.ioctl does not give for a buffer argument.
            device = _libc.ioctl(group_fd, VFIO_GROUP_GET_DEVICE_FD, ctypes.c_char_p(address.encode()))
            if device < 0:
                raise OSError(ctypes.get_errno(), f"VFIO_GROUP_GET_DEVICE_FD {address}")
            self._fds.append(device)
            self._device = device
            _, config = self._region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            command = int.from_bytes(os.pread(device, 2, config + PCI_COMMAND), "little")
            os.pwrite(device, (command | PCI_COMMAND_MASTER).to_bytes(2, "little"), config + PCI_COMMAND)
            self.region = Region(self._map(2))
            self._bar0 = self._map(0)
            self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds.append(self.irq_fd)
            irqs = IRQ_SET.pack(
                IRQ_SET.size + 4,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                VFIO_PCI_MSIX_IRQ_INDEX,
                0,
                1,
            ) + struct.pack("=i", self.irq_fd)
            fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, irqs)
        except OSError as e:
            self.close()
            raise VfioUnavailable(f"{address} through vfio-pci: {e}") from None
        except BaseException:
            self.close()
            raise
        self._position = ctypes.c_uint32.from_buffer(self._bar0, 8)  # IVPosition
        self._doorbell = ctypes.c_uint32.from_buffer(self._bar0, 12)  # Doorbell

    def _open(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VfioUnavailable(f"cannot open {path}: {e.strerror}") from None
        self._fds.append(fd)
        return fd

    def _region_info(self, index: int) -> tuple[int, int]:
        info = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        fcntl.ioctl(self._device, VFIO_DEVICE_GET_REGION_INFO, info)
        _, flags, _, _, size, offset = REGION_INFO.unpack(info)
        if index != VFIO_PCI_CONFIG_REGION_INDEX and not flags & VFIO_REGION_INFO_FLAG_MMAP:
            raise VfioUnavailable(f"{self.address}: BAR {index} cannot be mapped through VFIO")
        return size, offset

    def _map(self, bar: int) -> mmap.mmap:
        size, offset = self._region_info(bar)
        m = mmap.mmap(self._device, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    @property
    def ivposition(self) -> int:
        """This guest's ivshmem ID."""
        return int(self._position.value)

    def ring(self, peer: int, vector: int) -> None:
        """Interrupt ``peer`` on ``vector`` (a write to the Doorbell register)."""
        self._doorbell.value = (peer << 16) | vector

    def close(self) -> None:
        """Turn the interrupt off, unmap and close everything (idempotent)."""
        with contextlib.suppress(AttributeError):
            del self._position, self._doorbell
        device = getattr(self, "_device", -1)
        if device >= 0 and device in self._fds:
            off = IRQ_SET.pack(
                IRQ_SET.size,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                VFIO_PCI_MSIX_IRQ_INDEX,
                0,
                0,
            )
            with contextlib.suppress(OSError):
                fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, off)
        region = getattr(self, "region", None)
        if region is not None:
            region.close()
            self.region = None  # type: ignore[assignment]
        for m in self._maps:
            with contextlib.suppress(BufferError, ValueError):
                m.close()
        self._maps = []
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

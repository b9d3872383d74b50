"""The modern virtio-pci transport (virtio 1.x spec 4.1) from guest userspace, over sysfs.

A virtio-pci device describes its register blocks with vendor-specific PCI capabilities (spec 4.1.4): each
names a BAR, an offset and a length for the common configuration, the notification area, the ISR byte and the
device-specific configuration. `parse_virtio_caps` walks the capability list of the PCI configuration space
and `VirtioPciModern` drives the device through those blocks: reset, status, feature negotiation, queue
setup, notifications, ISR and device configuration.

Register access goes through `Registers`: `MmioRegisters` maps a sysfs ``resourceN`` file and loads and
stores with exactly the register's width (QEMU dispatches on offset *and* width; a 32-bit field written as
four bytes would be four writes to nothing); `PciConfigSpace` reads and writes the sysfs ``config`` file with
pread/pwrite of the same exact widths. Tests drive `VirtioPciModern` over a fake `Registers`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vhostmap.virtio.spec import (
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_SIZE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STD_HEADER_SIZEOF,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VirtioPciCap,
    VirtioPciCommonCfg,
    VirtioPciNotifyCap,
)
from vhostmap_guest.pci import SYSFS_PCI_DEVICES

_WIDTHS = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32}
# Capabilities are dword aligned and at least the 16-byte virtio_pci_cap; a list longer than this is a loop.
_MAX_CAPS = (PCI_CFG_SPACE_SIZE - PCI_STD_HEADER_SIZEOF) // 4
# How long a reset may take before the device is declared dead (spec 4.1.4.3.2: wait for status 0).
RESET_TIMEOUT = 10.0
# The structures a driver reaches through BARs (VIRTIO_PCI_CAP_PCI_CFG is an access window in config space).
_MAPPED_CAPS = (
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
)


class VirtioPciError(RuntimeError):
    """The device is not a usable modern virtio-pci device, or it refused what the driver asked."""


class Registers(Protocol):
    """Exact-width access to a register block: ``width`` is 1, 2 or 4 bytes, little-endian."""

    def read(self, offset: int, width: int) -> int:
        """Load ``width`` bytes at ``offset``."""

    def write(self, offset: int, width: int, value: int) -> None:
        """Store ``width`` bytes at ``offset``."""


class MmioRegisters:
    """A memory BAR mapped from sysfs ``resourceN``: loads and stores of exactly 1, 2 or 4 bytes."""

    def __init__(self, path: str | Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        try:
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self._base = ctypes.addressof(anchor)
        del anchor

    def _check(self, offset: int, width: int) -> type[ctypes._SimpleCData[int]]:
        ctype = _WIDTHS.get(width)
        if ctype is None or offset < 0 or offset + width > self.size or offset % width:
            raise VirtioPciError(f"{self.path}: no {width}-byte register at {offset:#x}")
        return ctype

    def read(self, offset: int, width: int) -> int:
        """One load of ``width`` bytes (ctypes reads the value with a single access of its size)."""
        return int(self._check(offset, width).from_address(self._base + offset).value)

    def write(self, offset: int, width: int, value: int) -> None:
        """One store of ``width`` bytes."""
        self._check(offset, width).from_address(self._base + offset).value = value

    def close(self) -> None:
        """Unmap the BAR."""
        self._base = 0
        self._mm.close()


class PciConfigSpace:
    """The PCI configuration space of a device through its sysfs ``config`` file (pread/pwrite)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def read(self, offset: int, width: int) -> int:
        """Read ``width`` bytes at ``offset`` in one access."""
        data = os.pread(self._fd, width, offset)
        if len(data) != width:
            raise VirtioPciError(f"{self.path}: short read of {width} bytes at {offset:#x}")
        return int.from_bytes(data, "little")

    def write(self, offset: int, width: int, value: int) -> None:
        """Write ``width`` bytes at ``offset`` in one access."""
        if os.pwrite(self._fd, value.to_bytes(width, "little"), offset) != width:
            raise VirtioPciError(f"{self.path}: short write of {width} bytes at {offset:#x}")

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class VirtioCap:
    """One virtio structure: ``cfg_type`` (VIRTIO_PCI_CAP_*) at ``offset`` in BAR ``bar``, ``length`` bytes.

    ``notify_off_multiplier`` is only meaningful for the notify capability.
    """

    cfg_type: int
    bar: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


def parse_virtio_caps(read: Callable[[int, int], int]) -> dict[int, VirtioCap]:
    """The virtio capabilities of a device, by cfg_type (the first of each type, as the spec prefers).

    ``read(offset, width)`` reads the PCI configuration space. Raises VirtioPciError for a capability list
    that loops or points outside the configuration space.
    """
    if not read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return {}
    caps: dict[int, VirtioCap] = {}
    pos = read(PCI_CAPABILITY_LIST, 1) & ~3
    seen: set[int] = set()
    while pos:
        if pos in seen or len(seen) > _MAX_CAPS or not PCI_STD_HEADER_SIZEOF <= pos <= PCI_CFG_SPACE_SIZE - 2:
            raise VirtioPciError(f"PCI capability list is broken at {pos:#x}")
        seen.add(pos)
        cap_id, nxt = read(pos, 1), read(pos + 1, 1)
        if cap_id == PCI_CAP_ID_VNDR and pos + ctypes.sizeof(VirtioPciCap) <= PCI_CFG_SPACE_SIZE:

            def field(name: str, base: int = pos) -> int:
                f = getattr(VirtioPciCap, name)
                return read(base + f.offset, f.size)

            cfg_type = field("cfg_type")
            if cfg_type not in caps and field("cap_len") >= ctypes.sizeof(VirtioPciCap):
                multiplier = 0
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    f = VirtioPciNotifyCap.notify_off_multiplier
                    multiplier = read(pos + f.offset, f.size)
                caps[cfg_type] = VirtioCap(
                    cfg_type, field("bar"), field("offset"), field("length"), multiplier
                )
        pos = nxt & ~3
    return caps


class Window:
    """``length`` bytes at ``offset`` of a register block; accesses outside it are refused."""

    def __init__(self, regs: Registers, offset: int, length: int, what: str) -> None:
        self.regs, self.offset, self.length, self.what = regs, offset, length, what

    def _at(self, off: int, width: int) -> int:
        if off < 0 or off + width > self.length:
            raise VirtioPciError(
                f"{self.what}: {width}-byte access at {off:#x} beyond its {self.length} bytes"
            )
        return self.offset + off

    def read(self, off: int, width: int) -> int:
        """Read a register of the window."""
        return self.regs.read(self._at(off, width), width)

    def write(self, off: int, width: int, value: int) -> None:
        """Write a register of the window."""
        self.regs.write(self._at(off, width), width, value)


def _common_field(name: str) -> tuple[int, int]:
    f = getattr(VirtioPciCommonCfg, name)
    return f.offset, f.size


class VirtioPciModern:
    """A modern virtio-pci device driven through its common, notify, ISR and device configuration blocks.

    ``bars`` maps a BAR number to its registers. Raises VirtioPciError when a required capability is missing
    or points outside its BAR.
    """

    def __init__(
        self, caps: Mapping[int, VirtioCap], bars: Mapping[int, Registers], name: str = "virtio"
    ) -> None:
        self.name = name
        missing = [
            n
            for t, n in (
                (VIRTIO_PCI_CAP_COMMON_CFG, "common"),
                (VIRTIO_PCI_CAP_NOTIFY_CFG, "notify"),
                (VIRTIO_PCI_CAP_ISR_CFG, "ISR"),
            )
            if t not in caps
        ]
        if missing:
            raise VirtioPciError(
                f"{name}: not a modern virtio-pci device (no {', '.join(missing)} capability)"
            )
        self.caps = dict(caps)

        def window(cfg_type: int, what: str) -> Window:
            cap = caps[cfg_type]
            if cap.bar not in bars:
                raise VirtioPciError(f"{name}: {what} configuration in BAR {cap.bar}, which is not mapped")
            return Window(bars[cap.bar], cap.offset, cap.length, f"{name} {what}")

        self.common = window(VIRTIO_PCI_CAP_COMMON_CFG, "common")
        self.notify_area = window(VIRTIO_PCI_CAP_NOTIFY_CFG, "notify")
        self.isr_area = window(VIRTIO_PCI_CAP_ISR_CFG, "ISR")
        self.device_cfg = (
            window(VIRTIO_PCI_CAP_DEVICE_CFG, "device") if VIRTIO_PCI_CAP_DEVICE_CFG in caps else None
        )
        self.notify_off_multiplier = caps[VIRTIO_PCI_CAP_NOTIFY_CFG].notify_off_multiplier
        self._notify_offsets: dict[int, int] = {}

    # --- common configuration ---------------------------------------------------------------------------
    def _get(self, name: str) -> int:
        off, width = _common_field(name)
        return self.common.read(off, width)

    def _set(self, name: str, value: int) -> None:
        off, width = _common_field(name)
        self.common.write(off, width, value)

    @property
    def status(self) -> int:
        """device_status."""
        return self._get("device_status")

    def add_status(self, bits: int) -> None:
        """Set ``bits`` in device_status (keeping those already set), as the init sequence does."""
        self._set("device_status", self.status | bits)

    def reset(self, timeout: float = RESET_TIMEOUT) -> None:
        """Write 0 to device_status and wait until the device reads back 0 (spec 4.1.4.3.2)."""
        self._set("device_status", 0)
        deadline = time.monotonic() + timeout
        while self.status != 0:
            if time.monotonic() > deadline:
                raise VirtioPciError(
                    f"{self.name}: device status still {self.status:#x} {timeout:g} s after reset"
                )
            time.sleep(0.001)

    def device_features(self) -> int:
        """The 64 feature bits the device offers."""
        features = 0
        for word in (0, 1):
            self._set("device_feature_select", word)
            features |= self._get("device_feature") << (32 * word)
        return features

    def set_driver_features(self, features: int) -> None:
        """Write the accepted features and set FEATURES_OK; VirtioPciError if the device does not keep it."""
        for word in (0, 1):
            self._set("driver_feature_select", word)
            self._set("driver_feature", (features >> (32 * word)) & 0xFFFFFFFF)
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK)
        if not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.add_status(VIRTIO_CONFIG_S_FAILED)
            raise VirtioPciError(f"{self.name}: device refused features {features:#x} (FEATURES_OK cleared)")

    @property
    def num_queues(self) -> int:
        """Virtqueues the device has."""
        return self._get("num_queues")

    def queue_max_size(self, index: int) -> int:
        """The size of virtqueue ``index`` the device proposes (0: the queue does not exist)."""
        self._set("queue_select", index)
        return self._get("queue_size")

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        """Give queue ``index`` its size and the physical addresses of its three parts, then enable it."""
        self._set("queue_select", index)
        if self._get("queue_enable"):
            raise VirtioPciError(f"{self.name}: queue {index} is already enabled")
        self._set("queue_size", size)
        self._set("queue_msix_vector", VIRTIO_MSI_NO_VECTOR)
        for name, addr in (("queue_desc", desc), ("queue_driver", driver), ("queue_device", device)):
            # Two 32-bit stores, low half first, as every driver does (spec 4.1.3.1: 64-bit fields).
            self._set(f"{name}_lo", addr & 0xFFFFFFFF)
            self._set(f"{name}_hi", addr >> 32)
        off = self._get("queue_notify_off") * self.notify_off_multiplier
        if off + 2 > self.notify_area.length:
            raise VirtioPciError(f"{self.name}: queue {index} notify offset {off:#x} outside the notify area")
        self._notify_offsets[index] = off
        self._set("queue_enable", 1)

    def notify(self, index: int) -> None:
        """Notify the device that queue ``index`` has new available buffers (spec 4.1.4.4)."""
        self.notify_area.write(self._notify_offsets[index], 2, index)

    def read_isr(self) -> int:
        """Read (and so clear) the ISR status: VIRTIO_PCI_ISR_QUEUE / VIRTIO_PCI_ISR_CONFIG bits."""
        return self.isr_area.read(0, 1)

    # --- device configuration ---------------------------------------------------------------------------
    def read_config(self, fields: list[tuple[int, int]]) -> list[int]:
        """Read device configuration fields given as (offset, width), consistently (spec 2.5.1: retry while
        config_generation changes under the reads)."""
        if self.device_cfg is None:
            raise VirtioPciError(f"{self.name}: no device configuration capability")
        for _ in range(100):
            before = self._get("config_generation")
            values = [self.device_cfg.read(off, width) for off, width in fields]
            if self._get("config_generation") == before:
                return values
        raise VirtioPciError(f"{self.name}: device configuration keeps changing")


# --- sysfs ------------------------------------------------------------------------------------------------
def bar_sizes(device: Path) -> dict[int, int]:
    """Sizes of the memory BARs of a PCI device, from its sysfs ``resource`` file."""
    sizes = {}
    for i, line in enumerate((device / "resource").read_text().splitlines()[:6]):
        start, end, _flags = (int(x, 16) for x in line.split())
        if end > start and (device / f"resource{i}").exists():
            sizes[i] = end - start + 1
    return sizes


def open_sysfs(bdf: str, config: PciConfigSpace | None = None) -> tuple[VirtioPciModern, list[MmioRegisters]]:
    """The modern transport of PCI device ``bdf`` (e.g. "0000:00:02.0"), with its BARs mapped from sysfs.

    The device must be bound to a driver that enabled it (uio_pci_generic). Returns the transport and the
    mapped BARs (to close).
    """
    device = SYSFS_PCI_DEVICES / bdf
    cfg = config or PciConfigSpace(device / "config")
    try:
        caps = parse_virtio_caps(cfg.read)
    finally:
        if config is None:
            cfg.close()
    sizes = bar_sizes(device)
    needed = {c.bar for c in caps.values() if c.cfg_type in _MAPPED_CAPS}
    bars: dict[int, MmioRegisters] = {}
    try:
        for bar in sorted(needed):
            if bar not in sizes:
                raise VirtioPciError(f"{bdf}: virtio structures in BAR {bar}, which has no sysfs resource")
            bars[bar] = MmioRegisters(device / f"resource{bar}", sizes[bar])
        transport = VirtioPciModern(caps, dict(bars), name=bdf)
    except BaseException:
        for regs in bars.values():
            regs.close()
        raise
    return transport, list(bars.values())

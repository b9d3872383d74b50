"""vhostmap_guest: netmap rings over a VM's own virtio-net device, from guest userspace.

``open(name)`` gives a `NetmapPort` (vhostmap.netmap.user), the API of the host-side client library, so an
application runs unchanged on the host against a vhostmap port and in the guest against the guest's NIC::

    with vhostmap_guest.open("eth0") as port:
        ring = port.tx_rings[0]
        ring.send(frames)
        port.txsync()

Modes, as netmap's ``admode``: "native" drives the virtio-net device from userspace (uio_pci_generic, huge
page buffers the device reads and writes directly; see driver.py); "generic" goes through the kernel's
driver with AF_PACKET (generic.py); "auto" (the default) is native when the device allows it, else generic.
The name follows nm_open: ``eth0`` (every ring pair), ``eth0-1`` (ring pair 1), ``eth0^`` (host rings);
native mode also accepts the device's PCI address (``0000:00:02.0``, ``0000:00:02.0-1``). "passthrough"
(ptnetmap) uses the rings of a vhostmap passthrough port in place, through an ivshmem device (passthrough.py):
``pt:0`` is the first such device (``pt:0-1`` its ring pair 1), ``pt:0000:00:05.0`` the one at that PCI
address, and any name starting with ``pt:`` selects this mode.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from vhostmap.netmap.abi import NR_REG_ALL_NIC, NR_REG_ONE_NIC, PT_HEARTBEAT_TIMEOUT
from vhostmap.netmap.user import NetmapPort, PortSpec, parse_port_spec
from vhostmap_guest.driver import NativeUnavailable, open_native
from vhostmap_guest.generic import open_generic
from vhostmap_guest.passthrough import PassthroughPort, PassthroughUnavailable, open_passthrough
from vhostmap_guest.pci import BDF, BDF_PATTERN
from vhostmap_guest.port import AdapterPort

__all__ = ["MODES", "AdapterPort", "NativeUnavailable", "PassthroughPort", "PassthroughUnavailable", "open"]

log = logging.getLogger(__name__)
_PCI_NAME = re.compile(rf"^(?:(?P<switch>pt):)?(?P<address>{BDF_PATTERN})(?:-(?P<ring>\d+))?$")
Mode = Literal["auto", "native", "generic", "passthrough"]
MODES: tuple[Mode, ...] = ("auto", "native", "generic", "passthrough")


def open(
    name: str,
    mode: Mode = "auto",
    *,
    pairs: int | None = None,
    interrupts: bool = True,
    heartbeat_timeout: float = PT_HEARTBEAT_TIMEOUT,
) -> AdapterPort | PassthroughPort:
    """Open the guest interface ``name`` (nm_open syntax) in ``mode``; returns a NetmapPort.

    ``pairs`` (native): queue pairs to run, default all. ``interrupts`` (native, passthrough): poll sleeps on
    the device's interrupt (passthrough: when vfio-pci can have the device); False busy-polls.
    ``heartbeat_timeout`` (passthrough): seconds the daemon's heartbeat may stand still while ``poll`` waits
    before it raises PassthroughGone (a daemon SIGKILLed or hung). "auto" falls
    back to generic mode only when native mode cannot work at all
    (`NativeUnavailable`: no modern virtio-net device, no uio_pci_generic, not root); a failure while the
    device is being set up is raised (the device given back to the kernel first).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    spec = port_spec(name)
    if mode == "passthrough" or spec.switch == "pt":
        return open_passthrough(name, spec, interrupts=interrupts, heartbeat_timeout=heartbeat_timeout)
    if spec.switch is not None:
        raise ValueError(f"{name!r}: a guest has no switches (VALE ports are on the host)")
    if mode in ("auto", "native"):
        try:
            return open_native(spec.port, spec, pairs=pairs, interrupts=interrupts)
        except NativeUnavailable as e:
            if mode == "native" or BDF.match(spec.port):
                raise  # generic mode needs an interface, not an address
            log.info("%s: native mode unavailable (%s); using generic mode", spec.port, e)
    return open_generic(spec.port, spec)


def port_spec(name: str) -> PortSpec:
    """What ``name`` asks for: nm_open's names (parse_port_spec), where a PCI address may stand for the
    interface, after ``pt:`` or alone, with ``-R`` for one ring pair; ValueError for anything else."""
    m = _PCI_NAME.match(name)
    if m is None:
        return parse_port_spec(name)
    ring = m["ring"]
    mode = NR_REG_ALL_NIC if ring is None else NR_REG_ONE_NIC
    return PortSpec(m["address"], mode, int(ring or 0), m["switch"])


def _conforms(port: AdapterPort | PassthroughPort) -> NetmapPort:
    """Static check that the guest's ports satisfy the NetmapPort protocol (for mypy; never called)."""
    return port

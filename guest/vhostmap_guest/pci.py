"""PCI functions as Linux's sysfs shows them to guest userspace: where they are, and how an address reads.

The native driver (driver.py, virtio_pci.py), the passthrough driver (passthrough.py) and vfio.py all find
their device here, by the address sysfs names it with.
"""

from __future__ import annotations

import re
from pathlib import Path

SYSFS_PCI_DEVICES = Path("/sys/bus/pci/devices")  # a directory per function, named by its address
SYSFS_PCI_DRIVERS = Path("/sys/bus/pci/drivers")  # a directory per driver: bind, unbind, new_id
SYSFS_PCI_PROBE = Path("/sys/bus/pci/drivers_probe")  # an address written here gets the kernel's driver again

# A function's address as sysfs writes it: domain:bus:device.function, lower-case hex (0000:00:02.0).
BDF_PATTERN = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
BDF = re.compile(f"^{BDF_PATTERN}$")

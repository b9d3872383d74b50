"""Where the lab's guest kernel and initramfs are: the files scripts/guest-kernel builds.

The guest is Debian's 6.1 kernel, uncompressed so QEMU boots it through its PVH entry (no decompression
under TCG), plus a busybox initramfs whose /init (scripts/guest-init.sh) configures the NICs from the kernel
command line and serves commands on a serial port (see `vhostmap.lab.qemu`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/vhostmap")


class GuestKernelMissing(FileNotFoundError):
    """scripts/guest-kernel has not been run (or VHOSTMAP_CACHE points elsewhere)."""


def cache_dir() -> Path:
    """The cache scripts/guest-kernel writes to: ``$VHOSTMAP_CACHE`` or /var/cache/vhostmap."""
    return Path(os.environ.get("VHOSTMAP_CACHE") or DEFAULT_CACHE)


@dataclass(frozen=True)
class GuestKernel:
    """A bootable guest: PVH vmlinux, gzip'd busybox initramfs and the kernel release they belong to."""

    vmlinux: Path
    initrd: Path
    version: str

    @classmethod
    def from_cache(cls, cache: Path | None = None) -> GuestKernel:
        """The guest built in ``cache`` (default `cache_dir()`); raises `GuestKernelMissing` if absent."""
        guest = (cache or cache_dir()) / "guest"
        vmlinux, initrd, version = guest / "vmlinux", guest / "initrd.gz", guest / "kernel-version"
        missing = [p for p in (vmlinux, initrd, version) if not p.is_file()]
        if missing:
            raise GuestKernelMissing(
                f"no guest kernel in {guest} (missing {', '.join(p.name for p in missing)}); "
                "run scripts/guest-kernel (scripts/setup does)"
            )
        return cls(vmlinux=vmlinux, initrd=initrd, version=version.read_text().strip())

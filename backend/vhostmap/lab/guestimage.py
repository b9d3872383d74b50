"""The Python guest image: Debian with python3, numpy and vhostmap, built by scripts/guest-image.

The lab's busybox guest (`vhostmap.lab.guestkernel`) cannot run Python; this image can, for the guest-side
driver (vhostmap_guest) and in-guest benchmarks. It is an uncompressed initramfs booted with the lab's PVH
vmlinux, and its /init is the same scripts/guest-init.sh, so `QemuGuest` drives it unchanged: pass
``GuestImage.ensure().kernel()`` as its ``kernel`` (and enough memory: the root filesystem lives in RAM).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vhostmap.lab.guestkernel import GuestKernel, GuestKernelMissing, cache_dir

REPO = Path(__file__).resolve().parents[3]
BUILDER = REPO / "scripts" / "guest-image"
# What the image needs at boot: ~160 MB of root filesystem in RAM, the unpacking, Python and huge pages.
MEMORY_MB = 1024


class GuestImageMissing(GuestKernelMissing):
    """The image is not built (run scripts/guest-image)."""


@dataclass(frozen=True)
class GuestImage:
    """The kernel and a Python initramfs; ``stamp`` names what the image was made from."""

    vmlinux: Path
    initrd: Path
    version: str
    stamp: str

    @classmethod
    def from_cache(cls, cache: Path | None = None, initrd: Path | None = None) -> GuestImage:
        """The image ``initrd`` (default: the newest built) in ``cache`` (default `cache_dir()`);
        GuestImageMissing if absent."""
        root = cache or cache_dir()
        kernel = GuestKernel.from_cache(root)
        path = initrd or root / "pyguest" / "initrd.cpio"
        if not path.is_file():
            raise GuestImageMissing(f"no Python guest image {path}; run {BUILDER}")
        path = path.resolve()
        stamp = path.stem.removeprefix("initrd-")
        return cls(kernel.vmlinux, path, kernel.version, stamp)

    @classmethod
    def ensure(cls, cache: Path | None = None, *, quiet: bool = False) -> GuestImage:
        """Build (or bring up to date) the image of this checkout with scripts/guest-image, and return it.

        Cheap when nothing changed (the script checks its stamps); the first build takes about a minute,
        a source change about ten seconds. Progress lines go to stderr unless ``quiet``. Images are kept
        per stamp, so another checkout sharing the cache cannot swap this one's image under it. Raises
        GuestImageMissing if the build fails.
        """
        if not BUILDER.is_file():
            raise GuestImageMissing(f"no {BUILDER}: the image can only be built from a checkout")
        env = {**os.environ, "VHOSTMAP_CACHE": str(cache)} if cache is not None else None
        result = subprocess.run(
            [str(BUILDER), "--print-path"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if quiet else None,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace")[-2000:] if quiet and result.stderr else ""
            raise GuestImageMissing(f"{BUILDER} failed with status {result.returncode}\n{detail}")
        return cls.from_cache(cache, Path(result.stdout.decode().strip().splitlines()[-1]))

    def kernel(self) -> GuestKernel:
        """The image as the `GuestKernel` `QemuGuest` boots."""
        return GuestKernel(vmlinux=self.vmlinux, initrd=self.initrd, version=self.version)


def main() -> int:
    """``python -m vhostmap.lab.guestimage``: build the image and print where it is."""
    try:
        image = GuestImage.ensure()
    except GuestImageMissing as e:
        print(e, file=sys.stderr)
        return 1
    print(image.initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

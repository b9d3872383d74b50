"""Where the Python guest image is found (the build itself is exercised by the slow guest tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vhostmap.lab.guestimage import GuestImage, GuestImageMissing
from vhostmap.lab.guestkernel import GuestKernelMissing


def fake_kernel(cache: Path) -> None:
    guest = cache / "guest"
    guest.mkdir(parents=True)
    for name, text in (("vmlinux", "elf"), ("initrd.gz", "gz"), ("kernel-version", "6.1.0-1-amd64\n")):
        (guest / name).write_text(text)


def test_no_kernel_no_image(tmp_path: Path) -> None:
    with pytest.raises(GuestKernelMissing):
        GuestImage.from_cache(tmp_path)


def test_a_kernel_without_an_image_says_how_to_build_one(tmp_path: Path) -> None:
    fake_kernel(tmp_path)
    with pytest.raises(GuestImageMissing, match="guest-image"):
        GuestImage.from_cache(tmp_path)


def test_the_newest_image_is_found_through_its_link_and_named_by_its_stamp(tmp_path: Path) -> None:
    fake_kernel(tmp_path)
    images = tmp_path / "pyguest" / "images"
    images.mkdir(parents=True)
    (images / "initrd-0123456789abcdef.cpio").write_bytes(b"070701")
    (tmp_path / "pyguest" / "initrd.cpio").symlink_to("images/initrd-0123456789abcdef.cpio")
    image = GuestImage.from_cache(tmp_path)
    assert image.stamp == "0123456789abcdef" and image.version == "6.1.0-1-amd64"
    kernel = image.kernel()
    assert kernel.initrd == images / "initrd-0123456789abcdef.cpio" and kernel.vmlinux == image.vmlinux

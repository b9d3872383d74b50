"""The extended-image cache (`vhostmap.lab.userimage`) beside other builders and a user clearing it: a build
survives the cache being cleared under it and keeps other builders out meanwhile, and what vanishes while
a build prunes the cache does not fail it. Busybox images with one file, in a private cache: a build copies
the base initramfs and packs one file, no VM."""

from __future__ import annotations

import fcntl
import shutil
import time
from pathlib import Path

import pytest

from vhostmap.lab.guestkernel import GuestKernel, GuestKernelMissing
from vhostmap.lab.userimage import ImageSpec, build, lock_path


@pytest.fixture(autouse=True)
def _needs_the_guest_kernel() -> None:
    try:
        GuestKernel.from_cache()
    except GuestKernelMissing as e:
        pytest.skip(str(e))


def spec_with(directory: Path, text: str) -> ImageSpec:
    """A busybox image with one file, new content each call (a real build, never a cache hit)."""
    path = directory / f"f{time.monotonic_ns()}.txt"
    path.write_text(text)
    return ImageSpec(files=((path, "/etc/f.txt"),))


def held(lock: Path) -> bool:
    """Whether someone holds ``lock`` (a non-blocking flock of our own fails)."""
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_clearing_the_cache_during_a_build_neither_fails_it_nor_lets_another_builder_in(
    tmp_path: Path,
) -> None:
    """``rm -rf $VHOSTMAP_CACHE/userimages`` while a build runs (the lock file and the build's scratch space
    used to be in there: the build failed, and the next builder took a new lock file and ran beside it)."""
    cache = tmp_path / "cache"
    first = build(spec_with(tmp_path, "one\n"), cache=cache, progress=lambda _: None)
    seen: list[bool] = []

    def clear_the_cache(message: str) -> None:
        if message.startswith("[files]"):  # mid-build: the overlay is being filled
            shutil.rmtree(cache / "userimages")
            seen.append(held(lock_path(cache)))

    kernel = build(spec_with(tmp_path, "two\n"), cache=cache, progress=clear_the_cache)
    assert kernel.initrd.is_file() and kernel.initrd.parent == cache / "userimages"
    assert not first.initrd.exists()  # cleared
    assert seen == [True], "the build's lock was not held once the cache was cleared"
    assert not held(lock_path(cache))


def test_an_image_that_vanishes_while_a_build_prunes_the_cache_does_not_fail_it(tmp_path: Path) -> None:
    """Another builder's pruning can remove an image between this one's listing and its look at the image's
    age; a dangling link is such an image, listed but gone."""
    cache = tmp_path / "cache"
    (cache / "userimages").mkdir(parents=True)
    (cache / "userimages" / "initrd-0000000000000000.cpio").symlink_to(tmp_path / "gone.cpio")
    kernel = build(spec_with(tmp_path, "three\n"), cache=cache, progress=lambda _: None)
    assert kernel.initrd.is_file()


def test_a_killed_builds_scratch_space_is_removed_by_the_next_build(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build(spec_with(tmp_path, "four\n"), cache=cache, progress=lambda _: None)
    scratch = [p for p in cache.rglob("*") if p.is_dir() and "build" in p.name]
    assert scratch == [], scratch  # a finished build leaves none
    stale = cache / ".userimage-build.killed"
    (stale / "overlay").mkdir(parents=True)
    build(spec_with(tmp_path, "five\n"), cache=cache, progress=lambda _: None)
    assert not stale.exists()

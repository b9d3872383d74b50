"""Guest images users extend: a lab image (busybox, or Debian with Python) plus their Debian packages, wheels
and files, cached by content hash (``vhostmap image build``, the testing kit's ``image`` option).

The lab's images are initramfs archives (`vhostmap.lab.guestkernel`, `vhostmap.lab.guestimage`), and the
kernel unpacks concatenated archives in turn, each over the last: an extended image is the base archive
followed by one overlay archive holding what the user added. So a build costs what the additions cost:
  * packages (Python base only: the busybox guest has no C library): host apt downloads exactly the .debs
    the base's Debian root filesystem lacks (``--download-only`` against that root's dpkg status, the same
    bookworm suite), and each is unpacked into the overlay (``dpkg -x``; maintainer scripts do not run, which
    tools and libraries do not need);
  * wheels (Python base only) are unpacked into the guest's dist-packages;
  * files (``LOCAL:REMOTE``, a file or a directory) are copied to REMOTE.
The image is kept as ``$VHOSTMAP_CACHE/userimages/initrd-STAMP.cpio``, STAMP hashing the base and every
input's content, so the same request is free in every later session; the 8 most recently used are kept.
Builders (sessions, xdist workers, ``vhostmap image build``) take turns on a lock beside that directory and
make an image in scratch space beside it too, moved into it whole (a rename), so that clearing the directory
(``rm -rf``) while a build runs neither fails the build nor lets a second builder in meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vhostmap.lab.guestimage import MEMORY_MB, GuestImage, GuestImageMissing
from vhostmap.lab.guestkernel import GuestKernel, cache_dir
from vhostmap.lab.qemu import QemuGuest

Base = Literal["busybox", "python"]
# Bumped when the way images are made changes: older cached images are not reused.
FORMAT = "userimage-v1"
KEEP = 8
# The scratch directories of builds in progress, in the cache directory (beside userimages).
SCRATCH_PREFIX = ".userimage-build."
SITE = "usr/lib/python3/dist-packages"


class ImageBuildError(RuntimeError):
    """An extended image could not be made; the message says which input and why."""


@dataclass(frozen=True)
class ImageSpec:
    """What to add to a base image: Debian ``packages``, ``wheels`` (paths) and ``files`` (local path,
    absolute path in the guest)."""

    base: Base = "busybox"
    packages: tuple[str, ...] = ()
    wheels: tuple[Path, ...] = ()
    files: tuple[tuple[Path, str], ...] = field(default=())

    @classmethod
    def parse_file(cls, text: str) -> tuple[Path, str]:
        """``LOCAL:REMOTE`` as given to ``--file`` (REMOTE absolute)."""
        local, sep, remote = text.rpartition(":")
        if not sep or not local or not remote.startswith("/"):
            raise ValueError(f"--file {text!r}: expected LOCAL:/absolute/path/in/the/guest")
        return Path(local), remote


def _say(message: str) -> None:
    print(f"vhostmap image: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_digest(path: Path) -> str:
    """Content, relative names and modes of a file or of every file under a directory."""
    digest = hashlib.sha256()
    entries = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in entries:
        digest.update(f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_mode:o}:".encode())
        digest.update(_sha256(p).encode())
    return digest.hexdigest()


def base_kernel(base: Base) -> GuestKernel:
    """The base image: the lab's busybox guest, or the newest Python image built on this machine (built by
    scripts/guest-image from this checkout if there is none)."""
    if base == "busybox":
        return GuestKernel.from_cache()
    try:
        return GuestImage.from_cache().kernel()
    except GuestImageMissing:
        return GuestImage.ensure().kernel()


def stamp(spec: ImageSpec, base: GuestKernel) -> str:
    """The hash naming the image ``spec`` makes on ``base``."""
    digest = hashlib.sha256()
    parts = [FORMAT, spec.base, base.version, str(base.initrd.resolve()), str(base.initrd.stat().st_size)]
    parts += [f"pkg:{p}" for p in sorted(set(spec.packages))]
    parts += [f"wheel:{w.name}:{_sha256(w)}" for w in spec.wheels]
    parts += [f"file:{remote}:{_tree_digest(local)}" for local, remote in spec.files]
    for part in parts:
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()[:16]


def lock_path(cache: Path) -> Path:
    """The lock builders using ``cache`` take turns on: outside ``userimages``, which users may clear."""
    return cache / ".userimages.lock"


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(lock_path(cache), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _mtime(path: Path) -> float:
    """When ``path`` was last used; 0 if it is gone (removed since it was listed: the oldest, as good as
    pruned)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _run(cmd: Sequence[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-2000:]
        raise ImageBuildError(f"{what} failed ({' '.join(cmd[:3])} ...):\n{output}")


def _add_packages(
    packages: Sequence[str], overlay: Path, work: Path, progress: Callable[[str], None]
) -> None:
    rootfs = cache_dir() / "pyguest" / "rootfs"
    status = rootfs / "var" / "lib" / "dpkg" / "status"
    if not status.is_file():
        raise ImageBuildError(f"no {status}: the Python image's root filesystem is not built")
    debs = work / "debs"
    (debs / "partial").mkdir(parents=True)
    t0 = time.monotonic()
    progress(f"[packages] resolving and downloading {', '.join(packages)} against the image's dpkg status")
    _run(
        [
            "apt-get", "-q", "-y", "--no-install-recommends",
            "-o", f"Dir::State::status={status}",
            "-o", f"Dir::Cache::archives={debs}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
            "install", "--download-only", *packages,
        ],
        f"apt-get download of {', '.join(packages)}",
    )  # fmt: skip
    files = sorted(debs.glob("*.deb"))
    for deb in files:
        _run(["dpkg-deb", "-x", str(deb), str(overlay)], f"unpacking {deb.name}")
    # The base is merged-/usr (/bin is a link to usr/bin): what a package put in /bin goes to usr/bin, or
    # unpacking the overlay would replace the link with a directory.
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):
        here = overlay / top
        if here.is_dir() and not here.is_symlink() and (rootfs / top).is_symlink():
            target = overlay / "usr" / top
            target.mkdir(parents=True, exist_ok=True)
            for entry in here.iterdir():
                shutil.move(str(entry), target / entry.name)
            here.rmdir()
    size = sum(f.stat().st_size for f in files) / 1e6
    progress(f"[packages] {len(files)} .deb(s), {size:.1f} MB, unpacked in {time.monotonic() - t0:.0f} s")


def build(
    spec: ImageSpec, *, cache: Path | None = None, progress: Callable[[str], None] = _say
) -> GuestKernel:
    """The image ``spec`` describes, from the cache or made now; as the `GuestKernel` `QemuGuest` boots."""
    if spec.base == "busybox" and (spec.packages or spec.wheels):
        raise ImageBuildError("packages and wheels need base python: the busybox guest has no C library")
    for w in spec.wheels:
        if not w.is_file() or w.suffix != ".whl":
            raise ImageBuildError(f"{w} is not a wheel file")
    for local, _ in spec.files:
        if not local.exists():
            raise ImageBuildError(f"{local} does not exist")
    base = base_kernel(spec.base)
    top = cache or cache_dir()
    root = top / "userimages"
    image = root / f"initrd-{stamp(spec, base)}.cpio"
    with _locked(top):
        if image.is_file():
            progress(f"{image} (cached)")
        else:
            t0 = time.monotonic()
            # Scratch space beside the images (a rename moves the image in), left by a killed build if any:
            # no other build runs while the lock is held.
            for stale in top.glob(f"{SCRATCH_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=top, prefix=SCRATCH_PREFIX) as scratch:
                work = Path(scratch)
                overlay = work / "overlay"
                overlay.mkdir()
                if spec.packages:
                    _add_packages(spec.packages, overlay, work, progress)
                for w in spec.wheels:
                    with zipfile.ZipFile(w) as z:
                        z.extractall(overlay / SITE)
                    progress(f"[wheels] {w.name} unpacked into /{SITE}")
                for local, remote in spec.files:
                    target = overlay / remote.lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if local.is_dir():
                        shutil.copytree(local, target, symlinks=True, dirs_exist_ok=True)
                    else:
                        shutil.copy2(local, target)
                    progress(f"[files] {local} -> {remote}")
                _run(
                    [
                        "sh",
                        "-c",
                        f"cd {shlex.quote(str(overlay))} && find . | LC_ALL=C sort"
                        f" | cpio -o -H newc -R 0:0 --quiet > {shlex.quote(str(work / 'overlay.cpio'))}",
                    ],
                    "packing the overlay",
                )
                with open(work / "image", "wb") as out:
                    with open(base.initrd, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                    # The kernel looks for the next archive at a 4-byte boundary (zeros between are skipped).
                    out.write(b"\0" * (-out.tell() % 4))
                    with open(work / "overlay.cpio", "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                root.mkdir(exist_ok=True)  # again: it may have been cleared meanwhile
                os.replace(work / "image", image)
            size = image.stat().st_size / 1e6
            progress(f"{image} ready ({size:.0f} MB) in {time.monotonic() - t0:.0f} s")
        os.utime(image)
        for old in sorted(root.glob("initrd-*.cpio"), key=_mtime, reverse=True)[KEEP:]:
            old.unlink(missing_ok=True)
    return GuestKernel(vmlinux=base.vmlinux, initrd=image, version=base.version)


def memory_mb(kernel: GuestKernel, base: Base) -> int:
    """Guest RAM an image needs: the busybox guest's 256 MiB, or the Python image's, plus twice what the image
    is larger than the base (the root filesystem lives in RAM, and is unpacked from a copy there)."""
    if base == "busybox":
        return 256
    extra = max(0, kernel.initrd.stat().st_size - base_kernel("python").initrd.stat().st_size) >> 20
    return MEMORY_MB + 2 * extra


def boot_seconds(kernel: GuestKernel, base: Base) -> float:
    """Boot ``kernel`` once without NICs and return the seconds until its /init said it was up."""
    with QemuGuest(kernel=kernel, memory_mb=memory_mb(kernel, base), boot_timeout=300) as guest:
        return guest.wait_ready()

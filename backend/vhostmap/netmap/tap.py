"""TAP devices and the few interface ioctls the host rings and the generic adapter need.

For vhostmap a port's host stack is a TAP device (docs/architecture.md, "Host rings"): the frames netmap's
netmap_transmit would catch on their way out of the stack are the frames the stack sends into the TAP, and
what netmap_send_up would hand to the stack is written to the TAP. This module only opens TAPs and talks to
interfaces, with the ioctls of linux/if_tun.h and linux/sockios.h (no iproute2, no netlink):

- ``TapDevice.open``: TUNSETIFF with IFF_TAP | IFF_NO_PI (one frame per read or write, no packet-info
  header; IFF_VNET_HDR stays off unless asked). With ``create`` it first tries IFF_TUN_EXCL, which fails with
  EBUSY when the device exists, so "did we create it" is known without a race. A TAP we created is not
  persistent: it disappears when its fd is closed. A TAP we attached to (made persistent by someone else,
  e.g. ``ip tuntap add``) is left in place.
- ``set_link_up``, ``link_is_up``, ``if_mtu``, ``if_index``: SIOCGIFFLAGS/SIOCSIFFLAGS, SIOCGIFMTU and
  if_nametoindex on any interface.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from types import TracebackType

from vhostmap.netmap.abi import IFNAMSIZ
from vhostmap.netmap.errors import InterfaceError, TapError

TUN_DEVICE = "/dev/net/tun"

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # TUNSETIFF fails with EBUSY if the device already exists
TUNSETOFFLOAD = 0x400454D0
# What a reader with IFF_VNET_HDR takes: the stack may then hand over partial checksums and GSO frames.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

# linux/sockios.h and linux/if.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
IFF_UP = 0x1

# struct ifreq is 40 bytes on LP64: the name, then a union whose first member is used here.
IFREQ_FLAGS = struct.Struct("16sH22x")  # ifr_flags (short)
IFREQ_INT = struct.Struct("16si20x")  # ifr_mtu, ifr_ifindex (int)


def _ifname_bytes(ifname: str) -> bytes:
    raw = ifname.encode()
    if not 0 < len(raw) < IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise InterfaceError(ifname, "name", errno.EINVAL, f"not a valid interface name (1..{IFNAMSIZ - 1})")
    return raw


def if_index(ifname: str) -> int:
    """The ifindex of ``ifname``; InterfaceError (ENODEV) when it does not exist."""
    _ifname_bytes(ifname)
    try:
        return socket.if_nametoindex(ifname)
    except OSError as e:
        raise InterfaceError(ifname, "if_nametoindex", e.errno or errno.ENODEV) from None


def if_exists(ifname: str) -> bool:
    """Whether an interface named ``ifname`` exists in this network namespace."""
    try:
        if_index(ifname)
    except InterfaceError:
        return False
    return True


def _ifreq_ioctl(ifname: str, request: int, layout: struct.Struct, value: int, op: str) -> int:
    name = _ifname_bytes(ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            out = fcntl.ioctl(s.fileno(), request, layout.pack(name, value))
        except OSError as e:
            raise InterfaceError(ifname, op, e.errno or errno.EIO) from None
    return int(layout.unpack(out)[1])


def link_flags(ifname: str) -> int:
    """The IFF_* flags of ``ifname`` (SIOCGIFFLAGS)."""
    return _ifreq_ioctl(ifname, SIOCGIFFLAGS, IFREQ_FLAGS, 0, "SIOCGIFFLAGS")


def link_is_up(ifname: str) -> bool:
    """Whether ``ifname`` is administratively up."""
    return bool(link_flags(ifname) & IFF_UP)


def set_link_up(ifname: str, up: bool = True) -> None:
    """Set ``ifname`` administratively up (or down) with SIOCSIFFLAGS, like ``ip link set dev X up``."""
    flags = link_flags(ifname)
    wanted = flags | IFF_UP if up else flags & ~IFF_UP
    if wanted != flags:
        _ifreq_ioctl(ifname, SIOCSIFFLAGS, IFREQ_FLAGS, wanted, "SIOCSIFFLAGS")


def if_mtu(ifname: str) -> int:
    """The MTU of ``ifname`` (SIOCGIFMTU)."""
    return _ifreq_ioctl(ifname, SIOCGIFMTU, IFREQ_INT, 0, "SIOCGIFMTU")


class TapDevice:
    """An open TAP queue: ``fd`` (non-blocking, close-on-exec), ``name``, and ``created`` (True when this
    object made the device, which then goes away on ``close``). One ``read`` returns one frame, one ``write``
    sends one frame, Ethernet header included (IFF_NO_PI)."""

    def __init__(self, fd: int, name: str, created: bool, vnet_hdr: bool) -> None:
        self.fd = fd
        self.name = name
        self.created = created
        self.vnet_hdr = vnet_hdr

    @classmethod
    def open(
        cls, name: str, *, create: bool = True, multi_queue: bool = False, vnet_hdr: bool = False
    ) -> TapDevice:
        """Attach to TAP ``name``, creating it first if it does not exist and ``create`` is True.

        Raises TapError: ENODEV when it does not exist and ``create`` is False; EBUSY when another process
        holds a single-queue TAP; EINVAL when ``name`` is a TUN device or its multiqueue setting differs;
        EPERM without CAP_NET_ADMIN.
        """
        raw = _ifname_bytes(name)
        flags = (
            IFF_TAP | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0) | (IFF_VNET_HDR if vnet_hdr else 0)
        )
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(name, f"open {TUN_DEVICE}", e.errno or errno.EIO) from None
        try:
            created = False
            if create:
                try:
                    fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(raw, flags | IFF_TUN_EXCL))
                    created = True
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise TapError(name, "TUNSETIFF (create)", e.errno or errno.EIO) from None
            if not created:
                if not if_exists(name):
                    raise TapError(name, "attach", errno.ENODEV, "no such TAP device")
                try:
                    fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(raw, flags))
                except OSError as e:
                    raise TapError(name, "TUNSETIFF (attach)", e.errno or errno.EIO) from None
            out = fcntl.ioctl(fd, TUNGETIFF, IFREQ_FLAGS.pack(b"", 0))
            actual = bytes(IFREQ_FLAGS.unpack(out)[0]).rstrip(b"\0").decode()
            if not int(IFREQ_FLAGS.unpack(out)[1]) & IFF_TAP:
                raise TapError(name, "TUNGETIFF", errno.EINVAL, "the device is a TUN, not a TAP")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, created, vnet_hdr)

    @property
    def closed(self) -> bool:
        """Whether ``close`` ran."""
        return self.fd < 0

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads this reader completes (the TAP must be open with
        IFF_VNET_HDR)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(self.name, "TUNSETOFFLOAD", e.errno or errno.EIO) from None

    def set_up(self, up: bool = True) -> None:
        """Bring the device up (or down): writes to a TAP that is down fail with EIO."""
        try:
            set_link_up(self.name, up)
        except InterfaceError as e:
            raise TapError(self.name, e.op, e.errno or errno.EIO) from None

    def close(self) -> None:
        """Close the queue. A TAP this object created is deleted with it; one it attached to stays.
        Idempotent."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self.created:
            # Someone may have made our device persistent meanwhile; it is ours to remove all the same.
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, TUNSETPERSIST, 0)
        os.close(fd)

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TapDevice({self.name!r}, fd={self.fd}, created={self.created})"

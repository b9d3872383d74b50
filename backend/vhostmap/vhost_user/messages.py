"""The vhost-user vocabulary: request codes, header flags, protocol feature bits and payload layouts.

Follows QEMU's docs/interop/vhost-user.rst: "Message Specification" (header and payloads), "Protocol
features", "Front-end message types" and "Back-end message types". Every number is in the host's native
byte order, as the spec says (both ends run on the same machine), so every layout below is a native
``struct`` format with explicit padding. Each layout is declared once, as the ``LAYOUT`` of its payload
class, whose fields follow the layout's order: one base class (``_Packed``) packs and unpacks them all,
with small hooks where fields and wire values differ. The parser (protocol.py) picks the class from
``REQUESTS`` and the device only sees typed payloads.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from vhostmap.vhost_user.errors import PayloadError

# --- header ------------------------------------------------------------------------------------------------

#: request u32, flags u32, size u32 (the payload bytes that follow).
HEADER = struct.Struct("=III")
VHOST_USER_HDR_SIZE = HEADER.size

VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_VERSION = 0x1
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

#: Largest payload accepted. The spec sets no limit; the biggest legitimate payloads (GET_CONFIG with 256
#: bytes of config space, an 8-region memory table) stay under 300 bytes: a larger size is a broken stream.
VHOST_USER_MAX_PAYLOAD_SIZE = 4096

#: Regions a SET_MEM_TABLE carries at most (one fd each). More need CONFIGURE_MEM_SLOTS and ADD_MEM_REG.
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: Most fds any message carries (SET_MEM_TABLE's); size the SCM_RIGHTS buffer for this many.
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS

#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 the vring index, bit 8 "no fd attached" (poll instead).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

#: Bit number in VringAddr.flags: log writes to the used ring at log_guest_addr (linux/vhost_types.h).
VHOST_VRING_F_LOG = 0

#: Most config space bytes one GET_CONFIG/SET_CONFIG carries.
VHOST_USER_MAX_CONFIG_SIZE = 256
#: DeviceConfig.flags of SET_CONFIG: a driver write of a writable field, or migration restoring any field.
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


class Request(enum.IntEnum):
    """Front-end -> back-end request codes (the header's ``request``), spec names without VHOST_USER_."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end request codes, sent on the SET_BACKEND_REQ_FD channel (VHOST_USER_BACKEND_*)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature mask (VHOST_USER_PROTOCOL_F_*)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# --- payloads ----------------------------------------------------------------------------------------------


def _expect_size(what: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise PayloadError(f"{what} payload is {len(data)} bytes, expected {size}")


@dataclass(frozen=True)
class _Packed:
    """A payload that is exactly its ``LAYOUT``: ``pack`` packs the dataclass fields in declaration order,
    ``unpack`` checks the size and hands the unpacked values to the constructor (which validates them).

    The field order is the wire order, so a payload only says its layout. One whose fields are not the
    layout's values one for one (an encoded u64, a nested region) overrides the two conversion hooks,
    ``_layout_values`` and ``_from_layout``.
    """

    LAYOUT: ClassVar[struct.Struct]
    #: What a PayloadError calls the payload: "<WHAT> payload is 7 bytes, expected 8".
    WHAT: ClassVar[str]

    def _layout_values(self) -> tuple[Any, ...]:
        """The values ``LAYOUT`` packs, in its order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def _from_layout(cls, values: tuple[Any, ...]) -> Self:
        """The payload holding ``values``, as ``LAYOUT`` unpacked them."""
        return cls(*values)

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*self._layout_values())

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _expect_size(cls.WHAT, data, cls.LAYOUT.size)
        return cls._from_layout(cls.LAYOUT.unpack(data))


@dataclass(frozen=True)
class _PackedWithTail(_Packed):
    """A payload whose ``LAYOUT`` is a header that says how many bytes follow it (a memory table's regions, a
    config space's bytes). Its layout values are the header's, then the tail as bytes, so that one pair of
    conversion hooks covers both parts; ``_tail_size`` reads the tail's length off the header."""

    @classmethod
    def _tail_size(cls, head: tuple[Any, ...]) -> tuple[str, int]:
        """How many bytes follow a header holding ``head``, and what a size error calls such a payload.

        Raises PayloadError for a header no tail can make valid: that is the error worth reporting, not the
        size mismatch it usually brings along.
        """
        raise NotImplementedError

    def pack(self) -> bytes:
        *head, tail = self._layout_values()
        return self.LAYOUT.pack(*head) + tail

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.LAYOUT.size:
            raise PayloadError(f"{cls.WHAT} payload is {len(data)} bytes, shorter than its header")
        head = cls.LAYOUT.unpack_from(data)
        what, size = cls._tail_size(head)
        _expect_size(what, data, cls.LAYOUT.size + size)
        return cls._from_layout((*head, bytes(data[cls.LAYOUT.size :])))


@dataclass(frozen=True)
class Empty(_Packed):
    """No payload (size 0)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=")
    WHAT: ClassVar[str] = "empty"


@dataclass(frozen=True)
class U64(_Packed):
    """A single 64-bit integer: feature masks, counts, status, and the REPLY_ACK result (0 is success)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=Q")
    WHAT: ClassVar[str] = "u64"
    value: int


@dataclass(frozen=True)
class VringState(_Packed):
    """A vring state description (struct vhost_vring_state): a ring index and a number (size, base...)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II")
    WHAT: ClassVar[str] = "vring state"
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr(_Packed):
    """A vring address description (struct vhost_vring_addr). The three ring addresses are front-end virtual
    addresses; ``log_guest_addr`` is guest-physical and used when ``flags`` has bit VHOST_VRING_F_LOG."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    WHAT: ClassVar[str] = "vring address"
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @property
    def log_used(self) -> bool:
        """Whether writes to the used ring must be logged (VHOST_VRING_F_LOG)."""
        return bool(self.flags & (1 << VHOST_VRING_F_LOG))


@dataclass(frozen=True)
class VringFile(_Packed):
    """The u64 of SET_VRING_KICK/CALL/ERR: a ring index and whether the message comes without an fd."""

    LAYOUT: ClassVar[struct.Struct] = U64.LAYOUT
    WHAT: ClassVar[str] = "vring file"
    index: int
    nofd: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= VHOST_USER_VRING_IDX_MASK:
            raise PayloadError(f"vring index {self.index} does not fit VHOST_USER_VRING_IDX_MASK")

    # Both fields share the one u64: index in the low byte, nofd as a flag bit.
    def _layout_values(self) -> tuple[Any, ...]:
        return (self.index | (VHOST_USER_VRING_NOFD_MASK if self.nofd else 0),)

    @classmethod
    def _from_layout(cls, values: tuple[Any, ...]) -> Self:
        (value,) = values
        reserved = value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)
        if reserved:
            raise PayloadError(f"vring file u64 {value:#x} has reserved bits {reserved:#x} set")
        return cls(value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class MemoryRegion(_Packed):
    """A memory region description: guest-physical start, size, front-end virtual start, and the offset of
    the region in the fd that comes with it."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    WHAT: ClassVar[str] = "memory region"
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class MemoryTable(_PackedWithTail):
    """The multiple memory regions description of SET_MEM_TABLE: nregions u32, padding u32, then the regions
    (only those present: QEMU and DPDK send nregions regions, not the full array). One fd per region."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=I4x")
    WHAT: ClassVar[str] = "memory table"
    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise PayloadError(
                f"{len(self.regions)} regions, more than VHOST_MEMORY_BASELINE_NREGIONS "
                f"({VHOST_MEMORY_BASELINE_NREGIONS})"
            )

    # The header holds the region count, not a field; the tail is the regions back to back.
    def _layout_values(self) -> tuple[Any, ...]:
        return len(self.regions), b"".join(r.pack() for r in self.regions)

    @classmethod
    def _tail_size(cls, head: tuple[Any, ...]) -> tuple[str, int]:
        (nregions,) = head
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise PayloadError(
                f"nregions {nregions} exceeds VHOST_MEMORY_BASELINE_NREGIONS "
                f"({VHOST_MEMORY_BASELINE_NREGIONS})"
            )
        return f"memory table of {nregions} regions", nregions * MemoryRegion.LAYOUT.size

    @classmethod
    def _from_layout(cls, values: tuple[Any, ...]) -> Self:
        _, tail = values
        return cls(tuple(MemoryRegion._from_layout(v) for v in MemoryRegion.LAYOUT.iter_unpack(tail)))


@dataclass(frozen=True)
class SingleMemoryRegion(_Packed):
    """The single memory region description of ADD_MEM_REG and REM_MEM_REG: u64 padding, then the region."""

    # The region's own layout after the padding, so that its field order stays declared in MemoryRegion.
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=8x" + MemoryRegion.LAYOUT.format.removeprefix("="))
    WHAT: ClassVar[str] = "single memory region"
    region: MemoryRegion

    def _layout_values(self) -> tuple[Any, ...]:
        return self.region._layout_values()

    @classmethod
    def _from_layout(cls, values: tuple[Any, ...]) -> Self:
        return cls(MemoryRegion._from_layout(values))


@dataclass(frozen=True)
class LogDescriptor(_Packed):
    """The log description of SET_LOG_BASE: size of the dirty bitmap and its offset in the fd (where the bit
    of guest-physical address 0 lives)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    WHAT: ClassVar[str] = "log description"
    mmap_size: int
    mmap_offset: int


def _check_config_size(size: int) -> None:
    if size > VHOST_USER_MAX_CONFIG_SIZE:
        raise PayloadError(f"config size {size} exceeds VHOST_USER_MAX_CONFIG_SIZE")


@dataclass(frozen=True)
class DeviceConfig(_PackedWithTail):
    """The virtio device config space payload of GET_CONFIG/SET_CONFIG: ``size`` bytes at ``offset`` of the
    device's config space. ``data`` is always ``size`` bytes (zeros in a GET_CONFIG request)."""

    # Header offset, size, flags; ``data`` is the tail.
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=III")
    WHAT: ClassVar[str] = "config"
    offset: int
    size: int
    flags: int
    data: bytes

    def __post_init__(self) -> None:
        _check_config_size(self.size)
        if len(self.data) != self.size:
            raise PayloadError(f"config size {self.size} but {len(self.data)} bytes of data")

    @classmethod
    def _tail_size(cls, head: tuple[Any, ...]) -> tuple[str, int]:
        _, size, _ = head
        _check_config_size(size)
        return f"config of {size} bytes", size


@dataclass(frozen=True)
class InflightDescriptor(_Packed):
    """The inflight description of GET/SET_INFLIGHT_FD (VhostUserInflight, 24 bytes with padding)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")
    WHAT: ClassVar[str] = "inflight description"
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class IotlbMsg(_Packed):
    """An IOTLB message (struct vhost_iotlb_msg, 32 bytes with its tail padding)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")
    WHAT: ClassVar[str] = "IOTLB message"
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True)
class Raw:
    """The bytes of a payload vhostmap does not interpret (crypto sessions, shared objects, device state
    transfer). Carried whole so the device can refuse the request by name. No layout, hence no _Packed."""

    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))


Payload = (
    Empty
    | U64
    | VringState
    | VringAddr
    | VringFile
    | MemoryTable
    | SingleMemoryRegion
    | LogDescriptor
    | DeviceConfig
    | InflightDescriptor
    | IotlbMsg
    | Raw
)


# --- what each request carries ---------------------------------------------------------------------------

# Valid fd counts, as ranges.
_NONE = range(0, 1)
_ONE = range(1, 2)
_OPTIONAL = range(0, 2)


@dataclass(frozen=True)
class RequestSpec:
    """What the spec says a request carries.

    ``payload``: the class of the request payload. ``fds``: how many fds come with it; None when the payload
    decides (MemoryTable: one per region; VringFile: none when nofd, else one), see ``expected_fds``.
    ``always_replies``: the back-end answers whether or not NEED_REPLY is set (GET_* and the other requests
    whose reply payload is not postcopy-only); ``reply``/``reply_fds``: what that answer carries.
    """

    payload: type[Payload]
    fds: range | None = _NONE
    always_replies: bool = False
    reply: type[Payload] | None = None
    reply_fds: range = _NONE


REQUESTS: dict[Request, RequestSpec] = {
    Request.GET_FEATURES: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.SET_FEATURES: RequestSpec(U64),
    Request.SET_OWNER: RequestSpec(Empty),
    Request.RESET_OWNER: RequestSpec(Empty),
    Request.SET_MEM_TABLE: RequestSpec(MemoryTable, fds=None),
    # Only the LOG_SHMFD form (log description plus the log's fd): a back-end in another process cannot
    # use a log without its fd. With LOG_SHMFD the spec makes the reply unconditional.
    Request.SET_LOG_BASE: RequestSpec(LogDescriptor, fds=_ONE, always_replies=True, reply=U64),
    Request.SET_LOG_FD: RequestSpec(Empty, fds=_ONE),
    Request.SET_VRING_NUM: RequestSpec(VringState),
    Request.SET_VRING_ADDR: RequestSpec(VringAddr),
    Request.SET_VRING_BASE: RequestSpec(VringState),
    Request.GET_VRING_BASE: RequestSpec(VringState, always_replies=True, reply=VringState),
    Request.SET_VRING_KICK: RequestSpec(VringFile, fds=None),
    Request.SET_VRING_CALL: RequestSpec(VringFile, fds=None),
    Request.SET_VRING_ERR: RequestSpec(VringFile, fds=None),
    Request.GET_PROTOCOL_FEATURES: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    Request.GET_QUEUE_NUM: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.SET_VRING_ENABLE: RequestSpec(VringState),
    Request.SEND_RARP: RequestSpec(U64),
    Request.NET_SET_MTU: RequestSpec(U64),
    Request.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=_ONE),
    Request.IOTLB_MSG: RequestSpec(IotlbMsg, always_replies=True, reply=U64),
    Request.SET_VRING_ENDIAN: RequestSpec(VringState),
    Request.GET_CONFIG: RequestSpec(DeviceConfig, always_replies=True, reply=DeviceConfig),
    Request.SET_CONFIG: RequestSpec(DeviceConfig),
    Request.CREATE_CRYPTO_SESSION: RequestSpec(Raw, always_replies=True, reply=Raw),
    Request.CLOSE_CRYPTO_SESSION: RequestSpec(U64),
    Request.POSTCOPY_ADVISE: RequestSpec(Empty, always_replies=True, reply=Empty, reply_fds=_ONE),
    Request.POSTCOPY_LISTEN: RequestSpec(Empty),
    Request.POSTCOPY_END: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.GET_INFLIGHT_FD: RequestSpec(
        InflightDescriptor, always_replies=True, reply=InflightDescriptor, reply_fds=_ONE
    ),
    Request.SET_INFLIGHT_FD: RequestSpec(InflightDescriptor, fds=_ONE),
    Request.GPU_SET_SOCKET: RequestSpec(Empty, fds=_ONE),
    Request.RESET_DEVICE: RequestSpec(Empty),
    Request.VRING_KICK: RequestSpec(VringState),
    Request.GET_MAX_MEM_SLOTS: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.ADD_MEM_REG: RequestSpec(SingleMemoryRegion, fds=_ONE),
    # The spec allows one fd here for old front-ends that sent it; the device closes it unused.
    Request.REM_MEM_REG: RequestSpec(SingleMemoryRegion, fds=_OPTIONAL),
    Request.SET_STATUS: RequestSpec(U64),
    Request.GET_STATUS: RequestSpec(Empty, always_replies=True, reply=U64),
    Request.GET_SHARED_OBJECT: RequestSpec(Raw, always_replies=True, reply=U64, reply_fds=_OPTIONAL),
    Request.SET_DEVICE_STATE_FD: RequestSpec(
        Raw, fds=_ONE, always_replies=True, reply=U64, reply_fds=_OPTIONAL
    ),
    Request.CHECK_DEVICE_STATE: RequestSpec(Empty, always_replies=True, reply=U64),
}


def expected_fds(request: Request, payload: Payload) -> range:
    """How many fds the front-end attaches to ``request`` carrying ``payload`` (a range of valid counts)."""
    rule = REQUESTS[request].fds
    if rule is not None:
        return rule
    if isinstance(payload, MemoryTable):
        n = len(payload.regions)
        return range(n, n + 1)
    if isinstance(payload, VringFile):
        return _NONE if payload.nofd else _ONE
    raise AssertionError(f"{request.name}: no fd rule for {type(payload).__name__}")


def always_replies(request: Request) -> bool:
    """Whether the back-end answers ``request`` even without NEED_REPLY (the spec gives it a reply body)."""
    return REQUESTS[request].always_replies

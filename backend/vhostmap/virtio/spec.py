"""virtio constants and binary layouts, declared once (virtio 1.x spec; Linux UAPI virtio_*.h).

Used by the backend (vhost-user ports) and by the guest driver alike. Feature constants are *bit numbers*
as in the spec; ``bit(n)`` turns one into a mask.

Split virtqueue layout (spec 2.7), for a queue of ``num`` entries, all little-endian:

    descriptor table  16 * num bytes, align 16    {u64 addr, u32 len, u16 flags, u16 next}
    available ring    6 + 2 * num bytes, align 2  {u16 flags, u16 idx, u16 ring[num], u16 used_event}
    used ring         6 + 8 * num bytes, align 4  {u16 flags, u16 idx, {u32 id, u32 len}[num],
                                                   u16 avail_event}

Packed virtqueue layout (spec 2.8), for a queue of ``num`` entries (any size up to 32768), little-endian:

    descriptor ring           16 * num bytes, align 16  {u64 addr, u32 len, u16 id, u16 flags}
    driver event suppression  4 bytes, align 4          {u16 off_wrap, u16 flags}  (the driver area)
    device event suppression  4 bytes, align 4          {u16 off_wrap, u16 flags}  (the device area)
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np

from vhostmap.ethernet import ETH_HLEN


def bit(n: int) -> int:
    """The mask of feature bit number ``n``."""
    return 1 << n


# --- Device-independent feature bits (spec 6) -----------------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40

# vhost's own bits in the same feature word: the front-end asks for dirty-page logging (live migration); the
# back-end announces vhost-user protocol feature negotiation (GET_PROTOCOL_FEATURES).
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30

# --- virtio-net feature bits (spec 5.1.3) ------------------------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_GUEST_USO4 = 54
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_F_SPEED_DUPLEX = 63

# --- Device status (spec 2.1) ---------------------------------------------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# --- virtio-net config space status (spec 5.1.4) ----------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# Queue pairs: virtio-net's maximum (spec 5.1.4: max_virtqueue_pairs in 1..0x8000).
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

# --- Split virtqueue (spec 2.7) ---------------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# The largest split queue the spec allows (queue size is a power of 2, at most 32768).
VIRTQUEUE_MAX_SIZE = 32768

VRING_DESC = struct.Struct("<QIHH")
VRING_USED_ELEM = struct.Struct("<II")
VRING_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
VRING_USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
VRING_AVAIL_HEADER = 4  # flags, idx
VRING_USED_HEADER = 4  # flags, idx


def vring_desc_size(num: int) -> int:
    """Bytes of a descriptor table of ``num`` entries."""
    return VRING_DESC.size * num


def vring_avail_size(num: int, event_idx: bool = True) -> int:
    """Bytes of an available ring of ``num`` entries (with the trailing used_event when EVENT_IDX)."""
    return VRING_AVAIL_HEADER + 2 * num + (2 if event_idx else 0)


def vring_used_size(num: int, event_idx: bool = True) -> int:
    """Bytes of a used ring of ``num`` entries (with the trailing avail_event when EVENT_IDX)."""
    return VRING_USED_HEADER + VRING_USED_ELEM.size * num + (2 if event_idx else 0)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crosses ``event_idx`` (spec 2.7.10).

    All three are free-running 16-bit counters; the arithmetic wraps like the C original.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# --- Packed virtqueue (spec 2.8) --------------------------------------------------------------------------
# Descriptor flags: NEXT, WRITE and INDIRECT as in a split ring, plus the two bits that say who owns it. A
# descriptor is available when AVAIL equals the driver's wrap counter and USED differs from it, used when
# both equal the device's.
VRING_PACKED_DESC_F_AVAIL = 7  # bit numbers, as the spec and Linux UAPI give them
VRING_PACKED_DESC_F_USED = 15
# Event suppression flags (the low 2 bits of the structure's flags); DESC only with VIRTIO_RING_F_EVENT_IDX.
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2
RING_EVENT_FLAGS_MASK = 0x3
# off_wrap: the descriptor offset in the low 15 bits, the wrap counter in bit 15.
VRING_PACKED_EVENT_F_WRAP_CTR = 15

VRING_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
VRING_PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
VRING_PACKED_EVENT = struct.Struct("<HH")  # off_wrap, flags
# Offsets of the fields a device reads or writes one at a time (one 16-bit access each).
VRING_PACKED_DESC_LEN_OFFSET = 8
VRING_PACKED_DESC_ID_OFFSET = 12
VRING_PACKED_DESC_FLAGS_OFFSET = 14
VRING_PACKED_EVENT_FLAGS_OFFSET = 2


def vring_packed_desc_size(num: int) -> int:
    """Bytes of a packed descriptor ring of ``num`` entries."""
    return VRING_PACKED_DESC.size * num


# --- virtio-net header (spec 5.1.6) -----------------------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

# {u8 flags, u8 gso_type, u16 hdr_len, u16 gso_size, u16 csum_start, u16 csum_offset, u16 num_buffers}.
# num_buffers is present with VERSION_1 or MRG_RXBUF, which makes the header 12 bytes; legacy devices
# without MRG_RXBUF use the first 10.
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
# The same header as a numpy record, for reading num_buffers of a whole batch of received headers at once.
VIRTIO_NET_HDR_DTYPE = np.dtype(
    [
        ("flags", "u1"),
        ("gso_type", "u1"),
        ("hdr_len", "<u2"),
        ("gso_size", "<u2"),
        ("csum_start", "<u2"),
        ("csum_offset", "<u2"),
        ("num_buffers", "<u2"),
    ]
)
# The legacy header: the same without num_buffers (also the offload fields alone, and what a packet
# socket with PACKET_VNET_HDR carries).
VIRTIO_NET_HDR_LEGACY = struct.Struct("<BBHHHH")
VIRTIO_NET_HDR_LEGACY_SIZE = VIRTIO_NET_HDR_LEGACY.size
VIRTIO_NET_HDR_SIZE = VIRTIO_NET_HDR.size


def virtio_net_hdr_size(features: int) -> int:
    """Size of the virtio-net header the driver uses under the negotiated ``features``."""
    if features & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)):
        return VIRTIO_NET_HDR_SIZE
    return VIRTIO_NET_HDR_LEGACY_SIZE


def feature_names(features: int) -> list[str]:
    """The names of the virtio feature bits set in ``features`` (``bit N`` for one this module does not
    name), lowest bit first: what a port negotiated, as an operator reads it."""
    names = {
        value: name
        for name, value in globals().items()
        if name.startswith(("VIRTIO_F_", "VIRTIO_RING_F_", "VIRTIO_NET_F_", "VHOST_F_", "VHOST_USER_F_"))
        and isinstance(value, int)
    }
    return [names.get(n, f"bit {n}") for n in range(64) if features & bit(n)]


# --- virtio-net config space (spec 5.1.4) -----------------------------------------------------------------
# {u8 mac[6], u16 status, u16 max_virtqueue_pairs, u16 mtu}; later fields (speed, duplex, rss) unused.
VIRTIO_NET_CONFIG = struct.Struct("<6sHHH")


class VirtioNetConfig(ctypes.LittleEndianStructure):
    """struct virtio_net_config, for a driver reading it field by field (exact-width register accesses)."""

    _pack_ = 1
    _fields_ = [
        ("mac", ctypes.c_uint8 * 6),
        ("status", ctypes.c_uint16),
        ("max_virtqueue_pairs", ctypes.c_uint16),
        ("mtu", ctypes.c_uint16),
    ]


assert ctypes.sizeof(VirtioNetConfig) == VIRTIO_NET_CONFIG.size

# --- virtio-net control virtqueue (spec 5.1.6.5) ----------------------------------------------------------
# A command is {u8 class, u8 command} (device-readable), its data (device-readable), then a u8 ack
# (device-writable) set to VIRTIO_NET_OK or VIRTIO_NET_ERR.
VIRTIO_NET_CTRL_HDR = struct.Struct("<BB")
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0  # data: le16 virtqueue_pairs
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_PAIRS = struct.Struct("<H")

# --- virtio over PCI (spec 4.1) ---------------------------------------------------------------------------
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_ID_NET = 1
VIRTIO_PCI_MODERN_DEVICE_ID_BASE = 0x1040  # modern device id: 0x1040 + device type
VIRTIO_PCI_TRANSITIONAL_NET_DEVICE_ID = 0x1000  # transitional (legacy + modern) network device

# virtio_pci_cap.cfg_type (spec 4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# ISR status bits (spec 4.1.4.5); reading the ISR register clears it and de-asserts INTx.
VIRTIO_PCI_ISR_QUEUE = 1
VIRTIO_PCI_ISR_CONFIG = 2

# No MSI-X vector for a queue or the config change interrupt (spec 4.1.5.1.2).
VIRTIO_MSI_NO_VECTOR = 0xFFFF


class VirtioPciCap(ctypes.LittleEndianStructure):
    """struct virtio_pci_cap: a vendor-specific PCI capability locating one virtio structure in a BAR."""

    _pack_ = 1
    _fields_ = [
        ("cap_vndr", ctypes.c_uint8),
        ("cap_next", ctypes.c_uint8),
        ("cap_len", ctypes.c_uint8),
        ("cfg_type", ctypes.c_uint8),
        ("bar", ctypes.c_uint8),
        ("id", ctypes.c_uint8),
        ("padding", ctypes.c_uint8 * 2),
        ("offset", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
    ]


class VirtioPciNotifyCap(ctypes.LittleEndianStructure):
    """struct virtio_pci_notify_cap: the notify capability, with the multiplier of queue_notify_off."""

    _pack_ = 1
    _fields_ = [("cap", VirtioPciCap), ("notify_off_multiplier", ctypes.c_uint32)]


class VirtioPciCommonCfg(ctypes.LittleEndianStructure):
    """struct virtio_pci_common_cfg (spec 4.1.4.3; the 64-bit queue addresses split in
    32-bit halves, as drivers write them).

    The device dispatches on offset and width: every field is accessed with exactly its own size.
    """

    _pack_ = 1
    _fields_ = [
        ("device_feature_select", ctypes.c_uint32),
        ("device_feature", ctypes.c_uint32),
        ("driver_feature_select", ctypes.c_uint32),
        ("driver_feature", ctypes.c_uint32),
        ("config_msix_vector", ctypes.c_uint16),
        ("num_queues", ctypes.c_uint16),
        ("device_status", ctypes.c_uint8),
        ("config_generation", ctypes.c_uint8),
        ("queue_select", ctypes.c_uint16),
        ("queue_size", ctypes.c_uint16),
        ("queue_msix_vector", ctypes.c_uint16),
        ("queue_enable", ctypes.c_uint16),
        ("queue_notify_off", ctypes.c_uint16),
        ("queue_desc_lo", ctypes.c_uint32),
        ("queue_desc_hi", ctypes.c_uint32),
        ("queue_driver_lo", ctypes.c_uint32),
        ("queue_driver_hi", ctypes.c_uint32),
        ("queue_device_lo", ctypes.c_uint32),
        ("queue_device_hi", ctypes.c_uint32),
    ]


assert ctypes.sizeof(VirtioPciCap) == 16 and ctypes.sizeof(VirtioPciNotifyCap) == 20
assert ctypes.sizeof(VirtioPciCommonCfg) == 56

# --- PCI configuration space (PCI Local Bus spec 6.2; Linux pci_regs.h), as far as a virtio driver needs --
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2  # respond to memory-space accesses (BARs)
PCI_COMMAND_MASTER = 0x4  # bus mastering: the device may DMA
PCI_COMMAND_INTX_DISABLE = 0x400  # INTx masked
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08  # the device asserts INTx
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_VNDR = 0x09
PCI_STD_HEADER_SIZEOF = 0x40
PCI_CFG_SPACE_SIZE = 0x100

VIRTIO_NET_MAX_MTU = 65535 - ETH_HLEN

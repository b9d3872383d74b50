"""Ethernet: the sizes, EtherTypes and MAC address forms every layer speaks of, declared once.

Names follow linux/if_ether.h. A MAC address is 6 bytes, or (where the switch keys tables and compares in
bulk) a 48-bit integer read big-endian, so that byte 0 is the most significant and the group bit is bit 40.
"""

from __future__ import annotations

import re

ETH_ALEN = 6  # octets in one address
ETH_HLEN = 14  # destination, source, EtherType
ETH_ZLEN = 60  # the 64-byte minimum frame without its FCS
ETH_DATA_LEN = 1500  # the classic MTU
ETH_FRAME_LEN = ETH_HLEN + ETH_DATA_LEN

ETH_P_ALL = 0x0003  # every protocol (AF_PACKET)
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD

# The group (multicast/broadcast) bit of an address held as a 48-bit integer: bit 0 of its first byte.
MAC_GROUP_BIT = 1 << 40
BROADCAST = b"\xff" * ETH_ALEN

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """``52:54:00:00:00:10`` (or with ``-``) -> 6 bytes; ValueError, saying what was expected, otherwise."""
    if not _MAC.match(text):
        raise ValueError(f"bad MAC address: {text!r} is not a MAC address (six hex bytes: 52:54:00:12:34:56)")
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(mac: bytes | int) -> str:
    """6 bytes, or a 48-bit integer, -> ``52:54:00:00:00:10``."""
    raw = mac.to_bytes(ETH_ALEN, "big") if isinstance(mac, int) else mac
    return ":".join(f"{b:02x}" for b in raw)

"""The frames vhostmap's generators send (``vhostmap pkt-gen``, a port's ``generate=``, the guest's pktgen):
Ethernet/IPv4/UDP, as netmap's pkt-gen builds them; and Ethernet/IPv4/TCP of up to 64 KiB, as a guest with TSO
hands them over (``generate=`` beyond the MTU)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostmap.ethernet import ETH_HLEN, ETH_P_IP, ETH_ZLEN

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
IP_HLEN = 20
TCP_HLEN = 20
TCP_ACK, TCP_PSH = 0x10, 0x08
MIN_FRAME = ETH_ZLEN
MAX_FRAME = 2048  # one netmap buffer (the default 2 KiB) at most
TSO_MAX_FRAME = 65535  # a frame handed over for segmentation: the most a port completes (VQ_MAX_FRAME)


@dataclass(frozen=True)
class Addresses:
    """Who the generated frames are from and to (netmap pkt-gen's defaults)."""

    src_mac: bytes = bytes.fromhex("020000000001")
    dst_mac: bytes = b"\xff" * 6
    src_ip: bytes = bytes([10, 0, 0, 1])
    dst_ip: bytes = bytes([10, 1, 0, 1])
    src_port: int = 1234
    dst_port: int = 4321


def ipv4_header(addr: Addresses, proto: int, payload_len: int, ident: int = 0) -> bytes:
    """An IPv4 header (no options, don't fragment, TTL 64) with its checksum, for ``payload_len`` bytes."""
    # Imported here: the checksum code needs numpy, and the configuration reads this module's limits.
    from vhostmap.netmap.checksum import inet_checksum

    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, IP_HLEN + payload_len, ident, 0x4000, 64, proto, 0, addr.src_ip, addr.dst_ip
    )
    return hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]


def ether_header(addr: Addresses) -> bytes:
    """An Ethernet header for IPv4."""
    return addr.dst_mac + addr.src_mac + struct.pack("!H", ETH_P_IP)


def udp_frame(length: int, addr: Addresses = Addresses()) -> bytes:
    """An Ethernet/IPv4/UDP frame of ``length`` bytes (without FCS); the UDP checksum is left 0 (allowed)."""
    if not MIN_FRAME <= length <= MAX_FRAME:
        raise ValueError(f"frame length {length} outside {MIN_FRAME}..{MAX_FRAME}")
    payload = bytes(range(256)) * (length // 256 + 1)
    udp_len = length - ETH_HLEN - IP_HLEN
    udp = struct.pack("!HHHH", addr.src_port, addr.dst_port, udp_len, 0) + payload[: udp_len - 8]
    return ether_header(addr) + ipv4_header(addr, IPPROTO_UDP, udp_len) + udp


def tcp_frame(length: int, addr: Addresses = Addresses()) -> bytes:
    """An Ethernet/IPv4/TCP frame (ACK, PSH) of ``length`` bytes, up to TSO_MAX_FRAME, as a sender that leaves
    the checksum to the device writes it: the TCP checksum field holds the pseudo-header's sum
    (VIRTIO_NET_HDR_F_NEEDS_CSUM at the TCP header)."""
    from vhostmap.netmap.checksum import inet_checksum  # as in ipv4_header

    if not MIN_FRAME <= length <= TSO_MAX_FRAME:
        raise ValueError(f"frame length {length} outside {MIN_FRAME}..{TSO_MAX_FRAME}")
    tcp_len = length - ETH_HLEN - IP_HLEN
    pseudo = addr.src_ip + addr.dst_ip + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
    partial = 0xFFFF & ~inet_checksum(pseudo)  # the folded sum itself, not its complement
    tcp = struct.pack(
        "!HHIIBBHHH", addr.src_port, addr.dst_port, 1, 1, TCP_HLEN << 2, TCP_ACK | TCP_PSH, 0xFFFF, partial, 0
    )
    payload = bytes(range(256)) * (tcp_len // 256 + 1)
    return ether_header(addr) + ipv4_header(addr, IPPROTO_TCP, tcp_len) + tcp + payload[: tcp_len - TCP_HLEN]

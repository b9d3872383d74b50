"""Completing TCP/UDP checksums left to offload (what a veth peer hands a packet socket), checked by scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from vhostmap.netmap.checksum import complete_l4_checksum, inet_checksum


def partial(pkt: Packet, l4: type[Packet]) -> bytes:
    """``pkt`` as a CHECKSUM_PARTIAL sender leaves it: a wrong value in the transport checksum."""
    pkt[l4].chksum = 0x1234
    return bytes(pkt)


@pytest.mark.parametrize(
    ("pkt", "l4"),
    [
        (
            Ether()
            / IP(src="10.0.0.3", dst="10.0.0.1")
            / TCP(sport=80, dport=4000, flags="PA")
            / Raw(b"x" * 101),
            TCP,
        ),
        (Ether() / IP(src="10.0.0.3", dst="10.0.0.1", options=b"\x01" * 4) / UDP() / Raw(b"hello"), UDP),
        (Ether() / IPv6(src="fd00::3", dst="fd00::1") / TCP(flags="S") / Raw(b"ab"), TCP),
        (Ether() / IPv6(src="fd00::3", dst="fd00::1") / UDP(sport=5, dport=6) / Raw(b"odd"), UDP),
    ],
)
def test_the_checksum_is_what_scapy_computes(pkt: Packet, l4: type[Packet]) -> None:
    want = Ether(bytes(pkt))[l4].chksum
    fixed = Ether(complete_l4_checksum(partial(pkt, l4)))
    assert fixed[l4].chksum == want
    assert bytes(fixed[l4].payload) == bytes(pkt[l4].payload)


def test_other_frames_are_left_alone() -> None:
    arp_like = bytes(Ether(type=0x0806) / Raw(b"\0" * 28))
    assert complete_l4_checksum(arp_like) == arp_like
    fragment = bytes(Ether() / IP(flags="MF", frag=0) / UDP() / Raw(b"x" * 20))
    assert complete_l4_checksum(fragment) == fragment
    truncated = bytes(Ether() / IP(len=500) / TCP())
    assert complete_l4_checksum(truncated) == truncated


def test_inet_checksum_of_a_known_header() -> None:
    # RFC 1071's worked example bytes: 00 01 f2 03 f4 f5 f6 f7 -> sum ddf2, checksum 220d.
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D

"""The Internet checksum the packet generators use."""

from __future__ import annotations

from vhostmap.netmap.checksum import inet_checksum


def test_inet_checksum_of_a_known_header() -> None:
    # RFC 1071's worked example bytes: 00 01 f2 03 f4 f5 f6 f7 -> sum ddf2, checksum 220d.
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D

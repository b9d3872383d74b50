"""Internet checksums (RFC 1071) of the headers the packet generators build. Checksums a sender left to
offload are completed by netmap/offload.py."""

from __future__ import annotations

import numpy as np

IPPROTO_TCP = 6
IPPROTO_UDP = 17
# Where the checksum field is in each transport header.
_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


def inet_checksum(data: bytes, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (ones' complement of the ones' complement sum), from ``initial``."""
    if len(data) % 2:
        data += b"\0"
    total = initial + int(np.frombuffer(data, ">u2").sum(dtype=np.uint64))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

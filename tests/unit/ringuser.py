"""A netmap ring user's moves in tests: make frames, read received frames, release slots, sync until done."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence

from vhostmap.netmap.abi import NS_MOREFRAG, RingView
from vhostmap.netmap.allocator import NetmapMemory

ETH_P_EXPERIMENTAL = 0x88B5  # IEEE local experimental ethertype: nothing else on the TAP uses it


def frame(length: int, seq: int = 0) -> bytes:
    """An Ethernet frame of ``length`` bytes with the experimental ethertype and a recognisable payload."""
    head = (
        bytes.fromhex("02000000aa01") + bytes.fromhex("02000000bb02") + ETH_P_EXPERIMENTAL.to_bytes(2, "big")
    )
    body = (seq.to_bytes(4, "big") + bytes(range(256)) * (length // 256 + 1))[: length - len(head)]
    return head + body


def take_frames(ring: RingView, mem: NetmapMemory) -> list[bytes]:
    """A ring user reads every frame between head and tail (joining NS_MOREFRAG runs), without releasing."""
    out, cur = [], b""
    i = ring.head
    while i != ring.tail:
        slot = ring.slots[i]
        cur += bytes(mem.buf_view(int(slot["buf_idx"]))[: int(slot["len"])])
        if not int(slot["flags"]) & NS_MOREFRAG:
            out.append(cur)
            cur = b""
        i = (i + 1) % ring.num_slots
    return out


def release(ring: RingView) -> None:
    """The user gives back every slot it holds."""
    ring.head = ring.cur = ring.tail


def sync_until(
    sync: Callable[[], None], done: Callable[[], bool], fds: Sequence[int], what: str, timeout: float = 5.0
) -> None:
    """Sync, then wait for ``fds`` to become readable and sync again, until ``done()`` or the deadline."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    sync()
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {what}")
        poller.poll(max(1, int(left * 1000)))
        sync()

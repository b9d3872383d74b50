"""The netmap API as an application sees it (netmap_user.h), shared by every way of opening a port.

An application is written against `NetmapPort`: it gets TX and RX `UserRing`s, fills or reads slots in
batches through numpy views, moves ``head``/``cur``, and calls ``txsync``/``rxsync``/``poll``. The same code
runs on the host against a vhostmap port (`vhostmap.apps.client.open`) and inside a guest against the
guest's own NIC (`vhostmap_guest.open`), the way a netmap program runs unchanged over any netmap adapter.

Port names follow nm_open's syntax (see `parse_port_spec`): ``vm0`` binds every hardware ring of port vm0,
``vm0-1`` only ring pair 1, ``vm0^`` the host rings, ``vm0*`` both, and ``vale0:app`` a new port ``app`` of
switch ``vale0`` that exists while the application holds it (netmap's VALE ephemeral ports).

Batches, not slots: `UserRing.send` copies a whole batch of frames into the buffers of the next free slots
with one numpy assignment and moves head once; `UserRing.receive` returns the received slots as arrays.
"""

from __future__ import annotations

import re
import select
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt

from vhostmap.netmap.abi import (
    NR_REG_ALL_NIC,
    NR_REG_NIC_SW,
    NR_REG_ONE_NIC,
    NR_REG_SW,
    NS_MOREFRAG,
    RingView,
)

POLLIN = select.POLLIN
POLLOUT = select.POLLOUT

_SPEC = re.compile(
    r"^(?:(?P<switch>[A-Za-z][\w.]*):)?(?P<port>[A-Za-z0-9_][\w.]*?)(?:-(?P<ring>\d+)|(?P<sw>\^)|(?P<all>\*))?$"
)


@dataclass(frozen=True)
class PortSpec:
    """What an nm_open-style name asks for: a port (on ``switch``, for a switch port), and which rings."""

    port: str
    mode: int = NR_REG_ALL_NIC
    ring_id: int = 0
    switch: str | None = None

    def __str__(self) -> str:
        suffix = {NR_REG_ALL_NIC: "", NR_REG_SW: "^", NR_REG_NIC_SW: "*"}.get(self.mode, f"-{self.ring_id}")
        return f"{self.switch}:{self.port}{suffix}" if self.switch else f"{self.port}{suffix}"


def parse_port_spec(name: str) -> PortSpec:
    """``vm0`` / ``vm0-1`` / ``vm0^`` / ``vm0*`` / ``vale0:app`` -> PortSpec; ValueError for anything else."""
    m = _SPEC.match(name)
    if m is None:
        raise ValueError(
            f"port name {name!r} is not PORT, PORT-RING, PORT^, PORT* or SWITCH:PORT (netmap's nm_open names)"
        )
    if m["ring"] is not None:
        return PortSpec(m["port"], NR_REG_ONE_NIC, int(m["ring"]), m["switch"])
    mode = NR_REG_SW if m["sw"] else NR_REG_NIC_SW if m["all"] else NR_REG_ALL_NIC
    return PortSpec(m["port"], mode, 0, m["switch"])


@dataclass(frozen=True)
class Received:
    """Slots received on an RX ring, from ``first`` on: their buffer indexes, lengths and flags (copies).

    A frame longer than one buffer spans several slots, all but the last with NS_MOREFRAG.
    """

    ring: UserRing
    first: int
    buf_idx: npt.NDArray[np.uint32]
    lens: npt.NDArray[np.uint16]
    flags: npt.NDArray[np.uint16]

    def __len__(self) -> int:
        return len(self.buf_idx)

    @property
    def frame_count(self) -> int:
        """Frames among these slots (slots without NS_MOREFRAG)."""
        return int(np.count_nonzero((self.flags & NS_MOREFRAG) == 0))

    @property
    def byte_count(self) -> int:
        """Bytes in these slots."""
        return int(self.lens.sum(dtype=np.int64))

    def data(self, length: int | None = None) -> npt.NDArray[np.uint8]:
        """The first ``length`` bytes (default: the longest slot's) of every slot's buffer, one row per slot.

        A copy made by one numpy gather; bytes past a slot's own len are whatever the buffer held.
        """
        n = int(self.lens.max()) if length is None and len(self) else (length or 0)
        return self.ring.buffers[self.buf_idx, :n].copy()

    def frames(self) -> list[bytes]:
        """Each frame as bytes, NS_MOREFRAG runs joined (convenient, per frame: for tests and tools)."""
        out, parts = [], []
        for idx, length, flags in zip(self.buf_idx, self.lens, self.flags, strict=True):
            parts.append(self.ring.buffers[idx, :length].tobytes())
            if not flags & NS_MOREFRAG:
                out.append(b"".join(parts))
                parts = []
        return out


class UserRing:
    """One netmap ring from its user's side: ``head``/``cur`` are ours to move, ``tail`` is the port's.

    ``buffers`` is every buffer of the memory the ring's slots point into, as a (nbufs, buf_size) uint8
    array, so a batch of buffers is one fancy index away. ``num_slots`` and the buffer geometry are fixed
    when the ring is opened.
    """

    def __init__(self, view: RingView, buffers: npt.NDArray[np.uint8]) -> None:
        self.view = view
        self.buffers = buffers
        self.num_slots = view.num_slots
        self.buf_size = buffers.shape[1]
        self.slots = view.slots

    @property
    def head(self) -> int:
        """First slot the user owns."""
        return self.view.head

    @property
    def cur(self) -> int:
        """Wake-up point (poll waits for tail to move past it)."""
        return self.view.cur

    @property
    def tail(self) -> int:
        """First slot the port owns."""
        return self.view.tail

    def space(self) -> int:
        """nm_ring_space: free slots (TX) or received slots (RX) between cur and tail."""
        return (self.tail - self.cur) % self.num_slots

    def empty(self) -> bool:
        """nm_ring_empty: nothing to send into / nothing received."""
        return self.cur == self.tail

    def indexes(self, n: int, first: int | None = None) -> npt.NDArray[np.int64]:
        """Slot indexes of ``n`` slots from ``first`` (default cur), wrapping."""
        start = self.cur if first is None else first
        return (start + np.arange(n)) % self.num_slots

    def advance(self, n: int) -> None:
        """Hand ``n`` slots from cur to the port (TX: send them; RX: release them): head = cur = cur + n."""
        if not 0 <= n <= self.space():
            raise ValueError(f"cannot advance {n} slots: {self.space()} available")
        new = (self.cur + n) % self.num_slots
        # cur before head: a sync that reads head in between sees an older, still valid, head.
        self.view.cur = new
        self.view.head = new

    # --- TX ---------------------------------------------------------------------------------------------
    def send(self, frames: npt.NDArray[np.uint8] | Sequence[bytes], lens: npt.ArrayLike | None = None) -> int:
        """Copy up to ``space()`` frames into the next free slots and hand them over; frames sent.

        ``frames`` is a (n, L) uint8 array (every row a frame of ``lens[i]`` bytes, default L) or a
        sequence of bytes. Frames must fit one buffer. txsync (or poll) actually sends them.
        """
        if isinstance(frames, np.ndarray):
            batch = frames
            lengths = np.full(len(batch), batch.shape[1], np.uint16) if lens is None else np.asarray(lens)
        else:
            lengths = np.fromiter((len(f) for f in frames), np.uint16, len(frames))
            batch = np.zeros((len(frames), int(lengths.max()) if len(frames) else 0), np.uint8)
            for i, f in enumerate(frames):
                batch[i, : len(f)] = np.frombuffer(f, np.uint8)
        if batch.shape[1] > self.buf_size:
            raise ValueError(f"frames of {batch.shape[1]} bytes do not fit {self.buf_size}-byte buffers")
        n = min(len(batch), self.space())
        if n == 0:
            return 0
        idx = self.indexes(n)
        bufs = self.slots["buf_idx"][idx]
        self.buffers[bufs, : batch.shape[1]] = batch[:n]
        self.slots["len"][idx] = lengths[:n]
        self.slots["flags"][idx] = 0
        self.advance(n)
        return n

    def send_template(self, n: int, frame: npt.NDArray[np.uint8] | bytes, write: bool = True) -> int:
        """Hand over up to ``n`` copies of ``frame`` (one numpy broadcast into the buffers); frames sent.

        With ``write=False`` the buffers are assumed to hold the frame already (filled once with
        `prefill`, on a port that gives the same buffers back): only lens and head change.
        """
        data = np.frombuffer(frame, np.uint8) if isinstance(frame, bytes) else frame
        n = min(n, self.space())
        if n == 0:
            return 0
        idx = self.indexes(n)
        if write:
            self.buffers[self.slots["buf_idx"][idx], : len(data)] = data
        self.slots["len"][idx] = len(data)
        self.slots["flags"][idx] = 0
        self.advance(n)
        return n

    def prefill(self, frame: npt.NDArray[np.uint8] | bytes) -> None:
        """Write ``frame`` into the buffer of every slot of the ring (once, before `send_template`)."""
        data = np.frombuffer(frame, np.uint8) if isinstance(frame, bytes) else frame
        self.buffers[self.slots["buf_idx"], : len(data)] = data

    # --- RX ---------------------------------------------------------------------------------------------
    def receive(self, limit: int | None = None) -> Received:
        """The received slots from cur (at most ``limit``), without releasing them (see `advance`)."""
        n = self.space() if limit is None else min(limit, self.space())
        idx = self.indexes(n)
        s = self.slots[idx]
        return Received(self, self.cur, s["buf_idx"].copy(), s["len"].copy(), s["flags"].copy())


class NetmapPort(Protocol):
    """An opened port, whatever is behind it (a vhostmap port, a guest's NIC natively or through the kernel).

    ``tx_rings``/``rx_rings`` are the rings this open bound (e.g. one pair for ``vm0-1``). ``txsync``
    hands what the TX rings hold between hwcur and head to the port and reclaims sent slots; ``rxsync``
    releases RX slots before head and imports new frames. ``poll`` waits until a TX ring has room
    (POLLOUT) or an RX ring has frames (POLLIN), syncing as netmap's poll does; it returns the ready events
    (0 on timeout). ``close`` releases the rings; a context manager closes on exit.
    """

    @property
    def name(self) -> str:
        """The name it was opened with."""

    @property
    def tx_rings(self) -> Sequence[UserRing]:
        """The bound TX rings."""

    @property
    def rx_rings(self) -> Sequence[UserRing]:
        """The bound RX rings."""

    def txsync(self) -> None:
        """NIOCTXSYNC on every bound TX ring."""

    def rxsync(self) -> None:
        """NIOCRXSYNC on every bound RX ring."""

    def poll(self, events: int = POLLIN, timeout: float | None = None) -> int:
        """Wait (at most ``timeout`` seconds, None: forever) for ``events``; the ready ones."""

    def close(self) -> None:
        """Release the port."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def ready_events(port: NetmapPort, events: int) -> int:
    """The subset of POLLIN/POLLOUT in ``events`` that ``port``'s rings satisfy right now (no sync)."""
    ready = 0
    if events & POLLIN and any(not r.empty() for r in port.rx_rings):
        ready |= POLLIN
    if events & POLLOUT and any(not r.empty() for r in port.tx_rings):
        ready |= POLLOUT
    return ready

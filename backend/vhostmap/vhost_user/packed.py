"""Packed virtqueues as the device (back-end) side sees them (virtio 1.x spec 2.8, VIRTIO_F_RING_PACKED).

The pure-Python reference of the device side of a packed ring, under the untrusted-driver model of the split
reference (virtqueue.py): every descriptor is read once (its flags with one 16-bit load, then the rest),
checked, then used from the copy; chains are bounded, indirect tables validated, buffer ids checked against
the queue size and against the ids already in flight; a violation raises ``VirtqueueError`` naming what was
wrong and where. Buffers are reached through ``GuestMemory``, the one security boundary for addresses.

One ring of ``num`` descriptors holds both directions (spec 2.8.1): the driver makes a descriptor available
by writing its AVAIL flag equal to its wrap counter and USED to the inverse; the device marks one used by
writing both equal to its own. Positions are ring offsets with a wrap counter each (both start at 1). A
chain's descriptors follow each other in the ring (VRING_DESC_F_NEXT on all but the last, whose id is the
buffer id), or one descriptor refers to an indirect table. The device writes one used descriptor per chain
(or, with VIRTIO_F_IN_ORDER, one per batch), and the driver skips as many descriptors as the chain had.

The queue offers the operations rxtx.py runs a split queue with (``pending``, ``pop``, ``unpop``,
``push_used``, ``retract_used``, then ``flush_used``, ``call``, ``enable_kicks``), so the same dequeue and
enqueue move frames over either ring. Its state lives in the C struct its compiled twin works on (struct
vq_packed, datapath/packed.cdef), as SplitVirtqueue's does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.datapath.cfield import CFlag
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.vhost_user.virtqueue import MAX_CHAIN_LENGTH, Chain, RingQueue, VirtqueueError, _address
from vhostmap.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    RING_EVENT_FLAGS_MASK,
    VIRTQUEUE_MAX_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_DESC_FLAGS_OFFSET,
    VRING_PACKED_DESC_LEN_OFFSET,
    VRING_PACKED_EVENT,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAGS_OFFSET,
    bit,
    vring_packed_desc_size,
)

DESC_F_AVAIL = bit(VRING_PACKED_DESC_F_AVAIL)
DESC_F_USED = bit(VRING_PACKED_DESC_F_USED)
# The 16-bit word of a descriptor holding its flags, and of an event suppression structure.
_FLAGS_WORD = VRING_PACKED_DESC_FLAGS_OFFSET // 2
_EVENT_FLAGS_WORD = VRING_PACKED_EVENT_FLAGS_OFFSET // 2
_DESC_WORDS = VRING_PACKED_DESC.size // 2
# What a used descriptor's write changes before its flags: len and id, one after the other.
_LEN_ID = struct.Struct("<IH")


def is_available(flags: int, wrap: int) -> bool:
    """Whether a descriptor with ``flags`` is available to a device whose avail wrap counter is ``wrap``:
    AVAIL equals the counter and USED differs from it (spec 2.8.1)."""
    return bool(flags & DESC_F_AVAIL) == bool(wrap) and bool(flags & DESC_F_USED) != bool(wrap)


def used_flags(wrap: int, written: bool) -> int:
    """The flags of a used descriptor written with used wrap counter ``wrap``: AVAIL and USED both equal to
    it, and VRING_DESC_F_WRITE when the device wrote into the buffer (spec 2.8.4: its length means
    something only then)."""
    return (DESC_F_AVAIL | DESC_F_USED if wrap else 0) | (VRING_DESC_F_WRITE if written else 0)


def packed_need_event(num: int, event: int, new: int, old: int) -> bool:
    """Whether moving the used position from ``old`` to ``new`` passes the descriptor ``event``, all three as
    ``offset + num * wrap`` (one lap of both wrap counter values is 2 * num positions): vring_need_event of
    the split ring, counted modulo 2 * num instead of 2**16 so that it is exact for any queue size. An
    offset the driver wrote past the ring is taken modulo too (a harmless interrupt at most)."""
    lap = 2 * num
    return (new - event - 1) % lap < (new - old) % lap


def position_from_used_flags(used: npt.NDArray[np.bool_]) -> tuple[int, int] | None:
    """Where the device's next used position is, (offset, used wrap counter), from the USED flag of every
    descriptor in the ring, or None when the flags do not say.

    What a front-end that lost its back-end without GET_VRING_BASE cannot tell (QEMU keeps no packed ring
    state of its own: virtio_queue_packed_restore_last_avail_idx does nothing), the ring can, as long as
    every chain took one descriptor (Linux's virtio_net: one buffer per receive chain with mergeable
    buffers, an indirect table or the header in the headroom for transmissions): before the used position
    every descriptor has USED equal to the wrap counter (the device used it in this lap, or the driver made
    it available again for the next), from there on the inverse (available for this lap, or used in the
    last). So the flags are one run (the device just wrapped: offset 0, the other wrap counter) or two runs
    starting at offset 0, the second at the used position. Anything else (a chain of several descriptors,
    a batch the back-end died publishing, VIRTIO_F_IN_ORDER's one used descriptor per batch) is None.
    """
    flips = np.flatnonzero(used[1:] != used[:-1])
    first = int(bool(used[0]))
    if len(flips) == 0:
        return 0, 1 - first
    if len(flips) == 1:
        return int(flips[0]) + 1, first
    return None


@dataclass
class PackedRingAddresses:
    """Where a packed ring is: front-end virtual addresses of the descriptor ring, the driver area and the
    device area (what SET_VRING_ADDR carries in its desc, avail and used fields for a packed ring), and the
    guest-physical addresses of the two the device writes, for dirty logging when ``log`` (VHOST_VRING_F_LOG).

    ``map`` derives the guest-physical addresses from the memory table (the region holding each front-end
    address): SET_VRING_ADDR's log_guest_addr names one address only, and front-ends disagree on which for a
    packed ring (QEMU sends the device area's, DPDK's vhost library logs descriptor writes at offsets from
    it), while the device writes both the descriptor ring and the device area.
    """

    desc_user_addr: int
    driver_user_addr: int
    device_user_addr: int
    desc_guest_addr: int = 0
    device_guest_addr: int = 0
    log: bool = False


@dataclass
class _Popped:
    """A chain taken by ``pop`` in this batch: where it started, for ``unpop``."""

    pos: int
    wrap: int
    id: int


@dataclass
class PackedVirtqueue(RingQueue):
    """Back-end state of one packed virtqueue and the operations on its ring.

    ``last_avail_idx`` with ``avail_wrap_counter`` is where the device looks for the next available chain,
    ``used_idx`` with ``used_wrap_counter`` where it writes the next used descriptor, ``signalled_used`` with
    ``signalled_used_wrap`` the used position at the last notification decision. ``inflight`` holds, for
    each buffer id, the descriptors its chain took in the ring while the id is in flight (popped, not used
    yet), else 0. ``kicks``: whether the driver should notify after adding buffers (a polling device clears
    it, and says so in the device area).

    All of that lives in the C struct the compiled twin works on (``c``, struct vq_packed).
    """

    # The ring layout (what ``vhostmap status`` and inspect name).
    layout: ClassVar[str] = "packed"

    addresses: PackedRingAddresses | None = None
    _desc: memoryview | None = field(default=None, repr=False)
    _driver: memoryview | None = field(default=None, repr=False)
    _device: memoryview | None = field(default=None, repr=False)
    # The same as 16-bit words: flags shared with the driver are read and written with one access each.
    _desc16: npt.NDArray[np.uint16] | None = field(default=None, repr=False)
    _driver16: npt.NDArray[np.uint16] | None = field(default=None, repr=False)
    _device16: npt.NDArray[np.uint16] | None = field(default=None, repr=False)
    # (buffer id, bytes written, descriptors of its chain), in the order flush_used publishes them.
    _pending_used: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    _popped: list[_Popped] = field(default_factory=list, repr=False)
    # ``c`` is a struct vq_packed.
    # uint16_t[num] behind c.inflight, and a numpy view of it for the reference.
    _inflight_c: Any = field(init=False, repr=False, compare=False)
    inflight: npt.NDArray[np.uint16] = field(init=False, repr=False, compare=False)
    # What the compiled datapath keeps for this queue between batches (kernels.Datapath: its
    # CompiledPackedRing, whose out and scratch the batch kernels fill), made on first use.
    compiled_ring: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.c = ffi.new("struct vq_packed *")
        self.c.kicks = 1
        self._inflight_c = ffi.NULL
        self.inflight = np.zeros(0, dtype=np.uint16)
        self.reset_positions()

    # --- the state in C -------------------------------------------------------------------------------
    # Besides RingQueue's: the wrap counters that go with the positions, and in-order publication.
    avail_wrap_counter = CFlag("The device's avail wrap counter (starts at 1).")
    used_wrap_counter = CFlag("The device's used wrap counter (starts at 1).")
    signalled_used_wrap = CFlag("used_wrap_counter at the last notification decision.")
    in_order = CFlag("VIRTIO_F_IN_ORDER negotiated: a batch of length-0 entries is one used descriptor.")

    def reset_positions(self) -> None:
        """Both wrap counters at 1 and every position at 0, as a ring starts (spec 2.8.2)."""
        self.last_avail_idx = self.used_idx = self.signalled_used = 0
        self.avail_wrap_counter = self.used_wrap_counter = self.signalled_used_wrap = 1

    def forget_inflight(self) -> None:
        """Forget every chain in flight and every used entry queued: the ring starts over where
        SET_VRING_BASE says (the chains a fault left taken are available again there, or the driver's reset
        made their ids free)."""
        self.inflight[:] = 0
        self._pending_used.clear()
        self._popped.clear()

    # --- configuration --------------------------------------------------------------------------------
    def set_num(self, num: int) -> None:
        """The queue size: 1..32768, not necessarily a power of two (spec 2.8)."""
        if num <= 0 or num > VIRTQUEUE_MAX_SIZE:
            raise VirtqueueError(self.index, f"queue size {num} is not in 1..32768")
        if num != self.num:
            self.unmap()
            self._inflight_c = ffi.new("uint16_t[]", num)
            self.inflight = np.frombuffer(ffi.buffer(self._inflight_c), dtype=np.uint16)
            self.c.inflight = self._inflight_c
        self.num = num

    def map(self, mem: GuestMemory) -> None:
        """Translate the ring addresses through ``mem``."""
        if self.addresses is None or self.num == 0:
            raise VirtqueueError(self.index, "ring addresses or size not set")
        a = self.addresses
        try:
            self._desc = mem.uva_view(a.desc_user_addr, vring_packed_desc_size(self.num))
            self._driver = mem.uva_view(a.driver_user_addr, VRING_PACKED_EVENT.size)
            self._device = mem.uva_view(a.device_user_addr, VRING_PACKED_EVENT.size)
        except GuestMemoryError as e:
            self.unmap()
            raise VirtqueueError(self.index, f"ring address not in guest memory: {e}") from e
        if a.desc_user_addr % 16 or a.driver_user_addr % 4 or a.device_user_addr % 4:
            self.unmap()
            raise VirtqueueError(self.index, "misaligned ring address")
        self._desc16 = np.frombuffer(self._desc, dtype="<u2")
        self._driver16 = np.frombuffer(self._driver, dtype="<u2")
        self._device16 = np.frombuffer(self._device, dtype="<u2")
        self._mem = mem
        # Where the device's writes are logged: the regions' own guest addresses (see PackedRingAddresses).
        a.desc_guest_addr = mem.uva_to_gpa(a.desc_user_addr, vring_packed_desc_size(self.num))
        a.device_guest_addr = mem.uva_to_gpa(a.device_user_addr, VRING_PACKED_EVENT.size)
        c = self.c
        c.desc = _address(self._desc)
        c.driver = _address(self._driver)
        c.device = _address(self._device)
        c.log_rings = a.log
        c.desc_log_addr = a.desc_guest_addr
        c.device_log_addr = a.device_guest_addr

    @property
    def mapped(self) -> bool:
        """Whether the rings are mapped (addresses set and translated)."""
        return self._desc is not None

    def ring_flags(self) -> npt.NDArray[np.uint16]:
        """The flags of every descriptor of the mapped ring, each read once (a copy)."""
        assert self._desc16 is not None
        return self._desc16[_FLAGS_WORD::_DESC_WORDS].copy()

    def base_is_stale(self) -> bool:
        """Whether the ring's descriptors prove the positions the front-end gave (SET_VRING_BASE) wrong,
        whatever the chains' lengths: the ring was used since a reset, yet they are the reset positions (0,
        both wrap counters 1; a driver sets up a ring with no USED flag); or the descriptor at the available
        position was used in this lap (it cannot be before the device got there); or the one before it was
        used in the other lap (the device got past it in this one: the driver made it available again, or
        the device used it, in this lap). Both positions must be the same (they are after GET_VRING_BASE)."""
        if (self.last_avail_idx, self.avail_wrap_counter) != (self.used_idx, self.used_wrap_counter):
            return False
        flags = self.ring_flags()
        pos, wrap = self.last_avail_idx, self.avail_wrap_counter
        if (pos, wrap) == (0, 1) and (flags & DESC_F_USED).any():
            return True

        def used_in(i: int, lap: int) -> bool:
            return int(flags[i]) & (DESC_F_AVAIL | DESC_F_USED) == (DESC_F_AVAIL | DESC_F_USED if lap else 0)

        before, before_lap = (pos - 1, wrap) if pos else (self.num - 1, 1 - wrap)
        return used_in(pos, wrap) or used_in(before, 1 - before_lap)

    def resume_from_flags(self) -> tuple[int, int] | None:
        """Both positions where the descriptors' USED flags turn (`position_from_used_flags`), chains in
        flight forgotten; the position and wrap counter, or None (nothing changed) when the flags do not
        say."""
        found = position_from_used_flags((self.ring_flags() & DESC_F_USED) != 0)
        if found is not None:
            self.forget_inflight()
            self.last_avail_idx = self.used_idx = self.signalled_used = found[0]
            self.avail_wrap_counter = self.used_wrap_counter = self.signalled_used_wrap = found[1]
        return found

    def unmap(self) -> None:
        """Forget the ring mappings (memory table replaced, queue stopped)."""
        self._desc = self._driver = self._device = None
        self._desc16 = self._driver16 = self._device16 = None
        self._mem = None
        c = self.c
        c.desc = c.driver = c.device = ffi.NULL

    @property
    def ready(self) -> bool:
        """Whether the device may process this queue now."""
        return self.started and self.enabled and self._desc is not None

    def waiting(self) -> int:
        """Chains available and not taken yet, as vqp_pending counts them (0 while not mapped; never
        raises: for ``vhostmap stats``' occupancy)."""
        return int(lib.vqp_pending(self.c)) if self._desc is not None else 0

    # --- inspection ---------------------------------------------------------------------------------
    def snapshot(self, chains: int = 0) -> dict[str, Any]:
        """The queue as ``vhostmap inspect`` shows it, read-only: size and state, the device's positions and
        wrap counters, both event suppression structures as they are in guest memory, and the first
        ``chains`` chains available and not taken yet, each walked with every check (taken and given back at
        once: nothing is consumed; a chain that breaks a rule shows the fault instead of its segments)."""
        out: dict[str, Any] = {
            "index": self.index,
            "layout": self.layout,
            "direction": "guest receive" if self.index % 2 == 0 else "guest transmit",
            "size": self.num,
            "started": self.started,
            "enabled": self.enabled,
            "mapped": self._desc is not None,
            "kick_fd": self.kick_fd is not None,
            "call_fd": self.call_fd is not None,
            "kicks_asked": self.kicks,
            "faulted": self.faulted,
            "last_avail_idx": self.last_avail_idx,
            "avail_wrap_counter": int(self.avail_wrap_counter),
            "used_idx": self.used_idx,
            "used_wrap_counter": int(self.used_wrap_counter),
        }
        driver16, device16 = self._driver16, self._device16
        if driver16 is None or device16 is None or self._pending_used or self._popped:
            return out  # not mapped, or (never between batches) a batch half done: nothing to walk
        pending = self.pending()
        out |= {
            "pending": pending,
            "driver_event_flags": int(driver16[_EVENT_FLAGS_WORD]),
            "driver_event_off_wrap": int(driver16[0]),
            "device_event_flags": int(device16[_EVENT_FLAGS_WORD]),
            "device_event_off_wrap": int(device16[0]),
        }
        listed: list[dict[str, Any]] = []
        taken = 0
        try:
            for _ in range(min(chains, pending)):
                entry: dict[str, Any] = {"position": self.last_avail_idx}
                listed.append(entry)
                try:
                    chain = self.pop(writable=self.index % 2 == 0)
                except VirtqueueError as e:
                    entry["fault"] = str(e)
                    break  # the chains after a bad one cannot be found
                taken += 1
                entry |= {"head": chain.head, "length": chain.length}
                entry["segments"] = [list(seg) for seg in chain.segments]
        finally:
            for _ in range(taken):
                self.unpop()
        out["chains"] = listed
        return out

    # --- available descriptors ------------------------------------------------------------------------
    def _flags(self, pos: int) -> int:
        """The flags of descriptor ``pos``, one 16-bit load (what the driver wrote before them is visible
        after them: the driver writes a chain's head flags last, behind a write barrier)."""
        assert self._desc16 is not None
        return int(self._desc16[_DESC_WORDS * pos + _FLAGS_WORD])

    def _step(self, pos: int, wrap: int) -> tuple[int, int]:
        """The ring position after ``pos``, and its wrap counter."""
        pos += 1
        return (0, wrap ^ 1) if pos == self.num else (pos, wrap)

    def pending(self) -> int:
        """How many chains are available from ``last_avail_idx``: heads whose flags say available, each
        chain skipped over by its NEXT flags, at most ``num`` descriptors looked at. Nothing else is checked
        here: ``pop`` validates each chain it takes."""
        if self._desc16 is None or self.num == 0 or self.last_avail_idx >= self.num:
            return 0
        pos, wrap = self.last_avail_idx, int(self.avail_wrap_counter)
        chains = seen = 0
        while seen < self.num:
            flags = self._flags(pos)
            if not is_available(flags, wrap):
                break
            chains += 1
            # The rest of the chain: NEXT on every descriptor but its last.
            while flags & VRING_DESC_F_NEXT and seen < self.num:
                seen += 1
                pos, wrap = self._step(pos, wrap)
                flags = self._flags(pos)
            seen += 1
            pos, wrap = self._step(pos, wrap)
        return chains

    def pop(self, writable: bool) -> Chain:
        """Take the next available chain (``pending()`` must be > 0) and validate it completely. The
        chain's ``head`` is its buffer id."""
        assert self._desc is not None and self._mem is not None
        if self.last_avail_idx >= self.num:
            raise ValueError(f"virtqueue {self.index}: position {self.last_avail_idx} outside the ring")
        head = pos = self.last_avail_idx
        wrap = int(self.avail_wrap_counter)
        limit = min(self.num, MAX_CHAIN_LENGTH)
        segments: list[tuple[int, int]] = []
        total = 0
        for ndesc in range(1, limit + 1):
            flags = self._flags(pos)
            if not is_available(flags, wrap):
                raise VirtqueueError(
                    self.index, f"descriptor {pos} of the chain at descriptor {head} is not available"
                )
            # Read once: the flags above, the rest of the descriptor here; the copy's flags are not looked at.
            addr, length, buffer_id, _ = VRING_PACKED_DESC.unpack_from(
                self._desc, VRING_PACKED_DESC.size * pos
            )
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(
                        self.index, f"indirect descriptor {pos} but INDIRECT_DESC not negotiated"
                    )
                if ndesc > 1:
                    raise VirtqueueError(self.index, f"indirect descriptor {pos} inside a chain")
                if flags & VRING_DESC_F_NEXT:
                    raise VirtqueueError(self.index, f"descriptor {pos} has both INDIRECT and NEXT")
                total = self._walk_indirect(pos, addr, length, writable, segments)
                break
            self._check_direction(flags, writable, f"descriptor {pos}")
            if length:
                self._translate(addr, length, f"buffer of descriptor {pos}")
                segments.append((addr, length))
                total += length
            if not flags & VRING_DESC_F_NEXT:
                break
            pos, wrap = self._step(pos, wrap)
        else:
            raise VirtqueueError(
                self.index, f"chain at descriptor {head} is longer than {limit} descriptors (a loop?)"
            )
        # The buffer id is in the last descriptor of the chain (spec 2.8.6), the indirect one for a table.
        if buffer_id >= self.num:
            raise VirtqueueError(
                self.index, f"buffer id {buffer_id} of the chain at descriptor {head} >= {self.num}"
            )
        if self.inflight[buffer_id]:
            raise VirtqueueError(
                self.index,
                f"buffer id {buffer_id} of the chain at descriptor {head} is already in use"
                " (made available twice)",
            )
        self.inflight[buffer_id] = ndesc
        self._popped.append(_Popped(head, int(self.avail_wrap_counter), buffer_id))
        self.last_avail_idx, self.avail_wrap_counter = self._step(pos, wrap)
        return Chain(buffer_id, tuple(segments), total)

    def _walk_indirect(
        self, pos: int, addr: int, length: int, writable: bool, segments: list[tuple[int, int]]
    ) -> int:
        """The segments of the indirect table at descriptor ``pos`` (``addr``, ``length``), appended to
        ``segments``; their total length. Every entry of the table is one buffer, in order (spec 2.8.7: only
        WRITE means something there; NEXT and the id are ignored, INDIRECT is refused)."""
        size = VRING_PACKED_DESC.size
        if length == 0 or length % size or length // size > MAX_CHAIN_LENGTH:
            raise VirtqueueError(self.index, f"indirect table at descriptor {pos} has bad length {length}")
        table = self._translate(addr, length, f"indirect table of descriptor {pos}")
        total = 0
        for e in range(length // size):
            b_addr, b_len, _, b_flags = VRING_PACKED_DESC.unpack_from(table, size * e)
            if b_flags & VRING_DESC_F_INDIRECT:
                raise VirtqueueError(self.index, f"nested indirect table in entry {e} of descriptor {pos}")
            self._check_direction(b_flags, writable, f"entry {e} of the indirect table of descriptor {pos}")
            if b_len:
                self._translate(b_addr, b_len, f"buffer of entry {e} of descriptor {pos}")
                segments.append((b_addr, b_len))
                total += b_len
        return total

    def _check_direction(self, flags: int, writable: bool, what: str) -> None:
        if bool(flags & VRING_DESC_F_WRITE) != writable:
            kind = "read-only" if writable else "device-writable"
            raise VirtqueueError(self.index, f"{kind} {what} in a chain that must not have one")

    def unpop(self) -> None:
        """Give back the chain just popped (it did not fit); the next pop returns it again."""
        p = self._popped.pop()
        self.inflight[p.id] = 0
        self.last_avail_idx, self.avail_wrap_counter = p.pos, p.wrap

    # --- used descriptors -----------------------------------------------------------------------------
    def push_used(self, head: int, length: int) -> None:
        """Queue a used entry for the chain of buffer id ``head`` (popped, in flight); ``flush_used``
        publishes the batch."""
        ndesc = int(self.inflight[head])
        assert ndesc, f"buffer id {head} is not in flight"
        self._pending_used.append((head, length, ndesc))

    def retract_used(self, n: int) -> None:
        """Forget the last ``n`` queued used entries (a frame given up on after its first chains)."""
        del self._pending_used[len(self._pending_used) - n :]

    def flush_used(self) -> int:
        """Write the queued used entries into the ring and free their ids; the number of entries.

        One used descriptor per entry, at the used position, which then moves past the descriptors of the
        entry's chain (spec 2.8.6). With ``in_order``, a batch whose entries all have length 0 (a transmit
        queue's) is one used descriptor carrying the last buffer id (spec 2.8.8: the skipped buffers count
        as used); entries that carry lengths are written one by one, since a skipped buffer would count as
        wholly written. Id and length go first, then the flags of every descriptor but the first, then,
        last, the first's flags: the driver polls only the next position, and sees the whole batch (a
        mergeable frame's buffers among it) once that one turns used (spec 2.8.9).
        """
        desc, desc16 = self._desc, self._desc16
        if not self._pending_used or desc is None or desc16 is None:
            self._popped.clear()
            return 0
        if self.used_idx >= self.num:
            raise ValueError(f"virtqueue {self.index}: position {self.used_idx} outside the ring")
        entries = self._pending_used
        if self.in_order and not any(length for _, length, _ in entries):
            writes = [(entries[-1][0], 0, sum(n for _, _, n in entries))]
        else:
            writes = entries
        pos, wrap = self.used_idx, int(self.used_wrap_counter)
        flags_at: list[tuple[int, int]] = []
        for buffer_id, length, ndesc in writes:
            # addr is left as the driver wrote it (unused in a used descriptor).
            _LEN_ID.pack_into(
                desc, VRING_PACKED_DESC.size * pos + VRING_PACKED_DESC_LEN_OFFSET, length, buffer_id
            )
            flags_at.append((pos, used_flags(wrap, length > 0)))
            for _ in range(ndesc):
                pos, wrap = self._step(pos, wrap)
        # A write barrier here in C: ids and lengths before any flags.
        for p, f in flags_at[1:]:
            desc16[_DESC_WORDS * p + _FLAGS_WORD] = f
        # And another: the batch's other descriptors before its first turns used.
        p, f = flags_at[0]
        desc16[_DESC_WORDS * p + _FLAGS_WORD] = f
        for p, _ in flags_at:
            self._log_ring(self.addresses.desc_guest_addr if self.addresses else 0, p, VRING_PACKED_DESC.size)
        for buffer_id, _, _ in entries:
            self.inflight[buffer_id] = 0
        self.used_idx, self.used_wrap_counter = pos, wrap
        n = len(entries)
        self._pending_used.clear()
        self._popped.clear()
        return n

    def _log_ring(self, base: int, index: int, size: int) -> None:
        """Mark ``size`` bytes at ``base + index * size`` dirty, when logging (VHOST_F_LOG_ALL) and the ring
        asked for it (VHOST_VRING_F_LOG)."""
        if self.log_dirty and self.addresses is not None and self.addresses.log and self._mem is not None:
            self._mem.log_write(base + index * size, size)

    # --- notifications --------------------------------------------------------------------------------
    def enable_kicks(self) -> None:
        """Say in the device area whether the driver should notify: with ``kicks``, at the next available
        descriptor (RING_EVENT_FLAGS_DESC at last_avail_idx and its wrap counter with EVENT_IDX, else
        ENABLE); without, RING_EVENT_FLAGS_DISABLE. off_wrap goes before the flags that make it count."""
        device16 = self._device16
        if device16 is None:
            return
        if not self.kicks:
            device16[_EVENT_FLAGS_WORD] = RING_EVENT_FLAGS_DISABLE
        elif self.event_idx:
            device16[0] = self.last_avail_idx | int(self.avail_wrap_counter) << VRING_PACKED_EVENT_F_WRAP_CTR
            device16[_EVENT_FLAGS_WORD] = RING_EVENT_FLAGS_DESC
        else:
            device16[_EVENT_FLAGS_WORD] = RING_EVENT_FLAGS_ENABLE
        # Logged even when nothing was used: a migration's destination must see what the driver was asked.
        self._log_ring(self.addresses.device_guest_addr if self.addresses else 0, 0, VRING_PACKED_EVENT.size)

    def needs_call(self) -> bool:
        """Whether the driver wants an interrupt for the used descriptors written since the last call
        (spec 2.8.10): never with RING_EVENT_FLAGS_DISABLE; with RING_EVENT_FLAGS_DESC and EVENT_IDX, when
        the used position passed the descriptor off_wrap names; otherwise (ENABLE, or a value the driver may
        not use) whenever something was used."""
        assert self._driver16 is not None
        num = self.num
        new = self.used_idx + num * int(self.used_wrap_counter)
        old = self.signalled_used + num * int(self.signalled_used_wrap)
        # Read once: the flags, then the offset they make count.
        flags = int(self._driver16[_EVENT_FLAGS_WORD]) & RING_EVENT_FLAGS_MASK
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            off_wrap = int(self._driver16[0])
            event = (off_wrap & 0x7FFF) + num * (off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR)
            return packed_need_event(num, event, new, old)
        return new != old

    def call(self) -> bool:
        """Signal the call eventfd if the driver wants it; returns whether it was signalled."""
        wanted = self._driver16 is not None and self.needs_call()
        self.signalled_used, self.signalled_used_wrap = self.used_idx, self.used_wrap_counter
        return wanted and self._signal()

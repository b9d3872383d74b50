"""Split virtqueues as the device (back-end) side sees them (virtio 1.x spec 2.7).

Everything in guest memory is written by an untrusted driver. This module is the pure-Python reference of the
descriptor walk: every index, length, flag and address is checked, chains are bounded so a loop is caught, and
indirect tables are validated. A violation raises ``VirtqueueError``, which the port turns into "device
broken"; nothing here trusts a value twice (each is read once, then checked, then used).

Rings are reached through front-end virtual addresses (SET_VRING_ADDR), buffers through guest-physical ones;
both are translated by ``GuestMemory``, the one security boundary for addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import eventfds, ffi, lib
from vhostmap.datapath.cfield import CField, CFlag
from vhostmap.vhost_user.errors import GuestMemoryError
from vhostmap.vhost_user.memory import GuestMemory
from vhostmap.virtio.spec import (
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_AVAIL_HEADER,
    VRING_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    VRING_USED_F_NO_NOTIFY,
    VRING_USED_HEADER,
    vring_avail_size,
    vring_desc_size,
    vring_need_event,
    vring_used_size,
)

# A chain longer than this many descriptors is a loop or an abuse; Linux never builds chains longer than
# MAX_SKB_FRAGS + 2 (19) for virtio-net, indirect tables included.
MAX_CHAIN_LENGTH = 1024


def _address(view: memoryview) -> Any:
    """A pointer to the bytes of ``view`` (the buffer export is released at once; ``view`` keeps them)."""
    anchor = ffi.from_buffer(view)
    try:
        return ffi.cast("uint8_t *", ffi.cast("uintptr_t", anchor))
    finally:
        ffi.release(anchor)


class VirtqueueError(Exception):
    """The driver put something invalid in a virtqueue: the device must be marked broken."""

    def __init__(self, queue: int, reason: str) -> None:
        super().__init__(f"virtqueue {queue}: {reason}")
        self.queue = queue
        self.reason = reason


class CallRefused(VirtqueueError):
    """The call eventfd refused an interrupt (`eventfds.signal` returned ``result``): the front-end does not
    take its interrupts, so the device is marked broken rather than the datapath made to wait for it.

    The batch itself went through (used entries published): ``batch`` is its result for the caller to count,
    attached by whoever ran the batch (None when no batch was being finished)."""

    def __init__(self, queue: int, result: eventfds.Signal) -> None:
        super().__init__(queue, f"call eventfd refused the interrupt: {eventfds.SIGNAL_FAILURES[result]}")
        self.batch: Any = None


@dataclass(frozen=True, slots=True)
class Chain:
    """One descriptor chain taken from the available ring.

    ``segments`` are (guest-physical address, length) in chain order, already translated-checked, all of the
    direction the queue expects (device-readable on a transmit queue, device-writable on a receive queue).
    """

    head: int
    segments: tuple[tuple[int, int], ...]
    length: int


@dataclass
class VringAddresses:
    """SET_VRING_ADDR: front-end virtual addresses, plus the used ring's guest address for logging."""

    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    log_guest_addr: int = 0
    log_used: bool = False


@dataclass
class RingQueue:
    """What a virtqueue keeps whatever its layout (SplitVirtqueue here; packed.PackedVirtqueue, spec 2.8):
    its index, the front-end's eventfds, whether it was started (SET_VRING_KICK) and enabled
    (SET_VRING_ENABLE), the guest memory its rings were mapped through, and the fields the C structs of both
    layouts share (struct vq_split, struct vq_packed: ``c``, which each layout makes)."""

    index: int
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    _mem: GuestMemory | None = field(default=None, repr=False)
    # The C state the compiled kernels are handed (kernels.py, packed_kernels.py, VhostUserPort.fast_queues).
    c: Any = field(init=False, repr=False, compare=False)

    # --- the state in C, both layouts -----------------------------------------------------------------
    num = CField("Queue size (SET_VRING_NUM), 0 until set.", mask=0xFFFF_FFFF)
    last_avail_idx = CField(
        "The next available entry (split) or descriptor (packed) the device looks at.", mask=0xFFFF
    )
    used_idx = CField(
        "Where the device publishes its next used entry (split: its shadow of used->idx).", mask=0xFFFF
    )
    signalled_used = CField("used_idx at the last notification decision.", mask=0xFFFF)
    event_idx = CFlag("VIRTIO_RING_F_EVENT_IDX negotiated.")
    indirect = CFlag("VIRTIO_RING_F_INDIRECT_DESC negotiated.")
    log_dirty = CFlag("VHOST_F_LOG_ALL: log every write to guest memory (migration).")
    kicks = CFlag("Whether the driver is asked to notify after adding buffers (a polling device clears it).")
    faulted = CFlag("A compiled pass met a driver fault here: no pass syncs it until the device is reset.")
    host_offloads = CFlag(
        "VIRTIO_NET_F_CSUM negotiated: transmitted frames may ask for offloads (rxtx.dequeue)."
    )
    pass_offloads = CField(
        "Transmit queue: the NEEDS_* (netmap/offload.py) its frames keep (NS_VNET_HDR) instead of being"
        " completed, because every destination takes them; set by the forwarders.",
        mask=0xFF,
    )
    guest_offloads = CField(
        "Receive queue: the NEEDS_* the driver takes (device.accepted_offloads); a frame with its header that"
        " asks for more is completed for it on the way out.",
        mask=0xFF,
    )

    def _translate(self, gpa: int, length: int, what: str) -> memoryview:
        """The guest buffer at ``gpa``; a VirtqueueError naming ``what`` when it is not in guest memory."""
        assert self._mem is not None
        try:
            return self._mem.view(gpa, length)
        except GuestMemoryError as e:
            raise VirtqueueError(self.index, f"{what}: {e}") from e

    def _signal(self) -> bool:
        """Signal the call eventfd (the decision is the caller's); whether there was one to signal. Guarded:
        the front-end shares the eventfd and may have made it blocking and filled it (CallRefused)."""
        if self.call_fd is None:
            return False
        result = eventfds.signal(self.call_fd)
        if result != eventfds.Signal.OK:
            raise CallRefused(self.index, result)
        self.c.calls += 1
        return True


@dataclass
class SplitVirtqueue(RingQueue):
    """Back-end state of one split virtqueue and the operations on its rings.

    ``last_avail_idx`` is the next available entry the device will consume (SET/GET_VRING_BASE),
    ``used_idx`` the device's shadow of used->idx, published by ``flush_used``; ``signalled_used`` the used
    index at the last notification decision (EVENT_IDX). ``kicks``: whether the driver should kick after
    adding buffers; a polling device (``--poll``) clears it, since it finds new buffers anyway and a kick
    costs the driver a system call per burst.

    Those and the negotiated ring features (``num``, ``event_idx``, ``indirect``, ``log_dirty``) live in the
    C struct the compiled kernels work on (``c``, struct vq_split in datapath/virtio.cdef), beside the ring
    addresses ``map`` translated, so a batch needs no copying in and out; ``scratch`` and ``out`` are the
    kernels' other arguments.
    """

    # The ring layout (what ``vhostmap status`` and inspect name).
    layout: ClassVar[str] = "split"

    addresses: VringAddresses | None = None
    _desc: memoryview | None = field(default=None, repr=False)
    _avail: memoryview | None = field(default=None, repr=False)
    _used: memoryview | None = field(default=None, repr=False)
    # The same rings as 16-bit words. Indexes shared with the driver are read and written through these:
    # numpy does one 16-bit load or store, where struct packs byte by byte and a concurrent reader could
    # see half an update (a torn used->idx made DPDK free descriptors it never gave us).
    _avail16: npt.NDArray[np.uint16] | None = field(default=None, repr=False)
    _used16: npt.NDArray[np.uint16] | None = field(default=None, repr=False)
    _pending_used: list[tuple[int, int]] = field(default_factory=list, repr=False)
    # ``c`` is a struct vq_split: the indexes, negotiated features and ring addresses the kernels read and
    # advance.
    # struct vq_used_elem[num]: where a kernel puts the used entries of its batch (NULL until set_num).
    scratch: Any = field(init=False, repr=False, compare=False)
    # struct vq_batch: what a kernel's batch did (counts, notify, the fault), read back by kernels.finish.
    out: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.c = ffi.new("struct vq_split *")
        self.c.kicks = 1
        self.scratch = ffi.NULL
        self.out = ffi.new("struct vq_batch *")

    # --- configuration --------------------------------------------------------------------------------
    def set_num(self, num: int) -> None:
        """SET_VRING_NUM: the queue size, a power of two up to 32768."""
        if num <= 0 or num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise VirtqueueError(self.index, f"queue size {num} is not a power of two in 1..32768")
        if num != self.num:
            # Ring views and addresses are for the old size until map() runs again.
            self.unmap()
            self.scratch = ffi.new("struct vq_used_elem[]", num)
        self.num = num

    def map(self, mem: GuestMemory) -> None:
        """Translate the ring addresses through ``mem`` (after SET_VRING_ADDR or a memory table change)."""
        if self.addresses is None or self.num == 0:
            raise VirtqueueError(self.index, "ring addresses or size not set")
        a = self.addresses
        try:
            self._desc = mem.uva_view(a.desc_user_addr, vring_desc_size(self.num))
            self._avail = mem.uva_view(a.avail_user_addr, vring_avail_size(self.num))
            self._used = mem.uva_view(a.used_user_addr, vring_used_size(self.num))
        except GuestMemoryError as e:
            self.unmap()
            raise VirtqueueError(self.index, f"ring address not in guest memory: {e}") from e
        if a.desc_user_addr % 16 or a.avail_user_addr % 2 or a.used_user_addr % 4:
            self.unmap()
            raise VirtqueueError(self.index, "misaligned ring address")
        self._avail16 = np.frombuffer(self._avail, dtype="<u2")
        self._used16 = np.frombuffer(self._used, dtype="<u2")
        self._mem = mem
        # The views hold the mapping: the addresses stay good until the next map or unmap.
        c = self.c
        c.desc = _address(self._desc)
        c.avail = _address(self._avail)
        c.used = _address(self._used)
        c.log_used = a.log_used
        c.log_used_addr = a.log_guest_addr

    def unmap(self) -> None:
        """Forget the ring mappings (memory table replaced, queue stopped)."""
        self._desc = self._avail = self._used = None
        self._avail16 = self._used16 = None
        self._mem = None
        c = self.c
        c.desc = c.avail = c.used = ffi.NULL

    @property
    def ready(self) -> bool:
        """Whether the device may process this queue now."""
        return self.started and self.enabled and self._used is not None

    # --- available ring -------------------------------------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's available index (free-running, 16 bits)."""
        assert self._avail16 is not None
        return int(self._avail16[1])

    def pending(self) -> int:
        """How many available entries the device has not consumed; more than ``num`` is a driver fault."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise VirtqueueError(
                self.index, f"available index moved {n} entries ahead of the device, beyond size {self.num}"
            )
        return n

    def pop(self, writable: bool) -> Chain:
        """Take the next available chain (``pending()`` must be > 0) and validate it completely."""
        assert self._avail16 is not None
        slot = self.last_avail_idx % self.num
        head = int(self._avail16[VRING_AVAIL_HEADER // 2 + slot])
        if head >= self.num:
            raise VirtqueueError(
                self.index, f"available ring entry {slot} names descriptor {head} >= {self.num}"
            )
        chain = self._walk(head, writable)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def unpop(self) -> None:
        """Give back the chain just popped (it did not fit); the next pop returns it again."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _walk(self, head: int, writable: bool) -> Chain:
        assert self._desc is not None and self._mem is not None
        table, size, i = self._desc, self.num, head
        in_indirect = False
        segments: list[tuple[int, int]] = []
        total = 0
        for _ in range(MAX_CHAIN_LENGTH):
            addr, length, flags, nxt = VRING_DESC.unpack_from(table, VRING_DESC.size * i)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(
                        self.index, f"indirect descriptor {i} but INDIRECT_DESC not negotiated"
                    )
                if in_indirect:
                    raise VirtqueueError(self.index, f"nested indirect table at descriptor {i}")
                if flags & VRING_DESC_F_NEXT:
                    raise VirtqueueError(self.index, f"descriptor {i} has both INDIRECT and NEXT")
                if length == 0 or length % VRING_DESC.size or length // VRING_DESC.size > MAX_CHAIN_LENGTH:
                    raise VirtqueueError(
                        self.index, f"indirect table at descriptor {i} has bad length {length}"
                    )
                table = self._translate(addr, length, f"indirect table of descriptor {i}")
                size, i, in_indirect = length // VRING_DESC.size, 0, True
                continue
            if bool(flags & VRING_DESC_F_WRITE) != writable:
                kind = "read-only" if writable else "device-writable"
                raise VirtqueueError(self.index, f"{kind} descriptor {i} in a chain that must not have one")
            if length:
                self._translate(addr, length, f"buffer of descriptor {i}")
                segments.append((addr, length))
                total += length
            if not flags & VRING_DESC_F_NEXT:
                return Chain(head, tuple(segments), total)
            if nxt >= size:
                raise VirtqueueError(self.index, f"descriptor {i} links to {nxt}, beyond the table of {size}")
            i = nxt
        raise VirtqueueError(
            self.index, f"chain from head {head} is longer than {MAX_CHAIN_LENGTH} (a loop?)"
        )

    def waiting(self) -> int:
        """Available entries not consumed yet, as vq_pending counts them (0 while not mapped; never raises:
        for ``vhostmap stats``' occupancy)."""
        return int(lib.vq_pending(self.c)) if self._avail is not None else 0

    # --- inspection ---------------------------------------------------------------------------------
    def snapshot(self, chains: int = 0) -> dict[str, Any]:
        """The queue as ``vhostmap inspect`` shows it, read-only: size and state, the device's indexes and
        the driver's (avail and used rings as they are in guest memory), flags and event indexes, and the
        first ``chains`` chains available and not taken yet, each walked with every check (nothing is
        consumed; a chain that breaks a rule shows the fault instead of its segments)."""
        out: dict[str, Any] = {
            "index": self.index,
            "layout": self.layout,
            "direction": "guest receive" if self.index % 2 == 0 else "guest transmit",
            "size": self.num,
            "started": self.started,
            "enabled": self.enabled,
            "mapped": self._avail16 is not None,
            "kick_fd": self.kick_fd is not None,
            "call_fd": self.call_fd is not None,
            "kicks_asked": self.kicks,
            "faulted": self.faulted,
            "last_avail_idx": self.last_avail_idx,
            "used_idx": self.used_idx,
        }
        avail16, used16 = self._avail16, self._used16
        if avail16 is None or used16 is None or self._desc is None or self._mem is None:
            return out
        avail_idx = int(avail16[1])
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        out |= {
            "avail_idx": avail_idx,
            "avail_flags": int(avail16[0]),
            "used_idx_in_ring": int(used16[1]),
            "used_flags": int(used16[0]),
            "pending": pending,
        }
        if self.event_idx:
            out["used_event"] = int(avail16[VRING_AVAIL_HEADER // 2 + self.num])
            out["avail_event"] = int(used16[(VRING_USED_HEADER + VRING_USED_ELEM.size * self.num) // 2])
        listed = []
        for k in range(min(chains, pending, self.num)):
            head = int(avail16[VRING_AVAIL_HEADER // 2 + (self.last_avail_idx + k) % self.num])
            entry: dict[str, Any] = {"head": head}
            try:
                if head >= self.num:
                    raise VirtqueueError(self.index, f"head {head} >= queue size {self.num}")
                chain = self._walk(head, writable=self.index % 2 == 0)
                entry |= {"length": chain.length, "segments": [list(s) for s in chain.segments]}
            except VirtqueueError as e:
                entry["fault"] = str(e)
            listed.append(entry)
        out["chains"] = listed
        return out

    # --- used ring ------------------------------------------------------------------------------------
    def read_used_idx(self) -> int:
        """used->idx as it is in guest memory (to resume after the front-end lost track)."""
        assert self._used16 is not None
        return int(self._used16[1])

    def push_used(self, head: int, length: int) -> None:
        """Queue a used entry; ``flush_used`` publishes the batch."""
        self._pending_used.append((head, length))

    def retract_used(self, n: int) -> None:
        """Forget the last ``n`` queued used entries (a frame given up on after its first chains)."""
        del self._pending_used[len(self._pending_used) - n :]

    def flush_used(self) -> int:
        """Write queued used entries, then used->idx (entries first: the driver reads idx, then entries)."""
        used, used16 = self._used, self._used16
        if not self._pending_used or used is None or used16 is None:
            return 0
        idx = self.used_idx
        for head, length in self._pending_used:
            VRING_USED_ELEM.pack_into(
                used, VRING_USED_HEADER + VRING_USED_ELEM.size * (idx % self.num), head, length
            )
            idx = (idx + 1) & 0xFFFF
        n = len(self._pending_used)
        self._pending_used.clear()
        used16[1] = idx
        self.used_idx = idx
        self._log_used(0, vring_used_size(self.num))
        return n

    def _log_used(self, offset: int, size: int) -> None:
        """Mark ``size`` bytes at ``offset`` in the used ring dirty, when logging (VHOST_F_LOG_ALL) and the
        ring asked for it (VHOST_VRING_F_LOG)."""
        if (
            self.log_dirty
            and self.addresses is not None
            and self.addresses.log_used
            and self._mem is not None
        ):
            self._mem.log_write(self.addresses.log_guest_addr + offset, size)

    # --- notifications --------------------------------------------------------------------------------
    def enable_kicks(self) -> None:
        """Ask the driver to kick on its next available entry (EVENT_IDX: avail_event, else no NO_NOTIFY).

        Without ``kicks`` ask it not to: VRING_USED_F_NO_NOTIFY, or with EVENT_IDX (where the flag means
        nothing) an avail_event left where it is, which the driver passes once per 2**16 entries.
        """
        used16 = self._used16
        if used16 is None:
            return
        written: int | None = None  # offset in the used ring of the u16 written
        if not self.kicks:
            if not self.event_idx:
                written, used16[0] = 0, VRING_USED_F_NO_NOTIFY
        elif self.event_idx:
            written = VRING_USED_HEADER + VRING_USED_ELEM.size * self.num
            used16[written // 2] = self.last_avail_idx
        else:
            written, used16[0] = 0, 0
        # Logged even when flush_used published nothing: a migration's destination must see it.
        if written is not None:
            self._log_used(written, 2)

    def needs_call(self) -> bool:
        """Whether the driver wants an interrupt for the used entries published since the last call."""
        assert self._avail16 is not None
        new, old = self.used_idx, self.signalled_used
        if self.event_idx:
            used_event = int(self._avail16[VRING_AVAIL_HEADER // 2 + self.num])
            return vring_need_event(used_event, new, old)
        if new == old:
            return False
        return not int(self._avail16[0]) & VRING_AVAIL_F_NO_INTERRUPT

    def call(self) -> bool:
        """Signal the call eventfd if the driver wants it; returns whether it was signalled."""
        if self._avail16 is None or not self.needs_call():
            self.signalled_used = self.used_idx
            return False
        self.signalled_used = self.used_idx
        return self._signal()

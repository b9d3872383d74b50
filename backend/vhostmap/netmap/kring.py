"""krings: the backend's private state of one netmap ring, and the checks every sync starts and ends with.

Follows netmap.c (netmap_ring_reinit and the sync paths) re-expressed with the
modern head/cur/tail semantics of nm_txsync_prologue / nm_rxsync_prologue / nm_sync_finalize.

The shared ring belongs to an untrusted user. The kring keeps what the backend knows for sure:

- ``nr_hwcur``: first slot not yet consumed by the backend (TX: next to send; RX: first not yet given back);
- ``nr_hwtail``: first slot the backend still owns (TX: first not yet reclaimed; RX: first not yet filled);
- ``rhead``/``rcur``/``rtail``: the last head and cur that passed validation, and the last tail published.

A sync reads head and cur once, checks them against that state (TX: head in [rhead, rtail], cur in
[head, rtail]; RX: head in [hwcur, hwtail], cur in [head, hwtail]), checks the slots it is about to take
([hwcur, head)) with the compiled batch kernel ``nm_slots_check``, and on any nonsense reinitialises the ring
(ring_reinit) instead of trusting it. After the adapter's hook has moved hwcur/hwtail, ``sync_finalize``
publishes tail. One slot always stays empty, so hwcur == hwtail only ever means "empty" (RX) and
hwtail == hwcur - 1 means "everything reclaimed" (TX).

The state lives in a C struct (``Kring.c``, datapath/kring.cdef) beside the addresses of the ring, its slots
and buffers, so that compiled syncs (a vhost-user port's, datapath/vhost_sync.cdef) run prologue, hook and
finalize in one call; this Python prologue is their reference and the slow path that explains a refusal.

The checks catch mistakes; they cannot stop a user rewriting a slot after it was checked. Hooks therefore
reach buffers only through bounds-checked views (NetmapMemory.buf_view), which makes such races harmless.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vhostmap.datapath import ffi, lib
from vhostmap.datapath.cfield import CField
from vhostmap.netmap.abi import NM_RESERVED_BUFS, NR_RX, NR_TX, RingView, nm_distance, nm_in_range, nm_prev
from vhostmap.netmap.errors import PortBroken

if TYPE_CHECKING:
    from vhostmap.netmap.capture import Tap

log = logging.getLogger(__name__)

# Sync flags passed to the adapter hooks (netmap_kern.h NAF_*).
NAF_FORCE_READ = 1  # rxsync: look for new packets even if the user did not ask
NAF_FORCE_RECLAIM = 2  # txsync: reclaim completed slots now

# Bounds of slot.len for the slots a sync takes: a TX slot must carry 1..buf_size bytes; an RX slot given back
# is about to be overwritten, so its len does not matter.
TX_MIN_LEN = 1
RX_MIN_LEN, RX_MAX_LEN = 0, 0xFFFF


def slots_check_reference(
    slots: npt.NDArray[np.void], first: int, count: int, nbufs: int, min_len: int, max_len: int
) -> int:
    """Pure-numpy reference of the nm_slots_check kernel: index (relative to ``first``) of the first of
    ``count`` slots from ``first`` (wrapping) with a reserved or out-of-range buf_idx or a len outside
    [min_len, max_len]; -1 when all are valid; -2 when first or count do not fit the ring."""
    n = len(slots)
    if first >= n or count > n:
        return -2
    s = slots[(first + np.arange(count)) % n]
    bad = (
        (s["buf_idx"] < NM_RESERVED_BUFS)
        | (s["buf_idx"] >= nbufs)
        | (s["len"] < min_len)
        | (s["len"] > max_len)
    )
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else -1


_U32 = 0xFFFF_FFFF

# Gives the slots at the given positions a usable buffer each; how many got one (NetmapMemory.restock).
Restock = Callable[[npt.NDArray[np.void], npt.NDArray[np.int64]], int]


class Kring:
    """One ring of a port as the backend sees it: the shared ``ring`` plus private, trusted state.

    ``name`` is "<port> TX<i>" / "<port> RX<i>" (host rings: "<port> host TX" / "<port> host RX").
    Counters: ``reinits`` (ring_reinit calls), ``errors`` (slots repaired by them), ``dropped`` (frames a
    hook discarded). ``users`` counts the registrations that bind this ring. ``restock`` gives the slots a
    reinit finds without a usable buffer a buffer again; without one they are left with buffer 0, as netmap
    does.
    """

    # A user can make every sync reinitialise its ring: at most one log line per ring per this many seconds,
    # the next one saying how many reinits went unlogged (all are counted in ``reinits``).
    REINIT_LOG_INTERVAL = 1.0

    # The backend's state, kept in `c` (a value outside the ring wraps to one that sync_finalize refuses).
    nr_hwcur = CField("First slot the backend has not consumed (TX: to send; RX: not given back).", mask=_U32)
    nr_hwtail = CField("First slot the backend still owns (TX: not reclaimed; RX: not filled).", mask=_U32)
    rhead = CField("The last head that passed validation.", mask=_U32)
    rcur = CField("The last cur that passed validation.", mask=_U32)
    rtail = CField("The last tail published.", mask=_U32)

    def __init__(
        self,
        ring: RingView,
        *,
        direction: int,
        ring_id: int,
        port: str,
        nbufs: int,
        buf_size: int,
        host: bool = False,
        restock: Restock | None = None,
    ) -> None:
        if direction not in (NR_TX, NR_RX):
            raise ValueError(f"direction {direction} is neither NR_TX nor NR_RX")
        self.ring = ring
        self.direction = direction
        self.ring_id = ring_id
        self.port = port
        self.host = host
        kind = "TX" if direction == NR_TX else "RX"
        self.name = f"{port} host {kind}" if host else f"{port} {kind}{ring_id}"
        self.nkr_num_slots = ring.num_slots
        self.nbufs = nbufs
        self.buf_size = buf_size
        # The state lives in a C struct the compiled syncs work on (datapath/kring.cdef), with the addresses
        # of the shared ring, its slots and buffers; `ring` keeps the mapping behind them alive.
        c = self.c = ffi.new("struct nm_kring *")
        header = ctypes.addressof(ring.header)
        c.ring = ffi.cast("uint8_t *", header)
        c.bufs.slots = ffi.cast("struct nm_slot *", ring.slots.ctypes.data)
        c.bufs.num_slots = self.nkr_num_slots
        c.bufs.buf_size = buf_size
        c.bufs.base = ffi.cast("uint8_t *", header + ring.buf_ofs)
        c.bufs.nbufs = nbufs
        c.tx = direction == NR_TX
        # The state create_if gave the shared ring: TX owns all but one slot for the user, RX is empty.
        self.nr_hwcur = 0
        self.nr_hwtail = self.nkr_num_slots - 1 if direction == NR_TX else 0
        self.rhead = self.rcur = 0
        self.rtail = self.nr_hwtail
        self.restock = restock
        self.reinits = 0
        self.errors = 0
        self._logged_at: float | None = None
        self._unlogged = 0
        self.dropped = 0
        self.users = 0
        # A live capture's tap on what the syncs move (netmap/capture.py), or None.
        self.tap: Tap | None = None

    @property
    def is_tx(self) -> bool:
        """Whether this is a TX kring."""
        return self.direction == NR_TX

    def snapshot(self) -> dict[str, Any]:
        """The kring as ``vhostmap inspect`` shows it: the ring user's head/cur/tail as it wrote them, the
        kernel side's hwcur/hwtail, and the counters."""
        header = self.ring.header
        return {
            "name": self.name,
            "slots": self.nkr_num_slots,
            "head": int(header.head),
            "cur": int(header.cur),
            "tail": int(header.tail),
            "hwcur": self.nr_hwcur,
            "hwtail": self.nr_hwtail,
            "pending": self.pending(),
            "reinits": self.reinits,
            "dropped": self.dropped,
        }

    # --- what a hook works on -------------------------------------------------------------------------------
    def pending(self) -> int:
        """Slots the user handed over and the hook has not consumed: [nr_hwcur, rhead)."""
        return nm_distance(self.nr_hwcur, self.rhead, self.nkr_num_slots)

    def rx_space(self) -> int:
        """Slots an RX hook may fill from nr_hwtail, keeping one empty: [nr_hwtail, nr_hwcur - 1)."""
        return nm_distance(self.nr_hwtail, nm_prev(self.nr_hwcur, self.nkr_num_slots), self.nkr_num_slots)

    def check_slots(self, first: int, count: int, min_len: int, max_len: int) -> int:
        """First bad slot (relative to ``first``) among ``count`` from ``first``, -1 if none (compiled)."""
        return int(
            lib.nm_slots_check(
                self.c.bufs.slots, self.nkr_num_slots, first, count, self.nbufs, min_len, max_len
            )
        )

    # --- prologues ------------------------------------------------------------------------------------------
    def user_pointers(self) -> tuple[int, int]:
        """The user's head and cur, each read once: from the shared ring here; a passthrough guest's come
        from its CSB (netmap's shadow ring in the sync-kloop: PassthroughKring)."""
        return self.ring.head, self.ring.cur

    def txsync_prologue(self) -> bool:
        """Validate what the user wrote before a txsync; False (after ring_reinit) when it is nonsense."""
        n = self.nkr_num_slots
        head, cur = self.user_pointers()  # read once: the user may change them under us
        if head >= n:
            return self._reject(f"head {head} >= num_slots {n}")
        if cur >= n:
            return self._reject(f"cur {cur} >= num_slots {n}")
        # rhead, not hwcur, bounds head from below: slots handed over but not yet sent cannot be taken back.
        if not nm_in_range(head, self.rhead, self.rtail, n):
            return self._reject(f"head {head} outside [{self.rhead}, {self.rtail}] (hwcur {self.nr_hwcur})")
        if not nm_in_range(cur, head, self.rtail, n):
            return self._reject(f"cur {cur} outside [head {head}, tail {self.rtail}]")
        self._restore_tail()
        if not self._check_taken(head, TX_MIN_LEN, self.buf_size):
            return False
        self.rhead, self.rcur = head, cur
        return True

    def rxsync_prologue(self) -> bool:
        """Validate what the user wrote before an rxsync; False (after ring_reinit) when it is nonsense."""
        n = self.nkr_num_slots
        head, cur = self.user_pointers()
        if head >= n:
            return self._reject(f"head {head} >= num_slots {n}")
        if cur >= n:
            return self._reject(f"cur {cur} >= num_slots {n}")
        if not nm_in_range(head, self.nr_hwcur, self.nr_hwtail, n):
            return self._reject(f"head {head} outside [hwcur {self.nr_hwcur}, hwtail {self.nr_hwtail}]")
        if not nm_in_range(cur, head, self.nr_hwtail, n):
            return self._reject(f"cur {cur} outside [head {head}, hwtail {self.nr_hwtail}]")
        self._restore_tail()
        if not self._check_taken(head, RX_MIN_LEN, RX_MAX_LEN):
            return False
        self.rhead, self.rcur = head, cur
        return True

    def sync_finalize(self) -> None:
        """Publish what the hook did: tail = hwtail.

        Raises PortBroken if the hook left nr_hwcur or nr_hwtail outside the ring: publishing that would
        hand the user nonsense, and only this port's hook can be at fault.
        """
        n = self.nkr_num_slots
        if not (0 <= self.nr_hwcur < n and 0 <= self.nr_hwtail < n):
            raise PortBroken(
                self.port, f"{self.name}: sync left hwcur {self.nr_hwcur} hwtail {self.nr_hwtail}"
            )
        self.rtail = self.nr_hwtail
        self.ring.tail = self.rtail

    # --- recovery -------------------------------------------------------------------------------------------
    def ring_reinit(self, reason: str) -> None:
        """Bring the shared ring back to what the kring knows (netmap_ring_reinit).

        Every slot is checked: a reserved or out-of-range buf_idx gets a usable buffer from ``restock``
        (netmap leaves buffer 0 there, and the user had to put a buffer back; a user that did not made every
        later sync of the ring fail), len 0; buffer 0 only when there is no restock or the pool is dry. A len
        above buf_size becomes 0. Then head = cur = hwcur and tail = hwtail, which also hands back to the user
        any slot it had given us and not yet consumed. Logs one line with the port, the ring and ``reason``
        (which names the offending field and value), at most one per REINIT_LOG_INTERVAL.
        """
        slots = self.ring.slots
        idx = slots["buf_idx"]
        bad_buf = (idx < NM_RESERVED_BUFS) | (idx >= self.nbufs)
        # Buffer 0 stays "no buffer" without counting as an error; anything else reserved or too big does.
        repaired = int(np.count_nonzero(bad_buf & ((idx != 0) | (slots["len"] != 0))))
        slots["buf_idx"][bad_buf] = 0
        slots["len"][bad_buf] = 0
        empty = np.flatnonzero(bad_buf)
        restocked = self.restock(slots, empty) if self.restock is not None and empty.size else 0
        bad_len = slots["len"] > self.buf_size
        repaired += int(np.count_nonzero(bad_len))
        slots["len"][bad_len] = 0
        self.ring.head = self.ring.cur = self.rhead = self.rcur = self.nr_hwcur
        self.ring.tail = self.rtail = self.nr_hwtail
        self.reinits += 1
        self.errors += repaired
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self.REINIT_LOG_INTERVAL:
            self._unlogged += 1
            return
        self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        log.warning(
            "%s: ring reinit: %s; %d slot(s) repaired, %d given a new buffer, %d left without; "
            "head=cur=%d tail=%d%s",
            self.name,
            reason,
            repaired,
            restocked,
            empty.size - restocked,
            self.nr_hwcur,
            self.nr_hwtail,
            f" ({unlogged} more reinit(s) since the last line)" if unlogged else "",
            extra={"port": self.port, "ring": self.name, "reason": reason},
        )

    def _reject(self, reason: str) -> bool:
        self.ring_reinit(reason)
        return False

    def _restore_tail(self) -> None:
        # tail is the kernel's; a user that wrote it gets it back, as netmap does, without a reinit.
        if self.ring.tail != self.rtail:
            log.debug("%s: tail overwritten (%d), restored to %d", self.name, self.ring.tail, self.rtail)
            self.ring.tail = self.rtail

    def _check_taken(self, head: int, min_len: int, max_len: int) -> bool:
        count = nm_distance(self.nr_hwcur, head, self.nkr_num_slots)
        bad = self.check_slots(self.nr_hwcur, count, min_len, max_len)
        if bad < 0:
            return True
        i = (self.nr_hwcur + bad) % self.nkr_num_slots
        s = self.ring.slots[i]
        buf_idx, length = int(s["buf_idx"]), int(s["len"])
        if buf_idx < NM_RESERVED_BUFS:
            reason = f"slot {i} buf_idx {buf_idx} is reserved"
        elif buf_idx >= self.nbufs:
            reason = f"slot {i} buf_idx {buf_idx} >= nbufs {self.nbufs}"
        else:
            reason = f"slot {i} len {length} outside {min_len}..{max_len}"
        return self._reject(reason)

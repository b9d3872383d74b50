"""A vhost-user front-end written in Python, for fast tests: the driver half of a virtio-net device.

It does what QEMU plus a guest's virtio_net driver do, in one process: guest memory in a memfd, split
virtqueues laid out in it (or packed ones, ``packed=True``: VIRTIO_F_RING_PACKED), the negotiation over a real
UNIX socket, and a driver that posts transmit and receive buffers and reads completions. It can also write
any descriptor it likes, which is how tests play a hostile guest. Real QEMU guests and dpdk-testpmd remain the
proof that vhostmap works; this is the quick one.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vhostmap.vhost_user.messages import (
    U64,
    VHOST_VRING_F_LOG,
    LogDescriptor,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
)
from vhostmap.vhost_user.protocol import FrontendConnection, Message, NeedData, Payload
from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_HEADER,
    VRING_DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_DESC_FLAGS_OFFSET,
    VRING_PACKED_EVENT,
    VRING_USED_ELEM,
    VRING_USED_HEADER,
    bit,
    vring_avail_size,
    vring_desc_size,
    vring_used_size,
)

_U16 = struct.Struct("<H")
PAGE = 4096
HUGE_PAGE = 2 << 20  # the x86-64 huge page of hugetlbfs
# Where the fake guest's memory appears in the "front-end's" virtual address space: any value works, the
# back-end only uses it to translate ring addresses.
UVA_BASE = 0x7F00_0000_0000
BUFFER_SIZE = 4096  # one guest buffer per descriptor
# What negotiate() accepts of the back-end's protocol features (QEMU's set, minus the back-end channel).
DEFAULT_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.RARP)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.NET_MTU)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS)
)
# A packed ring's descriptor flags that make it available or used, and the event suppression values the driver
# writes (spec 2.8.10: RING_EVENT_FLAGS_ENABLE, _DESC).
PACKED_AVAIL = bit(VRING_PACKED_DESC_F_AVAIL)
PACKED_USED = bit(VRING_PACKED_DESC_F_USED)
EVENT_ENABLE, EVENT_DESC = 0, 2
# SET_VRING_BASE of a new packed ring, as QEMU sends it: positions 0, both wrap counters 1 (bits 15 and 31).
PACKED_START = 1 << 15 | 1 << 31
# What a FakeFrontend asks for unless told otherwise.
DEFAULT_FEATURES = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
)
DRIVER_OK_STATUS = (
    VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
)


@dataclass
class FakeQueue:
    """Driver-side state of one virtqueue in the fake guest memory.

    A packed ring has the descriptor ring at ``desc``, the driver area at ``avail`` and the device area at
    ``used``; ``next_desc`` is the ring position the driver fills next and ``last_used`` the one it reads
    used descriptors at, each with its wrap counter (``avail_wrap``, ``used_wrap``). A chain's buffer id is
    the position of its first descriptor (unique while it is in flight), and ``chains`` keeps each id's
    segments, as a driver keeps them beside the ring (the device overwrites the descriptors).
    """

    index: int
    num: int
    desc: int  # guest-physical offsets of the three parts
    avail: int
    used: int
    buffers: int
    kick: int
    call: int
    err: int
    avail_idx: int = 0
    last_used: int = 0
    in_flight: int = 0
    next_desc: int = 0  # descriptors are handed out in order, free-running (completions come in order)
    base: int = 0  # where the device resumes: 0, or what GET_VRING_BASE returned when the ring stopped
    packed: bool = False
    avail_wrap: int = 1
    used_wrap: int = 1
    chains: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    heads: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (position, flags) to publish

    def reset(self) -> None:
        """The driver's state of a new ring: nothing in flight, every position and wrap counter at start."""
        self.avail_idx = self.last_used = self.in_flight = self.next_desc = 0
        self.avail_wrap = self.used_wrap = 1
        self.base = PACKED_START if self.packed else 0
        self.chains.clear()
        self.heads.clear()


class FakeFrontend:
    """Connects to a back-end's socket and drives a virtio-net device through it."""

    def __init__(
        self,
        path: str,
        queue_pairs: int = 1,
        queue_size: int = 256,
        features: int = DEFAULT_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        hugepages: bool = False,
        packed: bool = False,
    ) -> None:
        """``hugepages``: the guest memory is a hugetlbfs memfd, as QEMU's with a memory-backend-file on
        /dev/hugepages (its size whole huge pages). ``packed``: ask for packed virtqueues (the back-end must
        offer VIRTIO_F_RING_PACKED: negotiate checks)."""
        self.path = path
        self.queue_pairs = queue_pairs
        self.num = queue_size
        self.packed = packed
        self.wanted_features = features | (bit(VIRTIO_F_RING_PACKED) if packed else 0)
        self.wanted_protocol_features = protocol_features
        nq = 2 * queue_pairs
        ring_bytes = _round(vring_desc_size(queue_size) + vring_avail_size(queue_size), PAGE) + _round(
            vring_used_size(queue_size), PAGE
        )
        self.mem_size = _round(
            nq * (ring_bytes + queue_size * BUFFER_SIZE) + 64 * PAGE, HUGE_PAGE if hugepages else 1 << 20
        )
        self.memfd = os.memfd_create("fake-guest", os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugepages else 0))
        os.ftruncate(self.memfd, self.mem_size)
        self.mem = mmap.mmap(self.memfd, self.mem_size)
        self.queues: list[FakeQueue] = []
        off = 0
        for q in range(nq):
            desc = off
            avail = desc + vring_desc_size(queue_size)
            used = _round(avail + vring_avail_size(queue_size), PAGE)
            off = _round(used + vring_used_size(queue_size), PAGE)
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            fq = FakeQueue(q, queue_size, desc, avail, used, 0, kick, call, err, packed=packed)
            fq.reset()
            self.queues.append(fq)
        for fq in self.queues:
            fq.buffers = off
            off += queue_size * BUFFER_SIZE
        self.scratch = off  # free guest memory for tests (indirect tables, odd buffers)
        self.sock: socket.socket | None = None
        self.conn = FrontendConnection()
        self.features = 0
        self.protocol_features = 0
        self.rx_errors = 0
        self.log_fd = -1  # the dirty log's memfd (set_log_base), kept so a test can shrink it

    # --- connection -------------------------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the back-end's socket, retrying until it listens."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                select.select([], [], [], 0.05)  # back off while the back-end starts
        sock.settimeout(timeout)
        self.sock = sock

    def accept_from(self, listener: socket.socket, timeout: float = 10.0) -> None:
        """Client mode: wait for the back-end to connect to ``listener`` (as QEMU's ``server=on``)."""
        ready, _, _ = select.select([listener], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no back-end connected to {listener.getsockname()} in {timeout} s")
        sock, _ = listener.accept()
        sock.settimeout(timeout)
        self.sock = sock

    def send(
        self,
        req: Request,
        payload: Payload | None = None,
        fds: tuple[int, ...] = (),
        need_reply: bool = False,
    ) -> None:
        """Send one request (fds ride on the same sendmsg, as QEMU does)."""
        assert self.sock is not None
        data = (
            self.conn.request(req, payload, need_reply=need_reply)
            if payload is not None
            else self.conn.request(req, need_reply=need_reply)
        )
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send arbitrary bytes (malformed messages included)."""
        assert self.sock is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv_reply(self) -> Message:
        """Wait for the back-end's next reply."""
        assert self.sock is not None
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("back-end closed the connection")
            self.conn.receive_data(data)

    def call(self, req: Request, payload: Payload | None = None, fds: tuple[int, ...] = ()) -> Message:
        """A request that always has a reply (GET_*)."""
        self.send(req, payload, fds)
        return self.recv_reply()

    def checked(self, req: Request, payload: Payload | None = None, fds: tuple[int, ...] = ()) -> bool:
        """Send with NEED_REPLY (REPLY_ACK) and return whether the back-end accepted it."""
        self.send(req, payload, fds, need_reply=True)
        reply = self.recv_reply()
        assert isinstance(reply.payload, U64)
        return reply.payload.value == 0

    def has_protocol_feature(self, f: ProtocolFeature) -> bool:
        """Whether protocol feature ``f`` was negotiated."""
        return bool(self.protocol_features & bit(f))

    def sync(self, req: Request, payload: Payload | None = None, fds: tuple[int, ...] = ()) -> None:
        """Send a request and wait until the back-end processed it: a REPLY_ACK if negotiated, else a
        GET_FEATURES round trip (QEMU's barrier). Asserts that the back-end accepted it."""
        if self.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            assert self.checked(req, payload, fds), f"back-end refused {req.name}"
        else:
            self.send(req, payload, fds)
            self.call(Request.GET_FEATURES)

    def memory_regions(self, count: int) -> list[MemoryRegion]:
        """The fake guest memory cut into ``count`` page-aligned regions (the last takes the rest)."""
        size = self.mem_size // count // PAGE * PAGE
        assert size > 0
        return [
            MemoryRegion(
                k * size, size if k < count - 1 else self.mem_size - k * size, UVA_BASE + k * size, k * size
            )
            for k in range(count)
        ]

    def negotiate(self, mem_regions: int = 0) -> None:
        """The QEMU-like start sequence: features, memory table, every ring started and enabled.

        ``mem_regions`` > 0 sends the memory as that many ADD_MEM_REG regions (CONFIGURE_MEM_SLOTS) instead
        of one SET_MEM_TABLE region.
        """
        offered = self.call(Request.GET_FEATURES).payload
        assert isinstance(offered, U64)
        self.send(Request.SET_OWNER)
        self.features = offered.value & (self.wanted_features | bit(VHOST_USER_F_PROTOCOL_FEATURES))
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            proto = self.call(Request.GET_PROTOCOL_FEATURES).payload
            assert isinstance(proto, U64)
            self.protocol_features = proto.value & self.wanted_protocol_features
            self.send(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features))
        if self.packed and not self.features & bit(VIRTIO_F_RING_PACKED):
            raise ConnectionError("the back-end does not offer packed virtqueues (VIRTIO_F_RING_PACKED)")
        self.send(Request.SET_FEATURES, U64(self.features))
        if mem_regions:
            assert self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
            for region in self.memory_regions(mem_regions):
                self.sync(Request.ADD_MEM_REG, SingleMemoryRegion(region), (self.memfd,))
        else:
            table = MemoryTable((MemoryRegion(0, self.mem_size, UVA_BASE, 0),))
            self.sync(Request.SET_MEM_TABLE, table, (self.memfd,))
        for fq in self.queues:
            self.start_queue(fq)
        if self.has_protocol_feature(ProtocolFeature.STATUS):
            self.sync(Request.SET_STATUS, U64(DRIVER_OK_STATUS))

    def start_queue(self, fq: FakeQueue) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR and enable, as QEMU starts a ring."""
        self.send(Request.SET_VRING_NUM, VringState(fq.index, fq.num))
        self.send(Request.SET_VRING_BASE, VringState(fq.index, fq.base))
        # QEMU always names the used ring's guest address (a packed ring's device area), and flags it for
        # logging while LOG_ALL is on. A packed ring's driver and device areas ride in avail and used.
        log_flags = 1 << VHOST_VRING_F_LOG if self.features & bit(VHOST_F_LOG_ALL) else 0
        self.send(
            Request.SET_VRING_ADDR,
            VringAddr(
                fq.index, log_flags, UVA_BASE + fq.desc, UVA_BASE + fq.used, UVA_BASE + fq.avail, fq.used
            ),
        )
        self.send(Request.SET_VRING_KICK, VringFile(fq.index, False), (fq.kick,))
        self.send(Request.SET_VRING_CALL, VringFile(fq.index, False), (fq.call,))
        self.send(Request.SET_VRING_ERR, VringFile(fq.index, False), (fq.err,))
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self.sync(Request.SET_VRING_ENABLE, VringState(fq.index, 1))
        else:
            self.call(Request.GET_FEATURES)  # rings start enabled; wait until this one runs

    def stop_queue(self, fq: FakeQueue) -> int:
        """GET_VRING_BASE: stop the ring; returns the back-end's next available index."""
        reply = self.call(Request.GET_VRING_BASE, VringState(fq.index, 0)).payload
        assert isinstance(reply, VringState) and reply.index == fq.index
        fq.base = reply.num
        return reply.num

    def get_status(self) -> int:
        """GET_STATUS (needs the STATUS protocol feature)."""
        reply = self.call(Request.GET_STATUS).payload
        assert isinstance(reply, U64)
        return reply.value

    def restart(self, status_first: bool = False, between: Callable[[], None] | None = None) -> None:
        """Reset the device as a guest driver does after an error: stop every ring (GET_VRING_BASE),
        SET_STATUS 0, then start fresh empty rings (indexes back to 0) and set DRIVER_OK again.

        ``status_first`` sends SET_STATUS 0 before stopping the rings, as QEMU before 8.1 does;
        ``between`` runs right after SET_STATUS 0 (tests use it to make traffic at that moment).
        """
        if status_first:
            self.sync(Request.SET_STATUS, U64(0))
            if between is not None:
                between()
        for fq in self.queues:
            self.stop_queue(fq)
        if not status_first:
            self.sync(Request.SET_STATUS, U64(0))
            if between is not None:
                between()
        for fq in self.queues:
            end = _round(fq.used + vring_used_size(fq.num), PAGE)
            self.mem[fq.desc : end] = bytes(end - fq.desc)
            fq.reset()
            self.start_queue(fq)
        self.sync(Request.SET_STATUS, U64(DRIVER_OK_STATUS))

    def set_log_base(self, size: int | None = None) -> mmap.mmap:
        """SET_LOG_BASE with a fresh shared bitmap covering the guest memory; returns the bitmap."""
        size = size or _round(self.mem_size // PAGE // 8, 8)
        fd = os.memfd_create("fake-dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            bitmap = mmap.mmap(fd, size)
            reply = self.call(Request.SET_LOG_BASE, LogDescriptor(size, 0), (fd,)).payload
        except BaseException:
            os.close(fd)
            raise
        if self.log_fd >= 0:
            os.close(self.log_fd)
        self.log_fd = fd
        assert isinstance(reply, U64) and reply.value == 0
        return bitmap

    # --- a front-end that takes its memory back -----------------------------------------------------------
    def shrink_memory(self, size: int = 0) -> None:
        """Truncate the guest memory memfd to ``size`` bytes after the back-end mapped it, as a careless
        DPDK application or a hugetlbfs-backed guest can (its file is not sealed against shrinking): every
        page of it past ``size`` is gone for the back-end and for this front-end alike, so the caller must
        not touch the rings or buffers there again (``close`` is fine)."""
        os.ftruncate(self.memfd, size)

    def shrink_log(self, size: int = 0) -> None:
        """Truncate the dirty log's memfd (``set_log_base``) to ``size`` bytes: the bitmap it returned is
        gone past ``size`` too."""
        assert self.log_fd >= 0, "no dirty log (set_log_base)"
        os.ftruncate(self.log_fd, size)

    def close(self) -> None:
        """Disconnect and free everything (idempotent)."""
        if self.memfd < 0:
            return
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fq in self.queues:
            os.close(fq.kick)
            os.close(fq.call)
            os.close(fq.err)
        self.queues = []
        self.mem.close()
        os.close(self.memfd)
        self.memfd = -1
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1

    def __enter__(self) -> FakeFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- driver: rings ----------------------------------------------------------------------------------
    @property
    def hdr_len(self) -> int:
        """The virtio-net header size in use (12 with VERSION_1)."""
        return VIRTIO_NET_HDR.size if self.features & bit(VIRTIO_F_VERSION_1) else 10

    def write_desc(self, fq: FakeQueue, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write descriptor ``i`` of ``fq`` (any values: hostile tests use this directly)."""
        VRING_DESC.pack_into(self.mem, fq.desc + VRING_DESC.size * i, addr, length, flags, nxt)

    def write_packed_desc(
        self, fq: FakeQueue, pos: int, addr: int, length: int, buffer_id: int, flags: int
    ) -> None:
        """Write descriptor ``pos`` of packed ring ``fq``, flags last (any values: hostile tests use this)."""
        off = fq.desc + VRING_PACKED_DESC.size * pos
        VRING_PACKED_DESC.pack_into(self.mem, off, addr, length, buffer_id, 0)
        _U16.pack_into(self.mem, off + VRING_PACKED_DESC_FLAGS_OFFSET, flags)

    def packed_flags(self, wrap: int) -> int:
        """The AVAIL/USED bits that make a descriptor available under driver wrap counter ``wrap``."""
        return PACKED_AVAIL if wrap else PACKED_USED

    def publish(self, fq: FakeQueue, heads: list[int], kick: bool = True) -> None:
        """Put ``heads`` in the available ring, move avail->idx, and kick (a packed ring: write each head's
        flags, which makes its chain available)."""
        if fq.packed:
            for head in heads:
                pos, flags = fq.heads.pop(head)
                _U16.pack_into(
                    self.mem, fq.desc + VRING_PACKED_DESC.size * pos + VRING_PACKED_DESC_FLAGS_OFFSET, flags
                )
            fq.in_flight += len(heads)
            if kick:
                os.eventfd_write(fq.kick, 1)
            return
        for head in heads:
            _U16.pack_into(self.mem, fq.avail + VRING_AVAIL_HEADER + 2 * (fq.avail_idx % fq.num), head)
            fq.avail_idx = (fq.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self.mem, fq.avail + 2, fq.avail_idx)
        fq.in_flight += len(heads)
        if kick:
            os.eventfd_write(fq.kick, 1)

    def buffer(self, fq: FakeQueue, i: int) -> int:
        """Guest-physical address of the buffer that belongs to descriptor ``i``."""
        return fq.buffers + i * BUFFER_SIZE

    def _chain(self, fq: FakeQueue, sizes: list[int], flags: int) -> int:
        """Write a chain of descriptors of ``sizes`` bytes (each on its own buffer); returns its head (a
        packed ring's: its buffer id, whose flags ``publish`` writes)."""
        assert fq.in_flight + len(sizes) <= fq.num, "descriptors still in flight would be overwritten"
        if fq.packed:
            return self._packed_chain(fq, sizes, flags)
        ids = [(fq.next_desc + k) % fq.num for k in range(len(sizes))]
        fq.next_desc = (fq.next_desc + len(sizes)) & 0xFFFF
        for k, (i, size) in enumerate(zip(ids, sizes, strict=True)):
            assert size <= BUFFER_SIZE
            more = k + 1 < len(ids)
            self.write_desc(
                fq,
                i,
                self.buffer(fq, i),
                size,
                flags | (VRING_DESC_F_NEXT if more else 0),
                ids[k + 1] if more else 0,
            )
        return ids[0]

    def _packed_chain(self, fq: FakeQueue, sizes: list[int], flags: int) -> int:
        """A chain in consecutive positions of packed ring ``fq``, every descriptor but the head made
        available already; the head's flags wait for ``publish``."""
        buffer_id = fq.next_desc
        segments = []
        for k, size in enumerate(sizes):
            assert size <= BUFFER_SIZE
            pos = fq.next_desc
            more = VRING_DESC_F_NEXT if k + 1 < len(sizes) else 0
            desc_flags = flags | more | self.packed_flags(fq.avail_wrap)
            segments.append((self.buffer(fq, pos), size))
            if k == 0:
                fq.heads[buffer_id] = (pos, desc_flags)
                desc_flags = 0  # not available until published
            self.write_packed_desc(fq, pos, self.buffer(fq, pos), size, buffer_id, desc_flags)
            fq.next_desc += 1
            if fq.next_desc == fq.num:
                fq.next_desc, fq.avail_wrap = 0, fq.avail_wrap ^ 1
        fq.chains[buffer_id] = segments
        return buffer_id

    def chain_segments(self, fq: FakeQueue, head: int) -> list[tuple[int, int]]:
        """(address, length) of each descriptor of the chain at ``head`` (as this driver wrote it)."""
        if fq.packed:
            return fq.chains[head]
        out = []
        i = head
        while True:
            addr, length, flags, nxt = VRING_DESC.unpack_from(self.mem, fq.desc + VRING_DESC.size * i)
            out.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return out
            i = nxt

    def transmit(
        self,
        frames: list[bytes],
        pair: int = 0,
        *,
        header: bytes = b"",
        first: int = BUFFER_SIZE,
    ) -> None:
        """Queue ``frames`` on the transmit queue of ``pair``, each after a virtio-net header (``header``,
        zero-padded to the negotiated size: an offload request); a frame larger than one buffer becomes a
        chain of BUFFER_SIZE descriptors, the first ``first`` bytes long (a header split over descriptors)."""
        fq = self.queues[2 * pair + 1]
        heads: list[int] = []
        for frame in frames:
            data = header.ljust(self.hdr_len, b"\0")[: self.hdr_len] + frame
            sizes = [min(first, len(data))]
            sizes += [min(BUFFER_SIZE, len(data) - off) for off in range(sizes[0], len(data), BUFFER_SIZE)]
            head = self._chain(fq, sizes, 0)
            off = 0
            for addr, length in self.chain_segments(fq, head):
                self.mem[addr : addr + length] = data[off : off + length]
                off += length
            heads.append(head)
            fq.in_flight += len(sizes) - 1  # publish() counts one per head
        self.publish(fq, heads)

    def post_receive_buffers(self, n: int, pair: int = 0, size: int = BUFFER_SIZE, chain: int = 1) -> None:
        """Give the device ``n`` writable buffers on the receive queue of ``pair``, each a chain of ``chain``
        descriptors of ``size`` bytes."""
        fq = self.queues[2 * pair]
        heads = []
        for _ in range(n):
            heads.append(self._chain(fq, [size] * chain, VRING_DESC_F_WRITE))
            fq.in_flight += chain - 1
        self.publish(fq, heads)

    def used(self, fq: FakeQueue) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call."""
        if fq.packed:
            return self._packed_used(fq)
        idx = _U16.unpack_from(self.mem, fq.used + 2)[0]
        out = []
        while fq.last_used != idx:
            head, length = VRING_USED_ELEM.unpack_from(
                self.mem, fq.used + VRING_USED_HEADER + VRING_USED_ELEM.size * (fq.last_used % fq.num)
            )
            out.append((head, length))
            fq.last_used = (fq.last_used + 1) & 0xFFFF
            fq.in_flight -= len(self.chain_segments(fq, head))
        return out

    def _packed_used(self, fq: FakeQueue) -> list[tuple[int, int]]:
        """The used descriptors from ``last_used``: AVAIL and USED both equal to the driver's used wrap
        counter; each moves past the descriptors of the chain its id names, and with VIRTIO_F_IN_ORDER past
        every chain before it too (spec 2.8.8: one used descriptor may stand for a batch; a chain's id is its
        first position, so the chains skipped are found in the ring)."""
        out: list[tuple[int, int]] = []
        while True:
            _, length, buffer_id, flags = VRING_PACKED_DESC.unpack_from(
                self.mem, fq.desc + VRING_PACKED_DESC.size * fq.last_used
            )
            if bool(flags & PACKED_AVAIL) != bool(fq.used_wrap) or bool(flags & PACKED_USED) != bool(
                fq.used_wrap
            ):
                return out
            in_order = bool(self.features & bit(VIRTIO_F_IN_ORDER))
            while True:
                head = fq.last_used if in_order else buffer_id
                out.append((head, length if head == buffer_id else 0))
                ndesc = len(fq.chains[head])
                fq.in_flight -= ndesc
                fq.last_used += ndesc
                if fq.last_used >= fq.num:
                    fq.last_used, fq.used_wrap = fq.last_used - fq.num, fq.used_wrap ^ 1
                if head == buffer_id:
                    break

    def enable_calls(self, fq: FakeQueue) -> None:
        """Ask for an interrupt on the next used entry (EVENT_IDX: used_event = last seen, as Linux does; a
        packed ring: the driver area names that descriptor and its wrap counter, else enables them all)."""
        if fq.packed:
            event = self.features & bit(VIRTIO_RING_F_EVENT_IDX)
            VRING_PACKED_EVENT.pack_into(
                self.mem, fq.avail, fq.last_used | fq.used_wrap << 15, EVENT_DESC if event else EVENT_ENABLE
            )
            return
        if self.features & bit(VIRTIO_RING_F_EVENT_IDX):
            _U16.pack_into(self.mem, fq.avail + VRING_AVAIL_HEADER + 2 * fq.num, fq.last_used)

    def wait_used(self, fq: FakeQueue, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Collect ``count`` used entries, sleeping on the call eventfd; TimeoutError if they do not come."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.used(fq)
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {fq.index}: {len(got)} of {count} used entries")
            self.enable_calls(fq)
            got += self.used(fq)  # entries that came before used_event was written raise no interrupt
            if len(got) >= count:
                break
            ready, _, _ = select.select([fq.call], [], [], min(left, 0.1))
            if ready:
                os.eventfd_read(fq.call)
        return got

    def read_chain(self, fq: FakeQueue, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into the chain at ``head``."""
        parts = []
        for addr, seg_len in self.chain_segments(fq, head):
            n = min(seg_len, length)
            parts.append(self.mem[addr : addr + n])
            length -= n
        assert length == 0, "used length beyond the chain"
        return b"".join(parts)

    def receive(self, count: int, pair: int = 0, timeout: float = 5.0) -> list[bytes]:
        """Wait for ``count`` frames on the receive queue of ``pair``; headers stripped, merges joined.

        A buffer returned with less than a header (the device dropped a frame that did not fit) is
        skipped and counted in ``rx_errors``, as Linux's virtio_net counts rx_length_errors.
        """
        return [frame for _, frame in self.receive_with_headers(count, pair, timeout)]

    def receive_with_headers(
        self, count: int, pair: int = 0, timeout: float = 5.0
    ) -> list[tuple[tuple[int, ...], bytes]]:
        """`receive`, each frame with the fields of its virtio-net header (VIRTIO_NET_HDR, num_buffers
        last)."""
        fq = self.queues[2 * pair]
        frames: list[tuple[tuple[int, ...], bytes]] = []
        pending: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            pending += self.wait_used(fq, 1, max(deadline - time.monotonic(), 0.01))
            while pending:
                head, first_len = pending[0]
                if first_len < self.hdr_len:
                    self.rx_errors += 1
                    del pending[0]
                    continue
                hdr = VIRTIO_NET_HDR.unpack(
                    self.read_chain(fq, head, self.hdr_len).ljust(VIRTIO_NET_HDR.size)
                )
                nbuf = hdr[6] if self.features & bit(VIRTIO_NET_F_MRG_RXBUF) else 1
                if len(pending) < nbuf:
                    pending += self.wait_used(fq, nbuf - len(pending), max(deadline - time.monotonic(), 0.01))
                    continue
                parts = pending[:nbuf]
                del pending[:nbuf]
                data = b"".join(self.read_chain(fq, h, n) for h, n in parts)
                frames.append((hdr, data[self.hdr_len :]))
        return frames


def _round(n: int, align: int) -> int:
    return (n + align - 1) // align * align

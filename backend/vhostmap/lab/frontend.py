"""A vhost-user front-end written in Python, for fast tests: the driver half of a virtio-net device.

It does what QEMU plus a guest's virtio_net driver do, in one process: guest memory in a memfd, split
virtqueues laid out in it, the negotiation over a real UNIX socket, and a driver that posts transmit and
receive buffers and reads completions. It can also write any descriptor it likes, which is how tests play a
hostile guest. Real QEMU guests and dpdk-testpmd remain the proof that vhostmap works; this is the quick one.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from vhostmap.vhost_user.messages import (
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
)
from vhostmap.vhost_user.protocol import FrontendConnection, Message, NeedData, Payload
from vhostmap.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_HEADER,
    VRING_DESC,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    VRING_USED_HEADER,
    bit,
    vring_avail_size,
    vring_desc_size,
    vring_used_size,
)

_U16 = struct.Struct("<H")
PAGE = 4096
# Where the fake guest's memory appears in the "front-end's" virtual address space: any value works, the
# back-end only uses it to translate ring addresses.
UVA_BASE = 0x7F00_0000_0000
BUFFER_SIZE = 4096  # one guest buffer per descriptor


@dataclass
class FakeQueue:
    """Driver-side state of one split virtqueue in the fake guest memory."""

    index: int
    num: int
    desc: int  # guest-physical offsets of the three parts
    avail: int
    used: int
    buffers: int
    kick: int
    call: int
    avail_idx: int = 0
    last_used: int = 0
    in_flight: int = 0


class FakeFrontend:
    """Connects to a back-end's socket and drives a virtio-net device through it."""

    def __init__(
        self,
        path: str,
        queue_pairs: int = 1,
        queue_size: int = 256,
        features: int = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC),
    ) -> None:
        self.path = path
        self.queue_pairs = queue_pairs
        self.num = queue_size
        self.wanted_features = features
        nq = 2 * queue_pairs
        ring_bytes = _round(vring_desc_size(queue_size) + vring_avail_size(queue_size), PAGE) + _round(
            vring_used_size(queue_size), PAGE
        )
        self.mem_size = _round(nq * (ring_bytes + queue_size * BUFFER_SIZE) + 64 * PAGE, 1 << 20)
        self.memfd = os.memfd_create("fake-guest", os.MFD_CLOEXEC)
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
            self.queues.append(FakeQueue(q, queue_size, desc, avail, used, 0, kick, call))
        for fq in self.queues:
            fq.buffers = off
            off += queue_size * BUFFER_SIZE
        self.scratch = off  # free guest memory for tests (indirect tables, odd buffers)
        self.sock: socket.socket | None = None
        self.conn = FrontendConnection()
        self.features = 0
        self.protocol_features = 0

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

    def negotiate(self) -> None:
        """The QEMU-like start sequence: features, memory table, every ring started and enabled."""
        offered = self.call(Request.GET_FEATURES).payload
        assert isinstance(offered, U64)
        self.send(Request.SET_OWNER)
        self.features = offered.value & (self.wanted_features | bit(VHOST_USER_F_PROTOCOL_FEATURES))
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            proto = self.call(Request.GET_PROTOCOL_FEATURES).payload
            assert isinstance(proto, U64)
            self.protocol_features = proto.value & (
                bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG)
            )
            self.send(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features))
        self.send(Request.SET_FEATURES, U64(self.features))
        table = MemoryTable((MemoryRegion(0, self.mem_size, UVA_BASE, 0),))
        assert self.checked(Request.SET_MEM_TABLE, table, (self.memfd,))
        for fq in self.queues:
            self.start_queue(fq)

    def start_queue(self, fq: FakeQueue) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL and enable, as QEMU starts a ring."""
        self.send(Request.SET_VRING_NUM, VringState(fq.index, fq.num))
        self.send(Request.SET_VRING_BASE, VringState(fq.index, fq.avail_idx))
        self.send(
            Request.SET_VRING_ADDR,
            VringAddr(fq.index, 0, UVA_BASE + fq.desc, UVA_BASE + fq.used, UVA_BASE + fq.avail, 0),
        )
        self.send(Request.SET_VRING_KICK, VringFile(fq.index, False), (fq.kick,))
        self.send(Request.SET_VRING_CALL, VringFile(fq.index, False), (fq.call,))
        assert self.checked(Request.SET_VRING_ENABLE, VringState(fq.index, 1))

    def close(self) -> None:
        """Disconnect and free everything."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fq in self.queues:
            os.close(fq.kick)
            os.close(fq.call)
        self.queues = []
        self.mem.close()
        os.close(self.memfd)

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

    def publish(self, fq: FakeQueue, heads: list[int], kick: bool = True) -> None:
        """Put ``heads`` in the available ring, move avail->idx, and kick."""
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

    def transmit(self, frames: list[bytes], pair: int = 0) -> None:
        """Queue ``frames`` on the transmit queue of ``pair`` (one descriptor each, header included)."""
        fq = self.queues[2 * pair + 1]
        heads: list[int] = []
        for frame in frames:
            i = fq.avail_idx % fq.num if not heads else (heads[-1] + 1) % fq.num
            data = bytes(self.hdr_len) + frame
            assert len(data) <= BUFFER_SIZE
            self.mem[self.buffer(fq, i) : self.buffer(fq, i) + len(data)] = data
            self.write_desc(fq, i, self.buffer(fq, i), len(data), 0)
            heads.append(i)
        self.publish(fq, heads)

    def post_receive_buffers(self, n: int, pair: int = 0, size: int = BUFFER_SIZE) -> None:
        """Give the device ``n`` writable buffers on the receive queue of ``pair``."""
        fq = self.queues[2 * pair]
        heads = []
        for k in range(n):
            i = (fq.avail_idx + k) % fq.num
            self.write_desc(fq, i, self.buffer(fq, i), size, VRING_DESC_F_WRITE)
            heads.append(i)
        self.publish(fq, heads)

    def used(self, fq: FakeQueue) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call."""
        idx = _U16.unpack_from(self.mem, fq.used + 2)[0]
        out = []
        while fq.last_used != idx:
            out.append(
                VRING_USED_ELEM.unpack_from(
                    self.mem, fq.used + VRING_USED_HEADER + VRING_USED_ELEM.size * (fq.last_used % fq.num)
                )
            )
            fq.last_used = (fq.last_used + 1) & 0xFFFF
        fq.in_flight -= len(out)
        return out

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
            ready, _, _ = select.select([fq.call], [], [], min(left, 0.1))
            if ready:
                os.eventfd_read(fq.call)
        return got

    def receive(self, count: int, pair: int = 0, timeout: float = 5.0) -> list[bytes]:
        """Wait for ``count`` frames on the receive queue of ``pair``; headers stripped, merges joined."""
        fq = self.queues[2 * pair]
        frames: list[bytes] = []
        pending: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            pending += self.wait_used(fq, 1, max(deadline - time.monotonic(), 0.01))
            while pending:
                head = pending[0][0]
                hdr = VIRTIO_NET_HDR.unpack_from(self.mem, self.buffer(fq, head))
                nbuf = hdr[6] if self.features & bit(VIRTIO_NET_F_MRG_RXBUF) else 1
                if len(pending) < nbuf:
                    pending += self.wait_used(fq, nbuf - len(pending), max(deadline - time.monotonic(), 0.01))
                    continue
                parts = pending[:nbuf]
                del pending[:nbuf]
                data = b"".join(self.mem[self.buffer(fq, h) : self.buffer(fq, h) + n] for h, n in parts)
                frames.append(data[self.hdr_len :])
        return frames


def _round(n: int, align: int) -> int:
    return (n + align - 1) // align * align

"""Fuzz target `protocol`: the sans-IO vhost-user parser and the device state machine under any front-end.

The input decodes (structure-aware, through atheris's FuzzedDataProvider) into a sequence of messages: a
request code (mostly a known one), header flags, a payload (mostly shaped like the request's own layout with
values near the interesting ones: ring indexes, sizes, addresses inside the memory the messages map; sometimes
raw bytes of any length) and the fds attached to it, real ones of several kinds (eventfds, memfds of several
sizes, /dev/null, either end of a pipe). The bytes reach ``BackendConnection`` in one chunk or split, as a
socket may deliver them, and every message it yields goes to ``VhostUserNetDevice.handle`` as the server
dispatches it (vhost_user/server.py).

Invariants checked on every input:
- only the typed errors of the layer escape (ProtocolError from the parser, DeviceError from the device);
- the device's state stays legal after every message (see ``check_device``);
- no fd is leaked and no guest memory stays mapped once the connection and the device are closed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import sys
from collections.abc import Callable

import atheris

# Coverage of the project only (instrumenting everything loaded costs seconds per start and guides nothing).
with atheris.instrument_imports(include=["vhostmap"]):
    from vhostmap.vhost_user.device import (
        MAX_QUEUE_PAIRS,
        OFFERED_FEATURES,
        OFFERED_PROTOCOL_FEATURES,
        DeviceError,
        NetConfig,
        VhostUserNetDevice,
    )
    from vhostmap.vhost_user.errors import ProtocolError
    from vhostmap.vhost_user.messages import (
        VHOST_USER_NEED_REPLY_MASK,
        VHOST_USER_VERSION,
        Request,
    )
    from vhostmap.vhost_user.protocol import BackendConnection, Message, NeedData


# Guest memory the messages describe: regions at these guest-physical and front-end virtual addresses, so
# that ring addresses drawn near them land inside (or just outside) what was mapped.
GPAS = (0, 0x10000, 0x100000)
UVAS = (0x7F0000000000, 0x7F0000100000, 0x7F0000200000)
MEMFD_SIZES = (0, 4096, 0x10000, 0x20000)
FD_KINDS = ("eventfd", "memfd", "devnull", "pipe_r", "pipe_w")


class Listener:
    """The port's side of the device (DeviceListener): nothing to do here."""

    def queues_changed(self) -> None:
        pass

    def announce(self, mac: bytes) -> None:
        pass


class Fds:
    """Every fd the harness made: those it gives away become the parser's, the rest stay ours to close."""

    def __init__(self) -> None:
        self.ours: list[int] = []

    def make(self, kind: str, size: int) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if kind == "memfd":
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            return fd
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        given, kept = (r, w) if kind == "pipe_r" else (w, r)
        self.ours.append(kept)
        return given

    def close(self) -> None:
        for fd in self.ours:
            os.close(fd)
        self.ours = []


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def mapped_memfds() -> int:
    """How many mappings of memfds this harness made are in the address space."""
    with open("/proc/self/maps") as maps:
        return sum("/memfd:fuzz" in line for line in maps)


class Decoder:
    """Turns the fuzz input into messages; every method consumes input and never fails."""

    def __init__(self, data: bytes) -> None:
        self.fdp = atheris.FuzzedDataProvider(data)

    def int(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def pick(self, options: tuple[int, ...]) -> int:
        return options[self.int(0, len(options) - 1)]

    def u64(self) -> int:
        return int(self.fdp.ConsumeIntInRange(0, 2**64 - 1))

    def near(self, bases: tuple[int, ...]) -> int:
        """An address close to one of ``bases`` (aligned or not), or any 64-bit value."""
        if self.int(0, 15) == 0:
            return self.u64()
        return (self.pick(bases) + self.int(0, 0x21000) - (0x20 if self.int(0, 7) == 0 else 0)) % 2**64

    def region(self) -> bytes:
        size = self.pick((0, 0x1000, 0x10000, 0x20000, 0x100000)) if self.int(0, 7) else self.u64()
        return struct.pack(
            "=QQQQ", self.near(GPAS), size, self.near(UVAS), self.pick((0, 0x1000, 0x10000, 0x123))
        )

    def vring_index(self) -> int:
        return self.int(0, 4) if self.int(0, 7) else self.int(0, 0xFFFF_FFFF)

    def payload(self, request: Request | None) -> bytes:
        """Bytes for ``request``: mostly its layout with chosen values, sometimes anything."""
        if request is None or self.int(0, 9) == 0:
            return bytes(self.fdp.ConsumeBytes(self.int(0, 300)))
        r = Request
        if request in (r.SET_FEATURES, r.SET_PROTOCOL_FEATURES):
            offered = OFFERED_FEATURES if request is r.SET_FEATURES else OFFERED_PROTOCOL_FEATURES
            value = offered & self.u64() if self.int(0, 3) else self.u64()
            return struct.pack("=Q", value)
        if request in (r.SET_VRING_NUM, r.SET_VRING_BASE, r.GET_VRING_BASE, r.SET_VRING_ENABLE):
            num = self.pick((0, 1, 2, 4, 8, 256, 32768, 65535, 65536)) if self.int(0, 3) else self.u64()
            return struct.pack("=II", self.vring_index(), num & 0xFFFF_FFFF)
        if request is r.SET_VRING_ADDR:
            return struct.pack(
                "=IIQQQQ",
                self.vring_index(),
                self.int(0, 1),
                self.near(UVAS),
                self.near(UVAS),
                self.near(UVAS),
                self.near(GPAS),
            )
        if request in (r.SET_VRING_KICK, r.SET_VRING_CALL, r.SET_VRING_ERR):
            value = self.vring_index() & 0xFF | (0x100 if self.int(0, 3) == 0 else 0)
            return struct.pack("=Q", value if self.int(0, 15) else self.u64())
        if request is r.SET_MEM_TABLE:
            n = self.int(0, 9)
            return struct.pack("=I4x", n) + b"".join(self.region() for _ in range(self.int(0, 9)))
        if request in (r.ADD_MEM_REG, r.REM_MEM_REG):
            return bytes(8) + self.region()
        if request is r.SET_LOG_BASE:
            return struct.pack("=QQ", self.pick((0, 1, 8, 0x1000, 0x20000)), self.pick((0, 0x1000, 7)))
        if request in (r.GET_CONFIG, r.SET_CONFIG):
            size = self.int(0, 300)
            head = struct.pack("=III", self.int(0, 300), size, self.int(0, 1))
            return head + bytes(self.fdp.ConsumeBytes(self.int(0, 300) if self.int(0, 7) == 0 else size))
        if request in (r.SET_STATUS, r.NET_SET_MTU, r.SEND_RARP):
            return struct.pack(
                "=Q", self.pick((0, 0x80, 0xF, 68, 1500, 65521, 65522)) if self.int(0, 3) else self.u64()
            )
        return bytes(self.fdp.ConsumeBytes(self.int(0, 40)))

    def message(self, fds: Fds) -> tuple[bytes, list[int]]:
        if self.int(0, 15):
            request: Request | None = Request(self.pick(tuple(int(x) for x in Request)))
            code = int(request)
        else:
            request, code = None, self.int(0, 0xFFFF_FFFF)
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if self.int(0, 1) else 0)
        if self.int(0, 15) == 0:
            flags = self.int(0, 0xFFFF_FFFF)
        body = self.payload(request)
        size = len(body) if self.int(0, 15) else self.int(0, 0xFFFF_FFFF)
        attached = [
            fds.make(FD_KINDS[self.int(0, len(FD_KINDS) - 1)], self.pick(MEMFD_SIZES))
            for _ in range(self.int(0, 3) if self.int(0, 7) else self.int(0, 8))
        ]
        return struct.pack("=III", code, flags, size) + body, attached


def check_device(dev: VhostUserNetDevice, config: NetConfig) -> None:
    """The device's state is one a well-behaved front-end could also have led it to."""
    assert len(dev.vqs) == 2 * config.queue_pairs
    assert dev.features & ~OFFERED_FEATURES == 0
    assert dev.protocol_features & ~OFFERED_PROTOCOL_FEATURES == 0
    assert 68 <= dev.mtu <= 65521 and len(dev.mac) == 6
    for vq in dev.vqs:
        assert vq.num == 0 or (vq.num & (vq.num - 1) == 0 and vq.num <= 32768)
        for v in (vq.last_avail_idx, vq.used_idx, vq.signalled_used):
            assert 0 <= v <= 0xFFFF
        for fd in (vq.kick_fd, vq.call_fd, vq.err_fd):
            if fd is not None:
                os.fstat(fd)  # still open: raises OSError (not a typed error) if the device lost it
        assert not vq.ready or vq.num > 0
    regions = sorted(dev.memory.regions, key=lambda reg: reg.guest_phys_addr)
    for a, b in itertools.pairwise(regions):
        assert a.guest_phys_addr + a.memory_size <= b.guest_phys_addr, "overlapping regions"
    if dev.backend_req_fd is not None:
        os.fstat(dev.backend_req_fd)


def drain(conn: BackendConnection, dev: VhostUserNetDevice, config: NetConfig) -> bool:
    """Dispatch every complete message as the server does; False once the stream is broken."""
    while True:
        try:
            event = conn.next_event()
        except ProtocolError as e:
            if e.fatal:
                return False
            continue
        if isinstance(event, NeedData):
            return True
        assert isinstance(event, Message)
        with contextlib.suppress(DeviceError):
            dev.handle(event)
        check_device(dev, config)


def run_messages(data: bytes) -> None:
    """One input: decode, feed, dispatch, close, and check that nothing leaked."""
    before = open_fds()
    maps_before = mapped_memfds()
    dec = Decoder(data)
    config = NetConfig(queue_pairs=dec.int(1, 2) if dec.int(0, 7) else MAX_QUEUE_PAIRS)
    fds = Fds()
    conn = BackendConnection()
    dev = VhostUserNetDevice("fuzz", config, Listener())
    try:
        for _ in range(dec.int(1, 12)):
            raw, attached = dec.message(fds)
            if dec.int(0, 3) == 0 and len(raw) > 1:
                # Split as a socket may: the fds ride on the first or the second chunk.
                cut = dec.int(1, len(raw) - 1)
                first_fds = bool(dec.int(0, 1))
                conn.receive_data(raw[:cut], attached if first_fds else [])
                conn.receive_data(raw[cut:], [] if first_fds else attached)
            else:
                conn.receive_data(raw, attached)
            if not drain(conn, dev, config):
                break
    finally:
        conn.close()
        dev.close()
        fds.close()
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {sorted(leaked)}"
    assert mapped_memfds() == maps_before, "guest memory still mapped after close"


def main(argv: list[str], one_input: Callable[[bytes], None] = run_messages) -> None:
    """Run under atheris with libFuzzer's arguments (scripts/fuzz passes them)."""
    logging.disable(logging.CRITICAL)  # the device logs every refusal: millions of lines otherwise
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

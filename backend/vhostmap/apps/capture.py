"""`vhostmap capture`: the frames crossing a port of a running daemon, live, as pcapng.

    with capture.open("vm1", direction="both", snaplen=256) as cap:
        for frame in cap.read():                  # CapturedFrame: ts_ns, iface, direction, length, data
            ...
        cap.counts()                              # {"frames": written, "dropped": not written}

`open` asks the daemon to tap the port's krings (the ``capture`` control command) and receives a sealed memfd
holding one capture ring per kring (vhostmap.netmap.capture; layout in datapath/capture.cdef). The daemon
writes records there and never waits: when this reader falls behind, frames are dropped and counted, and
traffic goes on. The taps live as long as the control connection, so a reader that dies stops them.
`PcapngStream` writes what was read with python-pcapng: an interface per name (``vm1``, ``vm1^`` for the
host rings) and each frame's direction in its epb_flags, so tcpdump, tshark and Wireshark read it as it comes.
"""

from __future__ import annotations

import heapq
import os
import select
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO, Self

import numpy as np
import pcapng.blocks as pcapng_blocks
from pcapng import FileWriter

from vhostmap.control import client as control
from vhostmap.control.client import DEFAULT_CONTROL_SOCKET
from vhostmap.netmap.abi import map_region
from vhostmap.netmap.capture import (
    CAP_HEADER,
    CAP_WRAP,
    DEFAULT_RING_BYTES,
    MAX_SNAPLEN,
    RECORD_DTYPE,
    RECORD_SIZE,
    RING_HEADER_DTYPE,
    cap_align,
)

__all__ = ["DIRECTIONS", "CaptureReader", "CapturedFrame", "PcapngStream", "open"]

#: What ``direction`` selects: frames the port's peer sent in, frames delivered to it, or both.
DIRECTIONS = ("in", "out", "both")
# pcapng's epb_flags direction bits (inbound, outbound) and LINKTYPE_ETHERNET.
EPB_DIRECTION = {"in": 1, "out": 2}
LINKTYPE_ETHERNET = 1


class CaptureError(Exception):
    """A capture ring holds something no daemon writes (its reader cannot go on)."""


@dataclass(frozen=True)
class CapturedFrame:
    """One frame as a tap saw it: when (CLOCK_REALTIME, ns), on which interface, which way, its length on
    the wire and the bytes kept (at most the snaplen)."""

    ts_ns: int
    iface: str
    direction: str
    length: int
    data: bytes


class RingReader:
    """The reading end of one capture ring at ``offset`` of the mapped memfd."""

    def __init__(self, region: Any, ring: dict[str, Any]) -> None:
        self.iface, self.direction, self.kring = (
            str(ring["iface"]),
            str(ring["direction"]),
            str(ring["kring"]),
        )
        offset, size = int(ring["offset"]), int(ring["size"])
        region.check(offset, CAP_HEADER + size, f"capture ring of {self.kring}")
        self.header = np.frombuffer(region.mm, dtype=RING_HEADER_DTYPE, count=1, offset=offset)[0]
        self.data = region.array[offset + CAP_HEADER : offset + CAP_HEADER + size]
        self.size = size

    def read(self) -> list[CapturedFrame]:
        """Every record the daemon published since the last call, in order; their room is given back."""
        head, tail = int(self.header["head"]), int(self.header["tail"])
        frames: list[CapturedFrame] = []
        while tail < head:
            pos = tail % self.size
            ts, caplen, length = self.data[pos : pos + RECORD_SIZE].view(RECORD_DTYPE)[0].tolist()
            if caplen == CAP_WRAP:
                tail += self.size - pos
                continue
            end = pos + RECORD_SIZE + caplen
            if end > self.size:
                raise CaptureError(
                    f"{self.kring}: a record of {caplen} bytes at {pos} crosses the ring's end"
                )
            data = self.data[pos + RECORD_SIZE : end].tobytes()
            frames.append(CapturedFrame(ts, self.iface, self.direction, length, data))
            tail += RECORD_SIZE + cap_align(caplen)
        self.header["tail"] = tail
        return frames


class CaptureReader:
    """A capture of port ``port`` (``vm1``, ``vm1^`` its host rings, ``vm1*`` both, ``vale0:app``) of the
    daemon at ``control_socket``; see the module doc. ``ring_bytes`` is the room per kring."""

    def __init__(
        self,
        port: str,
        control_socket: str = DEFAULT_CONTROL_SOCKET,
        *,
        direction: str = "both",
        snaplen: int = MAX_SNAPLEN,
        ring_bytes: int = DEFAULT_RING_BYTES,
    ) -> None:
        self._sock = control.connect(control_socket)
        fds: list[int] = []
        try:
            reply, fds = control.request(
                self._sock, "capture", port=port, direction=direction, snaplen=snaplen, ring_bytes=ring_bytes
            )
            if len(fds) != 1:
                raise control.ControlError(f"capture: expected 1 fd from the daemon, got {len(fds)}")
            self.region = map_region(fds[0], int(reply["memsize"]))
            self.rings = [RingReader(self.region, r) for r in reply["rings"]]
        except BaseException:
            self._sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self.port = port
        self.snaplen = int(reply["snaplen"])
        # In the order the daemon listed them: the interface ids of the pcapng output.
        self.interfaces = list(dict.fromkeys(r.iface for r in self.rings))
        self.closed = False

    def read(self) -> list[CapturedFrame]:
        """What every ring holds now, merged in time order (each ring is in order already)."""
        return list(heapq.merge(*(r.read() for r in self.rings), key=lambda f: f.ts_ns))

    def counts(self) -> dict[str, int]:
        """Frames the daemon wrote into the rings and frames it dropped for want of room, so far."""
        return {
            "frames": sum(int(r.header["frames"]) for r in self.rings),
            "dropped": sum(int(r.header["dropped"]) for r in self.rings),
        }

    def daemon_gone(self) -> bool:
        """Whether the daemon closed the control connection (it stopped, or the port went away)."""
        try:
            return self._sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds, less if the daemon goes away (False then): the poll interval of
        a reader with nothing to read (the taps do not signal it, so as to cost the datapath nothing)."""
        readable, _, _ = select.select([self._sock], [], [], timeout)
        return not (readable and self.daemon_gone())

    def close(self) -> None:
        """Stop the capture (the daemon removes its taps when the connection closes) and unmap. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        self.rings = []
        self.region.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PcapngStream:
    """Captured frames as a pcapng stream on ``out`` (a binary file: a file, or stdout for ``-w -``), one
    interface description per name in ``interfaces``, nanosecond timestamps."""

    def __init__(self, out: BinaryIO, interfaces: list[str], snaplen: int) -> None:
        self.out = out
        self.shb = pcapng_blocks.SectionHeader(options={"shb_userappl": "vhostmap capture"})
        self.ids: dict[str, int] = {}
        for name in interfaces:
            self.ids[name] = len(self.ids)
            self.shb.new_member(
                pcapng_blocks.InterfaceDescription,
                link_type=LINKTYPE_ETHERNET,
                snaplen=snaplen,
                options={"if_name": name, "if_tsresol": b"\x09"},
            )
        self.writer = FileWriter(out, self.shb)
        out.flush()

    def write(self, frames: list[CapturedFrame]) -> None:
        """Write ``frames`` and flush, so that a reader on a pipe sees them now."""
        for f in frames:
            block = self.shb.new_member(
                pcapng_blocks.EnhancedPacket,
                interface_id=self.ids[f.iface],
                timestamp_high=f.ts_ns >> 32,
                timestamp_low=f.ts_ns & 0xFFFFFFFF,
                packet_data=f.data,
                packet_len=f.length,
                options={"epb_flags": EPB_DIRECTION[f.direction]},
            )
            self.writer.write_block(block)
        self.out.flush()


def open(
    port: str,
    control_socket: str = DEFAULT_CONTROL_SOCKET,
    *,
    direction: str = "both",
    snaplen: int = MAX_SNAPLEN,
    ring_bytes: int = DEFAULT_RING_BYTES,
) -> CaptureReader:
    """Capture port ``port`` of the daemon at ``control_socket`` (CaptureReader). Raises
    vhostmap.control.ControlError when the daemon refuses (no such port, bad sizes) or cannot be reached."""
    return CaptureReader(port, control_socket, direction=direction, snaplen=snaplen, ring_bytes=ring_bytes)

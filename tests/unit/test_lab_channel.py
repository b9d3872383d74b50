"""The host end of the lab's guest command channel against a scripted guest end (no QEMU)."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from vhostmap.lab.channel import BAD_MARKER, READY_MARKER, CommandChannel


def scripted_guest(path: Path, answer: Callable[[bytes], bytes]) -> tuple[threading.Thread, list[bytes]]:
    """A guest end that connects, says it is ready and answers each request line with ``answer(line)``;
    the lines it received."""
    lines: list[bytes] = []

    def run() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(READY_MARKER)
            with s.makefile("rb") as f:
                for line in f:
                    lines.append(line)
                    s.sendall(answer(line))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines


def reply(line: bytes, output: bytes = b"hi\n") -> bytes:
    seq = line.split()[0]
    return b"@@VHM-OUT %s %d@@\n%s@@VHM-RC %s 0@@\n" % (seq, len(output), output, seq)


def test_a_request_the_guest_received_damaged_is_sent_again_and_runs_once(sock_dir: Path) -> None:
    sent: list[int] = []

    def damaged_once(line: bytes) -> bytes:
        sent.append(1)
        return BAD_MARKER if len(sent) == 1 else reply(line)

    with CommandChannel(sock_dir / "c.sock", details=lambda: "") as channel:
        thread, lines = scripted_guest(sock_dir / "c.sock", damaged_once)
        channel.wait_connected(10)
        channel.wait_ready(10)
        result = channel.run("echo hi", timeout=5)
        assert (result.rc, result.output) == (0, "hi\n")
        assert len(lines) == 2 and lines[0] == lines[1]
        _seq, _timeout, size, payload = lines[0].split()
        assert (int(size), base64.b64decode(payload)) == (len(payload), b"echo hi")
    thread.join(5)

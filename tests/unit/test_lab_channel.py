"""The host end of the lab's guest command channel against a scripted guest end (no QEMU)."""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from vhostmap.lab import channel as channel_module
from vhostmap.lab.channel import BAD_MARKER, MAX_RESENDS, READY_MARKER, CommandChannel, GuestError


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
    digest = hashlib.md5(output).hexdigest().encode()
    return b"@@VHM-OUT %s %d %s@@\n%s@@VHM-RC %s 0@@\n" % (seq, len(output), digest, output, seq)


def connected(
    path: Path, answer: Callable[[bytes], bytes]
) -> tuple[CommandChannel, threading.Thread, list[bytes]]:
    """A channel on ``path`` with a scripted guest answering ``answer``, ready."""
    channel = CommandChannel(path, details=lambda: "")
    thread, lines = scripted_guest(path, answer)
    channel.wait_connected(10)
    channel.wait_ready(10)
    return channel, thread, lines


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


# Replies as the UART has been seen to damage them: a byte repeated, a byte lost, the header lost, a byte
# changed (the length still right: only the md5 tells).
DAMAGE = {
    "repeated": lambda r: r.replace(b"ttl=64", b"ttl=664"),
    "lost": lambda r: r.replace(b"ttl=64", b"ttl=4"),
    "header lost": lambda r: r[r.index(b"@@\n") + 3 :],
    "changed": lambda r: r.replace(b"ttl=64", b"ttl=65"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_reply_that_arrives_damaged_is_asked_for_again_and_the_script_runs_once(
    sock_dir: Path, how: str
) -> None:
    output = b"64 bytes from 10.0.0.1: seq=4 ttl=64 time=16.405 ms\n"
    ran: list[bytes] = []

    def guest(line: bytes) -> bytes:
        # The guest end of guest-init.sh: a request with the id it ran last gets its kept reply again.
        if not ran or line.split()[0] != ran[-1].split()[0]:
            ran.append(line)
            return DAMAGE[how](reply(line, output))
        return reply(line, output)

    channel, thread, lines = connected(sock_dir / "c.sock", guest)
    with channel:
        result = channel.run("ping -c 1 10.0.0.1", timeout=5)
        assert (result.rc, result.output) == (0, output.decode())
        assert len(ran) == 1 and len(lines) == 2 and lines[0] == lines[1]
        # The channel is in step afterwards.
        assert channel.run("echo hi", timeout=5).output == output.decode()
        assert len(ran) == 2
    thread.join(5)


def test_a_reply_damaged_every_time_fails_after_a_few_tries(sock_dir: Path) -> None:
    channel, thread, lines = connected(
        sock_dir / "c.sock", lambda line: DAMAGE["lost"](reply(line, b"ttl=64\n"))
    )
    with channel, pytest.raises(GuestError, match=r"reply arrived damaged 4 times: 'true'"):
        channel.run("true", timeout=5)
    assert len(lines) == 1 + MAX_RESENDS
    thread.join(5)


def test_a_request_that_got_no_answer_at_all_is_sent_once_more_when_its_time_is_up(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "REPLY_GRACE", 0.5)
    # The first request lost its newline on the way: the guest saw nothing to answer.
    channel, thread, lines = connected(
        sock_dir / "c.sock", lambda line: b"" if len(lines) == 1 else reply(line)
    )
    with channel:
        assert channel.run("echo hi", timeout=1).output == "hi\n"
        assert len(lines) == 2 and lines[0] == lines[1]
    thread.join(5)


def test_a_guest_image_from_before_the_md5_is_still_understood(sock_dir: Path) -> None:
    def old_guest(line: bytes) -> bytes:
        seq = line.split()[0]
        return b"@@VHM-OUT %s 3@@\nhi\n@@VHM-RC %s 0@@\n" % (seq, seq)

    channel, thread, lines = connected(sock_dir / "c.sock", old_guest)
    with channel:
        assert channel.run("echo hi", timeout=5).output == "hi\n"
        assert channel.run("echo hi", timeout=5).output == "hi\n"
        assert len(lines) == 2
    thread.join(5)

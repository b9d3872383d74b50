"""The vhost-user sockets: client mode (vhostmap connects to QEMU's ``server=on`` socket and reconnects), and
server mode (one front-end at a time, stale sockets replaced, live ones and impossible paths refused clearly,
by ``vhostmap serve`` too)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.lab.frontend import FakeFrontend
from vhostmap.system.unixsock import EndpointError
from vhostmap.vhost_user import server
from vhostmap.vhost_user.messages import U64, Request

VHOSTMAP = str(Path(sys.executable).with_name("vhostmap"))
FRAMES = [bytes([k]) * 100 for k in range(6)]


def exchange(x: FakeFrontend, y: FakeFrontend) -> None:
    y.post_receive_buffers(len(FRAMES))
    x.transmit(FRAMES)
    assert y.receive(len(FRAMES)) == FRAMES


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[socket.socket]:
    """A listening socket at sock_dir/a.sock, as QEMU's ``-chardev socket,server=on``; removed afterwards."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_dir / "a.sock"))
    sock.listen(1)
    yield sock
    sock.close()
    (sock_dir / "a.sock").unlink(missing_ok=True)


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "RECONNECT_INTERVAL", 0.02)


def accept(d: RunningDaemon, listener: socket.socket) -> FakeFrontend:
    fe = d.adopt(FakeFrontend(str(listener.getsockname())))
    fe.accept_from(listener, timeout=5)
    fe.negotiate()
    return fe


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VHOSTMAP, "serve", *args], capture_output=True, text=True, timeout=30, check=False)


# --- client mode ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_reconnect")
def test_client_mode_connects_to_the_front_end_and_reconnects_after_it_leaves(
    start_daemon: StartDaemon, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    d = start_daemon({"a": "mode=client", "b": ""}, links=["a,b"])
    fa = accept(d, listener)
    fb = d.frontend("b")
    exchange(fa, fb)
    exchange(fb, fa)
    # The front-end goes away (QEMU restarts): the daemon comes back on its own.
    fa.close()
    fa2 = accept(d, listener)
    exchange(fa2, fb)
    exchange(fb, fa2)
    assert "port a: front-end disconnected (end of stream)" in caplog.messages
    assert caplog.messages.count(f"port a: front-end connected on {listener.getsockname()}") == 2


@pytest.mark.usefixtures("fast_reconnect")
def test_client_mode_waits_for_a_front_end_that_listens_later(
    start_daemon: StartDaemon, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    d = start_daemon({"a": "mode=client", "b": ""}, links=["a,b"])
    path = d.path("a")
    d.wait(lambda: any("waiting for" in m for m in caplog.messages), "the daemon to try connecting")
    assert f"port a: waiting for {path} (No such file or directory)" in caplog.messages
    assert not os.path.exists(path)  # a client never creates the front-end's socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
        fa = accept(d, sock)
        fb = d.frontend("b")
        exchange(fa, fb)
    finally:
        sock.close()
        os.unlink(path)


def test_client_mode_daemon_stops_while_connected(start_daemon: StartDaemon, listener: socket.socket) -> None:
    d = start_daemon({"a": "mode=client"})
    fa = accept(d, listener)
    assert fa.call(Request.GET_QUEUE_NUM).payload == U64(1)
    d.daemon.stop()
    d.thread.join(5)
    assert not d.thread.is_alive()
    assert fa.sock is not None
    assert fa.sock.recv(1) == b""
    assert os.path.exists(listener.getsockname())  # the front-end's socket is not ours to remove


# --- server mode ------------------------------------------------------------------------------------------


def test_a_second_front_end_is_refused_while_one_is_connected(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        intruder.settimeout(5)
        intruder.connect(d.path("a"))
        assert intruder.recv(1) == b""  # accepted and closed at once
    finally:
        intruder.close()
    assert f"port a: refusing a second front-end on {d.path('a')}" in caplog.messages
    exchange(fa, fb)
    exchange(fb, fa)


def test_a_new_front_end_is_served_after_the_first_leaves(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    exchange(fa, fb)
    fa.close()
    d.wait(lambda: not d.endpoint("a").is_connected, "a's front-end to be gone")
    fa2 = d.frontend("a")
    exchange(fa2, fb)
    exchange(fb, fa2)


def test_a_stale_socket_file_is_replaced(start_daemon: StartDaemon, sock_dir: Path) -> None:
    for name in ("a.sock", "control.sock"):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock_dir / name))
        stale.close()  # the file stays; nobody listens: a daemon that died
    d = start_daemon({"a": ""})
    fa = d.frontend("a")
    assert fa.call(Request.GET_QUEUE_NUM).payload == U64(1)


def test_a_file_that_is_not_a_socket_is_left_alone(start_daemon: StartDaemon, sock_dir: Path) -> None:
    (sock_dir / "a.sock").write_text("precious")
    with pytest.raises(EndpointError, match=f"^{sock_dir}/a.sock exists and is not a socket$"):
        start_daemon({"a": ""})
    assert (sock_dir / "a.sock").read_text() == "precious"
    (sock_dir / "a.sock").unlink()
    assert list(sock_dir.iterdir()) == []


@pytest.mark.parametrize("which", ["a.sock", "control.sock"])
def test_serve_refuses_a_socket_in_use_and_leaves_it_alone(sock_dir: Path, which: str) -> None:
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = sock_dir / which
    try:
        live.bind(str(path))
        live.listen(1)
        result = serve(
            "--port", f"a=vhost-user,path={sock_dir}/a.sock", "--control", f"{sock_dir}/control.sock"
        )
        assert result.returncode == 1
        assert result.stderr == f"vhostmap serve: socket {path} is in use by another process\n"
        assert path.is_socket()  # the other process keeps its socket
        assert sorted(p.name for p in sock_dir.iterdir()) == [which]
    finally:
        live.close()
        path.unlink()


def test_serve_refuses_a_socket_path_that_is_too_long(sock_dir: Path) -> None:
    long_dir = sock_dir / ("d" * 100)
    result = serve("--port", f"a=vhost-user,path={long_dir}/a.sock", "--control", f"{sock_dir}/control.sock")
    assert result.returncode == 2
    assert (
        result.stderr
        == "vhostmap serve: port 'a': socket path is longer than the 107 bytes UNIX sockets allow\n"
    )
    result = serve("--port", f"a=vhost-user,path={sock_dir}/a.sock", "--control", f"{long_dir}/control.sock")
    assert result.returncode == 1
    assert result.stderr == (
        f"vhostmap serve: socket path {long_dir}/control.sock is too long (UNIX sockets allow 107 bytes)\n"
    )
    assert not (sock_dir / "a.sock").exists()


def test_serve_refuses_a_directory_it_cannot_create(sock_dir: Path) -> None:
    (sock_dir / "file").write_text("")
    result = serve(
        "--port", f"a=vhost-user,path={sock_dir}/file/run/a.sock", "--control", f"{sock_dir}/c.sock"
    )
    assert result.returncode == 1
    assert result.stderr == f"vhostmap serve: cannot create directory {sock_dir}/file/run: Not a directory\n"
    assert sorted(p.name for p in sock_dir.iterdir()) == ["file"]  # the control socket went with the failure

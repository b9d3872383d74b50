"""``vhostmap top``: rates from two readings, one view with ``--once`` against a running daemon, and the live
view in a real terminal (tmux), ended with Ctrl-C."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest
from daemons import StartDaemon

from vhostmap.cli import main
from vhostmap.control.top import Reading, busy, rates
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.wait import wait_until

FRAME = bytes.fromhex("020000000002020000000001") + b"\x88\xb5" + bytes(46)


@contextlib.contextmanager
def trickle(fa: FakeFrontend, fb: FakeFrontend) -> Iterator[None]:
    """A steady stream a -> b in a thread while the body runs, so that a view has a rate to show."""
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            fb.post_receive_buffers(16)
            fa.transmit([FRAME] * 16)
            fa.wait_used(fa.queues[1], 16)
            fb.receive(16)

    sender = threading.Thread(target=send, name="trickle")
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(10)
    assert not sender.is_alive()


def rows(screen: str) -> dict[str, list[str]]:
    """The table rows of a view, by port: its cells."""
    out = {}
    for line in screen.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 8:
            out[cells[0]] = cells[1:]
    return out


def queue(n: int, rx: int, tx: int, size: int = 60, drops: int = 0) -> dict[str, int]:
    return {
        "queue": n,
        "rx_packets": rx,
        "rx_bytes": rx * size,
        "rx_dropped": drops,
        "tx_packets": tx,
        "tx_bytes": tx * size,
        "tx_dropped": 0,
        "errors": 0,
    }


def test_rates_are_differences_over_the_interval_and_a_restarted_queue_shows_none() -> None:
    threads0 = [{"thread": 0, "cpu": 1, "idle_ns": 0}]
    threads1 = [{"thread": 0, "cpu": 1, "idle_ns": 250_000_000}]
    before = Reading(
        10.0, {"a": {"queues": [queue(0, 100, 0)]}, "b": {"queues": [queue(0, 5000, 9)]}}, threads0, 0
    )
    after = Reading(
        12.0,
        {
            "a": {"queues": [queue(0, 2100, 0, drops=40)]},
            "b": {"queues": [queue(0, 10, 9)]},  # counters started again: reconnected
            "c": {"queues": [queue(0, 7, 7)]},  # new
        },
        threads1,
        1_000_000_000,
    )
    (a,) = rates(before, after)
    assert (a.port, a.queue, a.rx_pps, a.rx_bps, a.tx_pps, a.drops_ps) == ("a", 0, 1000, 1000 * 60 * 8, 0, 20)
    assert busy(before, after) == [(0, 1, 0.75)]


def test_once_prints_one_view_of_a_running_daemon(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    with trickle(fa, fb):
        assert main(["top", "--once", "--interval", "0.5", "--control", str(d.workdir / "control.sock")]) == 0
    out = capsys.readouterr().out
    assert "vhostmap top" in out and "rx pps" in out and "datapath: thread 0: " in out
    shown = rows(out)
    assert list(shown) == ["a", "b"], "the busiest first (a receives, b transmits: the same rate)"
    assert shown["a"][1] != "0" and shown["b"][3] != "0", "a's receive rate, b's transmit rate"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (scripts/setup)")
def test_the_live_view_runs_in_a_terminal_and_ends_with_ctrl_c(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""}, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    session = f"vhm-top-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m vhostmap.cli top --interval 0.2 --control {d.workdir / 'control.sock'}"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session)

    # The pane runs top, then a sleep: once top has exited, the pane's command is the sleep.
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "30", f"{command}; sleep 60")
    try:
        with trickle(fa, fb):
            shown = wait_until(
                lambda: (s := screen()) and "a" in rows(s) and rows(s)["a"][1] != "0" and s,
                20,
                "top to show a's receive rate",
            )
        assert "vhostmap top" in shown and "% busy" in shown
        tmux("send-keys", "-t", session, "C-c")
        wait_until(
            lambda: tmux("list-panes", "-t", session, "-F", "#{pane_current_command}").strip() == "sleep",
            10,
            "top to exit on Ctrl-C",
        )
        assert "Traceback" not in screen()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)

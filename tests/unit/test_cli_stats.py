"""``vhostmap stats`` against a ``vhostmap serve`` process: JSON and table forms with exact counters, and a
clear error when no daemon answers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from vhostmap.control.client import ControlError, call
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.wait import wait_until

VHOSTMAP = str(Path(sys.executable).with_name("vhostmap"))


def vhostmap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VHOSTMAP, *args], capture_output=True, text=True, timeout=30, check=False)


def answers(control: str) -> bool:
    try:
        call(control, "status", timeout=2)
    except (ControlError, OSError):
        return False
    return True


@pytest.fixture
def serving(sock_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``vhostmap serve`` with ports a and b linked; stopped with SIGTERM, which must end it cleanly."""
    control = str(sock_dir / "control.sock")
    proc = subprocess.Popen(
        [
            VHOSTMAP,
            "serve",
            "--port",
            f"a=vhost-user,path={sock_dir}/a.sock",
            "--port",
            f"b=vhost-user,path={sock_dir}/b.sock,queues=2",
            "--link",
            "a,b",
            "--control",
            control,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is not None or answers(control), 30, "vhostmap serve to answer", interval=0.02
        )
        assert proc.poll() is None, proc.communicate()
        yield control, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out == "" and err == ""  # quiet when all is well
    assert sorted(p.name for p in sock_dir.iterdir()) == []  # every socket removed


def test_stats_json_and_table_show_exact_counters(
    serving: tuple[str, subprocess.Popen[str]], sock_dir: Path
) -> None:
    control, _ = serving
    with (
        FakeFrontend(str(sock_dir / "a.sock")) as fa,
        FakeFrontend(str(sock_dir / "b.sock"), queue_pairs=2) as fb,
    ):
        fa.connect()
        fa.negotiate()
        fb.connect()
        fb.negotiate()
        to_b = [bytes([k]) * 60 for k in range(3)]
        to_a = [bytes([k]) * 1514 for k in range(2)]
        fb.post_receive_buffers(3)
        fa.transmit(to_b)
        assert fb.receive(3) == to_b
        fa.post_receive_buffers(2)
        fb.transmit(to_a, pair=1)  # b's queue 1 reaches a's only queue
        assert fa.receive(2) == to_a
        # What waits: receive buffers b posted and nothing filled, and a frame for a, which has none.
        fb.post_receive_buffers(5)
        fb.transmit([bytes(60)], pair=1)

        def stats_json() -> dict[str, Any]:
            result = vhostmap("stats", "--json", "--control", control)
            assert result.returncode == 0 and result.stderr == ""
            return cast(dict[str, Any], json.loads(result.stdout))

        stats = wait_until(
            lambda: (s := stats_json())["ports"]["a"]["occupancy"][0]["held"] == 1 and s,
            10,
            "the frame for a to be held",
        )
        # Kicks and calls depend on how the datapath's wake-ups fell: there, not exact.
        for port in stats["ports"].values():
            for q in [*port["queues"], port["totals"]]:
                assert q.pop("kicks") >= 0 and q.pop("calls") >= 0
        counters = dict.fromkeys(
            (
                "rx_packets",
                "rx_bytes",
                "rx_dropped",
                "tx_packets",
                "tx_bytes",
                "tx_dropped",
                "errors",
                "rx_unconnected",
                "tx_no_carrier",
                "rx_bad_header",
                "rx_offloaded",
                "rx_offload_passed",
                "tx_bad_header",
                "tx_offloaded",
            ),
            0,
        )
        a = {**counters, "rx_packets": 3, "rx_bytes": 180, "tx_packets": 2, "tx_bytes": 3028}
        b0 = {**counters, "tx_packets": 3, "tx_bytes": 180}
        b1 = {**counters, "rx_packets": 3, "rx_bytes": 3088}
        drops = {
            "drops": {
                "rx": {"unconnected": 0, "bad_header": 0, "invalid": 0},
                "tx": {"no_carrier": 0, "bad_header": 0, "too_big": 0},
            }
        }
        waiting = {"guest_tx_waiting": 0, "guest_rx_buffers": 0, "held": 0}
        assert stats == {
            "ports": {
                "a": {
                    "queues": [{"queue": 0, **a, **drops}],
                    "totals": a,
                    "occupancy": [{"queue": 0, **waiting, "held": 1}],
                    "broken": None,
                },
                "b": {
                    "queues": [{"queue": 0, **b0, **drops}, {"queue": 1, **b1, **drops}],
                    "totals": {
                        **counters,
                        "rx_packets": 3,
                        "rx_bytes": 3088,
                        "tx_packets": 3,
                        "tx_bytes": 180,
                    },
                    "occupancy": [{"queue": 0, **waiting, "guest_rx_buffers": 5}, {"queue": 1, **waiting}],
                    "broken": None,
                },
            }
        }

        result = vhostmap("stats", "--control", control)
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.splitlines() == [
            "port         queue      rx pkts       rx bytes      tx pkts       tx bytes      drops   errors",
            "a                0            3            180            2           3028          0        0",
            "b                0            0              0            3            180          0        0",
            "b                1            3           3088            0              0          0        0",
        ]


def test_stats_without_a_daemon_is_a_clear_error(sock_dir: Path) -> None:
    control = sock_dir / "control.sock"
    result = vhostmap("stats", "--control", str(control))
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        result.stderr == f"vhostmap stats: no vhostmap daemon at {control} (is `vhostmap serve` running?)\n"
    )
    # A socket file nobody listens on (a daemon that was killed).
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control))
    stale.close()
    result = vhostmap("stats", "--json", "--control", str(control))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"vhostmap stats: no vhostmap daemon listens on {control} (stale socket)\n"


def test_stats_does_not_load_the_datapath() -> None:
    # The client commands stay quick: no numpy, no compiled kernels.
    code = "import sys; from vhostmap import cli; cli.main(['stats', '--control', '/nonexistent/c.sock']); "
    code += "print(sorted(m for m in ('numpy', 'vhostmap.datapath') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout == "[]\n"

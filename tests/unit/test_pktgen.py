"""``vhostmap pkt-gen``: frames it builds (checked by scapy), exact counts between two pkt-gens on a switch,
ping against pong with round-trip statistics, and the command line."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
from daemons import RunningDaemon, StartDaemon
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from vhostmap import cli
from vhostmap.apps import client
from vhostmap.apps.pktgen import (
    Limits,
    echo_replies,
    echo_request,
    ping,
    pong,
    receive,
    transmit,
)
from vhostmap.packets import Addresses, udp_frame


def control_path(d: RunningDaemon) -> str:
    return str(d.workdir / "control.sock")


def test_udp_frames_are_well_formed() -> None:
    for length in (60, 64, 1500, 2048):
        f = Ether(udp_frame(length))
        assert len(bytes(f)) == length
        assert f[Ether].dst == "ff:ff:ff:ff:ff:ff" and f[Ether].src == "02:00:00:00:00:01"
        assert (f[IP].src, f[IP].dst, f[UDP].sport, f[UDP].dport) == ("10.0.0.1", "10.1.0.1", 1234, 4321)
        assert f[IP].chksum == Ether(bytes(f.__class__(bytes(f))))[IP].chksum
        ip = IP(bytes(f[IP]))
        del ip.chksum
        assert IP(bytes(ip)).chksum == f[IP].chksum  # scapy recomputes the same checksum
    with pytest.raises(ValueError, match=r"outside 60\.\.2048"):
        udp_frame(59)


def test_echo_replies_are_made_a_batch_at_a_time() -> None:
    addr = Addresses(src_mac=bytes.fromhex("020000000001"), dst_mac=bytes.fromhex("020000000002"))
    requests = [echo_request(98, seq, 0x1234, 10**9 + seq, 7, addr) for seq in range(5)]
    other = udp_frame(98, addr)
    rows = np.frombuffer(b"".join([*requests, other]), np.uint8).reshape(6, 98).copy()
    mask = echo_replies(rows, np.full(6, 98))
    assert mask.tolist() == [True] * 5 + [False]
    assert rows[5].tobytes() == other  # left alone
    for seq, row in enumerate(rows[:5]):
        reply = Ether(row.tobytes())
        assert reply[Ether].src == "02:00:00:00:00:02" and reply[Ether].dst == "02:00:00:00:00:01"
        assert (reply[IP].src, reply[IP].dst) == ("10.1.0.1", "10.0.0.1")
        assert reply[ICMP].type == 0 and reply[ICMP].seq == seq and reply[ICMP].id == 0x1234
        icmp = ICMP(bytes(reply[ICMP]))
        del icmp.chksum
        assert ICMP(bytes(icmp)).chksum == reply[ICMP].chksum  # the adjusted checksum is right


def test_pktgen_tx_and_rx_count_exactly_through_a_switch(start_daemon: StartDaemon) -> None:
    d = start_daemon({}, switches=[])
    path = control_path(d)
    rounds, count = 20, 500  # a round fits the receiver's rings (a switch drops what does not fit)
    with client.open("vale0:rx", path) as rx_port, client.open("vale0:tx", path) as tx_port:
        for r in range(rounds):
            sent = transmit(tx_port, udp_frame(60), Limits(count=count), batch=128)
            got = receive(rx_port, Limits(count=count, duration=30))
            assert (sent.packets, got.packets, got.bytes) == (count, count, count * 60), f"round {r}"
        sw = d.daemon.switches["vale0"].stats()["ports"]
        assert sw["vale0:tx"]["flooded"] == rounds * count  # broadcast frames
        assert sw["vale0:rx"]["tx_frames"] == rounds * count and sw["vale0:rx"]["tx_dropped"] == 0


def test_ping_against_pong(start_daemon: StartDaemon) -> None:
    d = start_daemon({}, switches=[])
    path = control_path(d)
    with client.open("vale0:pong", path) as pong_port, client.open("vale0:ping", path) as ping_port:
        stop = threading.Event()
        answered: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: answered.update(r=pong(pong_port, Limits(count=50, duration=30)))
        )
        thread.start()
        result = ping(ping_port, 98, Limits(count=50), Addresses(), timeout=5.0)
        stop.set()
        thread.join(40)
    assert result.packets == 50 and result.lost == 0 and answered["r"].packets == 50
    rtt = result.rtt_us
    assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p90"] <= rtt["p99"] <= rtt["max"] < 5e6


def test_the_command_line_prints_json(start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    d = start_daemon({"g": ""})
    d.frontend("g").post_receive_buffers(256)
    rc = cli.main(
        ["pkt-gen", "-i", "g", "-f", "tx", "-l", "128", "-n", "200", "--control", control_path(d), "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["mode"], out["packets"], out["bytes"]) == ("tx", 200, 200 * 128) and out["pps"] > 0
    d.wait(lambda: d.totals("g")["tx_packets"] == 200, "the guest to receive every frame")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-l", "20"], "outside 60..2048"),
        (["-b", "0"], "must be >= 1"),
        (["-i", "nosuch"], "no port named 'nosuch'"),
    ],
)
def test_bad_arguments_are_refused(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    d = start_daemon({"g": ""})
    argv = ["pkt-gen", "-i", "g", "--control", control_path(d), *args]
    assert cli.main(argv) in (1, 2)
    assert error in capsys.readouterr().err


def test_bad_addresses_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["pkt-gen", "-i", "g", "--dst-mac", "zz"])
    assert "is not a MAC address" in capsys.readouterr().err

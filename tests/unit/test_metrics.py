"""Prometheus metrics (``serve --metrics``): what a scrape of a running daemon returns, read over HTTP and
parsed with prometheus_client's own parser; a scrape never waits for the datapath lock."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from daemons import RunningDaemon, StartDaemon
from prometheus_client.parser import text_string_to_metric_families

from vhostmap.daemon.config import ConfigError, build_config, parse_listen

FRAME = bytes.fromhex("020000000002020000000001") + b"\x88\xb5" + bytes(46)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of http://127.0.0.1:PORT/metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def start(start_daemon: StartDaemon, **kwargs: object) -> tuple[RunningDaemon, int]:
    port = free_port()
    return start_daemon({"a": "", "b": "", "c": ""}, metrics=str(port), **kwargs), port


def test_a_scrape_gives_per_queue_counters_occupancy_and_the_datapath(start_daemon: StartDaemon) -> None:
    d, port = start(start_daemon, links=["a,b"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(8)
    fa.transmit([FRAME] * 5)
    assert len(fb.receive(5)) == 5
    # 3 of b's 8 buffers are posted and not filled: occupancy shows them.
    m = scrape(port)
    a0, b0 = (("port", "a"), ("queue", "0")), (("port", "b"), ("queue", "0"))
    assert m["vhostmap_port_rx_packets_total", a0] == 5
    assert m["vhostmap_port_rx_bytes_total", a0] == 5 * len(FRAME)
    assert m["vhostmap_port_tx_packets_total", b0] == 5
    assert m["vhostmap_port_tx_dropped_total", (*b0, ("reason", "no_carrier"))] == 0
    assert m["vhostmap_port_guest_rx_buffers", b0] == 3
    assert m["vhostmap_port_broken", (("port", "a"),)] == 0
    info = [labels for (name, labels) in m if name == "vhostmap_port_info" and ("port", "a") in labels]
    assert len(info) == 1 and ("type", "vhost-user") in info[0]
    assert "VIRTIO_F_VERSION_1" in dict(info[0])["features"]
    assert m["vhostmap_allocator_free", (("pool", "netmap_buf"),)] > 0
    assert m["vhostmap_datapath_rounds_total", (("cpu", ""), ("thread", "0"))] >= 1
    assert m["vhostmap_datapath_idle_seconds_total", (("cpu", ""), ("thread", "0"))] > 0
    assert m["vhostmap_process_open_fds", ()] > 0
    # No MAC address as a label anywhere.
    assert not any(v.count(":") == 5 for _, labels in m for _, v in labels)


def test_drops_by_reason_kicks_calls_and_busy_time(start_daemon: StartDaemon) -> None:
    d, port = start(start_daemon, links=["a,b"])  # b has no guest; nothing is attached to c
    fa, fc = d.frontend("a"), d.frontend("c")
    fa.transmit([FRAME] * 3)  # to b, which has no receive queue: no carrier
    fa.transmit([b""])  # an empty frame: the guest's mistake
    fc.transmit([FRAME] * 2)  # nowhere to go
    d.wait(
        lambda: (
            (d.totals("b")["tx_dropped"], d.totals("a")["rx_dropped"], d.totals("c")["rx_dropped"])
            == (3, 1, 2)
        ),
        "every frame to be dropped",
    )
    m = scrape(port)
    a0, b0, c0 = ((("port", p), ("queue", "0")) for p in "abc")
    assert m["vhostmap_port_tx_dropped_total", (*b0, ("reason", "no_carrier"))] == 3
    assert m["vhostmap_port_tx_dropped_total", (*b0, ("reason", "too_big"))] == 0
    assert m["vhostmap_port_rx_dropped_total", (*a0, ("reason", "invalid"))] == 1
    assert m["vhostmap_port_rx_dropped_total", (*a0, ("reason", "unconnected"))] == 0
    assert m["vhostmap_port_rx_dropped_total", (*c0, ("reason", "unconnected"))] == 2
    # Each transmit kicked (one or more kicks read per wake-up), and a's completions were signalled.
    assert 1 <= m["vhostmap_port_kicks_total", a0] <= 2 and m["vhostmap_port_kicks_total", b0] == 0
    assert m["vhostmap_port_calls_total", a0] >= 1 and m["vhostmap_port_calls_total", b0] == 0
    thread = (("cpu", ""), ("thread", "0"))
    assert m["vhostmap_datapath_busy_seconds_total", thread] > 0
    stats = d.stats("a")["queues"][0]
    assert stats["kicks"] == m["vhostmap_port_kicks_total", a0] and stats["drops"]["rx"]["invalid"] == 1


def test_switch_ports_are_counted_and_a_broken_port_shows(start_daemon: StartDaemon) -> None:
    d, port = start(start_daemon, switches=["vale0=a,b,c"])
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(4)
    fa.transmit([FRAME])  # b's address is not learnt yet: flooded
    assert len(fb.receive(1)) == 1
    m = scrape(port)
    assert m["vhostmap_switch_port_rx_frames_total", (("port", "a"), ("switch", "vale0"))] == 1
    assert m["vhostmap_switch_port_flooded_total", (("port", "a"), ("switch", "vale0"))] == 1
    assert m["vhostmap_switch_addresses", (("switch", "vale0"),)] == 1
    fa.write_desc(fa.queues[1], 0, 1 << 50, 64, 0)  # a transmit chain outside a's memory
    fa.publish(fa.queues[1], [0])
    d.wait_broken("a")
    assert scrape(port)["vhostmap_port_broken", (("port", "a"),)] == 1


def test_a_scrape_does_not_wait_for_the_datapath(start_daemon: StartDaemon) -> None:
    d, port = start(start_daemon, links=["a,b"])
    with d.daemon.worker.lock:  # no datapath thread runs, and neither could a scrape that took the lock
        assert ("vhostmap_port_rx_packets_total", (("port", "a"), ("queue", "0"))) in scrape(port)


def test_the_listen_address_parses_and_bad_ones_are_refused() -> None:
    assert parse_listen("9191", "metrics") == ("127.0.0.1", 9191)
    assert parse_listen(9191, "metrics") == ("127.0.0.1", 9191)
    assert parse_listen("0.0.0.0:9191", "metrics") == ("0.0.0.0", 9191)
    assert parse_listen("[::1]:9191", "metrics") == ("::1", 9191)
    assert build_config({"metrics": 9191}).metrics == ("127.0.0.1", 9191)
    assert build_config({"metrics": 9191}, metrics="10.0.0.1:80").metrics == ("10.0.0.1", 80)
    assert build_config({}).metrics is None
    for bad in ("", "x", "1:0", ":80", "70000", True, 1.5):
        with pytest.raises(ConfigError, match=r"metrics must be \[ADDR:\]PORT"):
            build_config({"metrics": bad})

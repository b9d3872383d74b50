"""``vhostmap serve --metrics`` scraped by a real Prometheus server (the Debian package) while dpdk-testpmd
sends into a port: Prometheus' own HTTP query API returns the rate and the counters vhostmap counted."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhostmap.lab.daemon import VhostmapDaemon
from vhostmap.lab.process import end_process
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (scripts/setup)"),
]

CPU = 0  # testpmd's lcores; vhostmap's datapath runs where the scheduler puts it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A Prometheus scraping 127.0.0.1:TARGET every second: yields (its own port, TARGET)."""
    target, web = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: vhostmap\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - as long as the process
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _get(web, "/-/ready") is not None, 30, "Prometheus to be ready")
        yield web, target
    finally:
        end_process(proc, 15)
        log.close()


def _get(port: int, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return bytes(reply.read())
    except OSError:
        return None


def query(port: int, expr: str) -> list[dict[str, object]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    body = _get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body is not None, f"Prometheus did not answer {expr!r}"
    reply = json.loads(body)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_the_rates_while_testpmd_sends(
    sock_dir: Path, prometheus: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    web, target = prometheus
    with (
        VhostmapDaemon(
            sock_dir, [f"a=vhost-user,path={sock_dir}/a.sock"], extra_args=["--metrics", str(target)]
        ) as daemon,
        Testpmd([VirtioUserPort(sock_dir / "a.sock")], forward_mode="txonly", txpkts=64, cpu=CPU) as tp,
    ):
        tp.start()
        rate = 'rate(vhostmap_port_rx_packets_total{port="a",queue="0"}[5s])'
        found = wait_until(
            lambda: (r := query(web, rate)) and float(r[0]["value"][1]) > 0 and r,  # type: ignore[index]
            60,
            "Prometheus to have a receive rate for port a",
        )
        assert found[0]["metric"]["job"] == "vhostmap"  # type: ignore[index]
        sent = tp.stop()[0].tx_packets
        # Once the port counted them all, a later scrape says exactly that many.
        wait_until(
            lambda: daemon.stats()["a"]["totals"]["rx_packets"] == sent, 30, f"{sent} frames in vhostmap"
        )
        counted = 'vhostmap_port_rx_packets_total{port="a",queue="0"}'
        wait_until(
            lambda: (r := query(web, counted)) and float(r[0]["value"][1]) == sent,  # type: ignore[index]
            30,
            f"Prometheus to have scraped {sent} frames",
        )
        busy = query(web, "1 - rate(vhostmap_datapath_idle_seconds_total[5s])")
        assert busy and 0 <= float(busy[0]["value"][1]) <= 1  # type: ignore[index]
        up = query(web, 'up{job="vhostmap"}')
        assert float(up[0]["value"][1]) == 1  # type: ignore[index]
    with capsys.disabled():
        print(
            f"\nPrometheus: {rate} = {float(found[0]['value'][1]):.0f} while testpmd sent; "  # type: ignore[index]
            f"{counted} = {sent} after it stopped (testpmd sent {sent})"
        )

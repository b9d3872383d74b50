"""Testing a user's program in VMs with vhostmap's pytest plugin: a UDP echo server in one guest, its client
in another, both on a vhostmap switch.

Only the plugin's documented fixtures are used (``topology``; the plugin comes with vhostmap through its
``pytest11`` entry point, nothing to register; `vhostmap.testing.Topology` is imported for the type hints).
The program (udp_echo.c) is built static on the host, because the busybox guest has no C library, and shared
into both guests, where it is /mnt/host/udp_echo.

Run it with ``pytest examples/udp_echo`` (as root, with QEMU and the guest kernel of scripts/guest-kernel).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vhostmap.testing import Topology

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).with_name("udp_echo.c")
PORT = 7777


@pytest.fixture(scope="module")
def program_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding udp_echo, built static from udp_echo.c."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build udp_echo.c")
    out = tmp_path_factory.mktemp("udp_echo")
    subprocess.run([cc, "-static", "-O2", "-o", str(out / "udp_echo"), str(SOURCE)], check=True)
    return out


@pytest.fixture
def echo_lab(topology: Callable[[dict[str, Any]], Topology], program_dir: Path) -> Topology:
    """Two guests on switch sw0, the echo server running in "server"."""
    lab = topology(
        {
            "switches": ["sw0"],
            "guests": {
                "server": {"nics": ["sw0"], "share": str(program_dir)},
                "client": {"nics": ["sw0"], "share": str(program_dir)},
            },
        }
    )
    server = lab.guests["server"]
    server.run(f"/mnt/host/udp_echo serve {PORT} > /tmp/echo.log 2>&1 &", check=True)
    server.run("until grep -q listening /tmp/echo.log; do usleep 20000; done", timeout=20, check=True)
    return lab


def test_the_client_gets_its_datagram_back_through_the_switch(echo_lab: Topology) -> None:
    server, client = echo_lab.guests["server"], echo_lab.guests["client"]
    reply = client.run(f"/mnt/host/udp_echo send {server.ip} {PORT} hello-through-vhostmap")
    assert reply.rc == 0, reply.output
    assert reply.output == "hello-through-vhostmap\n"
    # What the server received, and from whom: the client's address.
    log = server.run("cat /tmp/echo.log", check=True).output
    assert f"echoed 22 bytes to {client.ip}:" in log


def test_datagrams_of_every_size_up_to_the_mtu_come_back_unchanged(echo_lab: Topology) -> None:
    server, client = echo_lab.guests["server"], echo_lab.guests["client"]
    # 1472 bytes of payload fill a 1500-byte IP packet exactly.
    for size in (1, 100, 1000, 1472):
        result = client.run(
            f"/mnt/host/udp_echo send {server.ip} {PORT} $(head -c {size} /dev/zero | tr '\\0' x)"
        )
        assert result.rc == 0 and result.output == "x" * size + "\n", result.output[-200:]
    # Each went through the daemon's switch: both ports show the traffic.
    ports = echo_lab.vhostmap.stats()
    assert ports["server.0"]["totals"]["rx_packets"] >= 4
    assert ports["client.0"]["totals"]["rx_packets"] >= 4

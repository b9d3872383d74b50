"""The lab works: guests boot and talk over vhost-user, testpmd counts exactly, host plumbing cleans up.

vhostmap's own backend is not involved: DPDK's vhost library (testpmd's net_vhost) is the peer that proves
the guest, its command channel and the testpmd runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from vhostmap.lab.channel import GuestCommandTimeout
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.netns import Netns, Tap, VethPair, add_address, link_exists, set_up
from vhostmap.lab.qemu import Nic, QemuGuest
from vhostmap.lab.testpmd import (
    Testpmd,
    VhostPort,
    VirtioUserPort,
    parse_forward_drops,
    parse_port_stats,
    split_reply,
)
from vhostmap.lab.wait import WaitTimeout

GUEST_MAC = "52:54:00:00:00:02"
GUEST_IP = "10.0.0.1/24"
PEER_IP = "10.0.0.2"  # testpmd's icmpecho answers ARP and ping for any address

STATS_TEXT = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 160        RX-missed: 2          RX-bytes:  10240
  RX-errors: 1
  RX-nombuf:  3
  TX-packets: 7          TX-errors: 0          TX-bytes:  448

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
Port 1: link state change event

  ######################## NIC statistics for port 1  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 160        TX-errors: 0          TX-bytes:  10240

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

STOP_TEXT = """
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 160            TX-dropped: 32            TX-total: 192
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 160            TX-dropped: 32            TX-total: 192
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
"""


def test_testpmd_port_stats_parse_per_port_despite_interleaved_events() -> None:
    stats = parse_port_stats(STATS_TEXT)
    assert sorted(stats) == [0, 1]
    assert (stats[0].rx_packets, stats[0].rx_missed, stats[0].rx_bytes) == (160, 2, 10240)
    assert (stats[0].rx_errors, stats[0].rx_nombuf, stats[0].tx_packets, stats[0].tx_bytes) == (1, 3, 7, 448)
    assert (stats[1].rx_packets, stats[1].tx_packets, stats[1].tx_bytes) == (0, 160, 10240)


def test_testpmd_prompt_is_found_when_other_threads_print_inside_it() -> None:
    # As captured in a soak run: the reconnect thread's log line and the link event landed inside the prompt.
    output = (
        b"show port info 0\nLink status: up\nDevice error handling mode: none\n"
        b"tevirtio_user_dev_server_reconnect(): server mode virtio-user reconnection succeeds!\n"
        b"\nPort 1: link state change event\nstpmd> "
        b"\nPort 2: link state change event\nshow port stats all\n"
    )
    found = split_reply(output)
    assert found is not None
    reply, used = found
    assert reply == "show port info 0\nLink status: up\nDevice error handling mode: none\n"
    assert output[:used].endswith(b"stpmd> ")
    assert split_reply(output[used:]) is None  # the next prompt has not come yet
    # An event inside a reply line leaves the line whole; no prompt yet means no reply.
    assert split_reply(b"Link sta\nPort 0: link state change event\ntus: up\ntestpm") is None
    assert split_reply(b"Link sta\nPort 0: link state change event\ntus: up\ntestpmd> ") == (
        "Link status: up\n",
        len(b"Link sta\nPort 0: link state change event\ntus: up\ntestpmd> "),
    )


def test_testpmd_forward_stats_give_drops_per_port() -> None:
    assert parse_forward_drops(STOP_TEXT) == {0: (0, 32)}


@pytest.mark.slow
def test_guest_command_channel_reports_status_output_and_timeouts(
    guest_kernel: GuestKernel, sock_dir: Path
) -> None:
    share = sock_dir / "share"
    share.mkdir()
    (share / "from-host").write_text("hello guest\n")
    with QemuGuest(kernel=guest_kernel, workdir=sock_dir, share=share) as guest:
        boot = guest.wait_ready()
        assert boot < 30, f"the guest took {boot:.1f} s to boot"
        assert guest.run("uname -r").output.strip() == guest_kernel.version
        assert guest.run("exit 3").rc == 3
        # Output is returned byte for byte: no trailing newline added, stderr included, quotes intact.
        assert guest.run("printf 'a\\nb'; echo \"it's\" >&2").output == "a\nbit's\n"
        big = guest.run("seq 1 5000").output
        assert big.split() == [str(i) for i in range(1, 5001)]
        # Bulk data goes through the 9p share rather than the (slow) serial channel.
        guest.run("cat /mnt/host/from-host > /mnt/host/from-guest", check=True)
        assert (share / "from-guest").read_text() == "hello guest\n"
        long_script = "true " + "&& true " * 1000 + "&& echo long"
        assert guest.run(long_script).output == "long\n"
        with pytest.raises(GuestCommandTimeout):
            guest.run("echo started; sleep 600", timeout=2)
        # The guest killed the runaway command: the channel still works.
        assert guest.run("echo still here").output == "still here\n"
        guest.poweroff()
        assert not guest.alive


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "queues", "mtu"),
    [
        pytest.param("client", 1, None, id="qemu-client-1q"),
        pytest.param("server", 2, 9000, id="qemu-server-2q-jumbo"),
    ],
)
def test_guest_pings_testpmd_icmpecho_over_vhost_user(
    guest_kernel: GuestKernel, sock_dir: Path, mode: Literal["client", "server"], queues: int, mtu: int | None
) -> None:
    sock = sock_dir / "vh0.sock"
    # When QEMU is the server, testpmd connects as a client and retries until QEMU listens.
    backend = Testpmd(
        [VhostPort(sock, queues=queues, client=mode == "server")], forward_mode="icmpecho", cpu=0
    )
    # Two vCPUs make the guest's virtio_net use both queue pairs.
    nic = Nic(sock, GUEST_MAC, mode=mode, queues=queues, ip=GUEST_IP, mtu=mtu)
    guest = QemuGuest([nic], kernel=guest_kernel, workdir=sock_dir, smp=queues)
    with backend, guest:
        try:
            guest.wait_ready()
        except WaitTimeout as e:
            # QEMU as the server starts the guest only once testpmd connected: say what testpmd was doing.
            raise AssertionError(f"{e}\n{backend.diagnostics()}") from e
        # Forwarding busy-polls a CPU: start it only once the guest has booted.
        backend.start()
        backend.wait_for_link()
        guest.wait_carrier("eth0")
        rx_queues = guest.run("ls /sys/class/net/eth0/queues | grep -c rx-", check=True).output
        assert int(rx_queues) == queues
        assert guest.ping(PEER_IP, count=5) == 0.0
        if mtu is not None:
            assert guest.run("cat /sys/class/net/eth0/mtu").output.strip() == str(mtu)
            assert guest.ping(PEER_IP, count=2, size=mtu - 1000) == 0.0
        stats = backend.stop()[0]
        # The echo requests and at least one ARP request came in; as many replies went out.
        assert stats.rx_packets >= 6
        assert stats.tx_packets >= 6
        guest.poweroff()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tx_first", "txonly"])
def test_virtio_user_sends_exactly_what_vhost_receives(sock_dir: Path, method: str) -> None:
    sock = sock_dir / "vh0.sock"
    backend = Testpmd([VhostPort(sock)], forward_mode="rxonly", cpu=0)
    frontend = Testpmd(
        [VirtioUserPort(sock)],
        forward_mode="io" if method == "tx_first" else "txonly",
        cpu=1,
        txpkts=64,
        burst=32,
    )
    with backend, frontend:
        backend.start()
        frontend.wait_for_link()
        backend.wait_for_link()
        if method == "tx_first":
            # io mode with a peer that sends nothing back: exactly 4 bursts of 32, then nothing.
            frontend.start(tx_first=4)
            sent = frontend.stop()[0]
            assert (sent.tx_packets, sent.tx_dropped) == (128, 0)
        else:
            frontend.start()
            frontend.wait_for_packets(100_000, direction="tx")
            sent = frontend.stop()[0]
        # The backend keeps polling until it has taken everything the frontend put in the virtqueue.
        backend.wait_for_packets(sent.tx_packets, timeout=10)
        received = backend.stop()[0]
        assert received.rx_packets == sent.tx_packets
        assert received.rx_bytes == sent.tx_bytes == sent.tx_packets * 64
        assert received.rx_missed == received.rx_errors == 0


@pytest.mark.slow
def test_netns_veth_and_tap_exist_inside_and_are_gone_after() -> None:
    with Netns() as left, Netns() as right:
        with VethPair(netns=left.name, peer_netns=right.name) as veth, Tap(netns=left.name) as tap:
            assert veth.exists and tap.exists
            assert len(veth.name) <= 15 and len(veth.peer) <= 15 and len(tap.name) <= 15
            add_address(veth.name, "10.99.0.1/24", netns=left.name)
            add_address(veth.peer, "10.99.0.2/24", netns=right.name)
            set_up(veth.name, netns=left.name, mtu=9000)
            set_up(veth.peer, netns=right.name, mtu=9000)
            set_up(tap.name, netns=left.name)
            right.run(["busybox", "ping", "-c", "1", "-W", "5", "10.99.0.1"])
        assert not veth.exists and not tap.exists
        assert left.exists and right.exists
    assert not left.exists and not right.exists


@pytest.mark.slow
def test_tap_and_veth_are_removed_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Tap() as tap, VethPair() as veth:
        assert link_exists(tap.name) and link_exists(veth.name) and link_exists(veth.peer)
        raise RuntimeError("boom")
    assert not link_exists(tap.name) and not link_exists(veth.name) and not link_exists(veth.peer)

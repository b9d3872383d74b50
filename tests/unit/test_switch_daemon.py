"""Switches, host rings and generic ports in a running daemon, with fake front-ends as guests: learning and
flooding through real vhost-user ports, jumbo frames, ports attached and detached at run time (control socket
and CLI) while other traffic flows, a VM on a TAP, and a generic port on a veth pair. Every test runs twice:
with the compiled datapath and with the reference one (VHOSTMAP_REFERENCE_DATAPATH=1)."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap import cli
from vhostmap.control.client import ControlError, call
from vhostmap.forwarding.hostbridge import HostBridge
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.netns import Netns, Tap, VethPair, disable_ipv6, ip

ETH_P_EXPERIMENTAL = 0x88B5
BROADCAST = "ff:ff:ff:ff:ff:ff"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates TAP and veth devices (needs root)")


pytestmark = pytest.mark.usefixtures("datapath")  # every test with both datapaths (conftest)


def mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


def frame(dst: str, src: str, size: int = 60, seq: int = 0) -> bytes:
    """An Ethernet frame with the experimental ethertype whose payload depends on ``seq``."""
    head = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5"
    body = (seq.to_bytes(4, "big") + bytes(range(256)) * (size // 256 + 1))[: size - len(head)]
    return head + body


def switch_stats(d: RunningDaemon, switch: str = "vale0") -> dict[str, Any]:
    return d.daemon.stats({})["switches"][switch]  # type: ignore[no-any-return]


def port_stats(d: RunningDaemon, port: str, switch: str = "vale0") -> dict[str, int]:
    return switch_stats(d, switch)["ports"][port]  # type: ignore[no-any-return]


def nothing_received(fe: FakeFrontend) -> bool:
    """Whether the guest's receive queue got no frame (checked after a frame the same switch round handled
    reached another guest: the switch delivers a batch to every destination in one round)."""
    return fe.used(fe.queues[0]) == []


def control(d: RunningDaemon, op: str, **args: str) -> dict[str, Any]:
    return call(str(d.workdir / "control.sock"), "switch", op=op, **args)


def recv_frames(sock: socket.socket, count: int, timeout: float = 5.0) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"received {len(out)} of {count} frames")
        out.append(sock.recv(1 << 16))
    return out


def packet_socket(ifname: str) -> socket.socket:
    """An AF_PACKET socket on ``ifname`` that sees only frames with the experimental ethertype."""
    s = socket.socket(
        socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.htons(ETH_P_EXPERIMENTAL)
    )
    s.bind((ifname, ETH_P_EXPERIMENTAL))
    return s


# --- learning through vhost-user ports ----------------------------------------------------------------------
def test_three_guests_on_a_switch_learn_and_stop_flooding(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b,c"])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    for fe in (fa, fb, fc):
        fe.post_receive_buffers(32)
    a, b = mac(0xA), mac(0xB)

    fa.transmit([frame(BROADCAST, a, seq=1)])  # an ARP request, say: everyone else gets it
    assert fb.receive(1) == [frame(BROADCAST, a, seq=1)]
    assert fc.receive(1) == [frame(BROADCAST, a, seq=1)]
    fb.transmit([frame(a, b, seq=2)])  # the reply: a is known, only a gets it
    assert fa.receive(1) == [frame(a, b, seq=2)]
    assert nothing_received(fc)

    flooded = port_stats(d, "a")["flooded"]
    for k in range(10):
        fa.transmit([frame(b, a, seq=10 + k)])
        assert fb.receive(1) == [frame(b, a, seq=10 + k)]
        fb.transmit([frame(a, b, seq=20 + k)])
        assert fa.receive(1) == [frame(a, b, seq=20 + k)]
    assert nothing_received(fc)
    sa, sb, sc = port_stats(d, "a"), port_stats(d, "b"), port_stats(d, "c")
    assert (sa["flooded"], sb["flooded"]) == (flooded, 0)  # both learnt: no more flooding
    assert (sa["forwarded"], sb["forwarded"]) == (10, 11)
    assert (sa["tx_frames"], sb["tx_frames"], sc["tx_frames"]) == (11, 11, 1)
    assert [(e["mac"], e["port"]) for e in switch_stats(d)["addresses"]] == [(a, "a"), (b, "b")]
    assert d.totals("c")["tx_packets"] == 1 and d.totals("a")["rx_dropped"] == 0
    sw = d.daemon.switches["vale0"]
    # vhost-user ports only: rounds of vhu_switch_pass
    assert (sw._compiled is not None and bool(sw._compiled._passes)) is not sw.reference


def test_jumbo_frames_cross_the_switch_whole(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "mtu=9000", "b": "mtu=9000", "c": "mtu=9000"}, switches=["vale0=a,b,c"])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    fb.post_receive_buffers(32)
    fc.post_receive_buffers(32)
    jumbos = [frame(BROADCAST, mac(0xA), 9014, k) for k in range(3)]  # flooded: copied, five slots each
    fa.transmit(jumbos)
    assert fb.receive(3) == jumbos and fc.receive(3) == jumbos
    fb.transmit([frame(mac(0xA), mac(0xB))])
    fa.post_receive_buffers(32)
    assert fa.receive(1) == [frame(mac(0xA), mac(0xB))]
    unicast = [frame(mac(0xB), mac(0xA), 9014, 10 + k) for k in range(3)]  # zero copy
    fa.transmit(unicast)
    assert fb.receive(3) == unicast
    assert nothing_received(fc)


def test_a_guest_without_receive_buffers_drops_without_stalling_the_others(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b,c"])
    fa, fb, _fc = d.frontend("a"), d.frontend("b"), d.frontend("c")  # c never posts receive buffers
    total = 1200  # more than c's TX kring holds (1023 slots)
    got: list[bytes] = []
    for start in range(0, total, 100):
        fb.post_receive_buffers(100)
        fa.transmit([frame(BROADCAST, mac(0xA), seq=k) for k in range(start, start + 100)])
        got += fb.receive(100)
        fa.wait_used(fa.queues[1], 100)
    assert got == [frame(BROADCAST, mac(0xA), seq=k) for k in range(total)]
    sc = port_stats(d, "c")
    assert sc["tx_frames"] == 1023 and sc["tx_dropped"] == total - 1023
    assert port_stats(d, "a")["dropped"] == total - 1023


# --- runtime attach and detach ------------------------------------------------------------------------------
class Pump:
    """A thread sending frames a -> b and b -> a through the switch, checking each arrives, until stopped."""

    def __init__(self, fa: FakeFrontend, fb: FakeFrontend) -> None:
        self.fa, self.fb = fa, fb
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pump", daemon=True)

    def _run(self) -> None:
        try:
            a, b = mac(0xA), mac(0xB)
            while not self._stop.is_set():
                k = self.rounds
                batch = [frame(b, a, seq=k * 8 + i) for i in range(8)]
                self.fb.post_receive_buffers(8)
                self.fa.transmit(batch)
                assert self.fb.receive(8) == batch
                self.fa.wait_used(self.fa.queues[1], 8)
                self.fa.post_receive_buffers(1)
                self.fb.transmit([frame(a, b, seq=k)])
                assert self.fa.receive(1) == [frame(a, b, seq=k)]
                self.fb.wait_used(self.fb.queues[1], 1)
                self.rounds += 1
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Pump:
        self._thread.start()
        return self

    def wait_rounds(self, n: int, timeout: float = 10.0) -> None:
        target = self.rounds + n
        deadline = time.monotonic() + timeout
        while self.rounds < target:
            assert self.error is None, f"traffic a<->b failed: {self.error!r}"
            assert time.monotonic() < deadline, "traffic a<->b stopped"
            select.select([], [], [], 0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        assert self.error is None, f"traffic a<->b failed: {self.error!r}"


def test_ports_attach_and_detach_at_run_time_while_others_keep_talking(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b"])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    assert d.daemon.status({})["ports"]["c"]["forwarder"] == "sink c"
    c = mac(0xC)
    with Pump(fa, fb) as pump:
        pump.wait_rounds(20)
        reply = control(d, "attach", switch="vale0", port="c")
        assert reply["ports"] == ["a", "b", "c"]
        pump.wait_rounds(20)
        # c is on the switch now; a frame to its own address is learnt from and filtered, and disturbs nobody
        # (a and b expect nothing but each other's frames).
        fc.transmit([frame(c, c, seq=1)])
        d.wait(lambda: port_stats(d, "c")["filtered"] == 1, "c's frame to be filtered")
        pump.wait_rounds(20)
        control(d, "detach", switch="vale0", port="c")
        assert [e["port"] for e in switch_stats(d)["addresses"]] == ["a", "b"]  # c's address is forgotten
        pump.wait_rounds(20)
    assert d.daemon.status({})["ports"]["c"]["forwarder"] == "sink c"
    fc.transmit([frame(mac(0xA), c, seq=2)])  # detached: back to the sink
    d.wait(lambda: d.totals("c")["rx_dropped"] == 1, "the sink to drop c's frame")
    assert port_stats(d, "a")["dropped"] == port_stats(d, "b")["dropped"] == 0


def test_c_receives_what_the_switch_floods_only_while_attached(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b"])
    fa, fb, fc = d.frontend("a"), d.frontend("b"), d.frontend("c")
    for fe in (fb, fc):
        fe.post_receive_buffers(8)
    fa.transmit([frame(BROADCAST, mac(0xA), seq=1)])
    assert fb.receive(1) == [frame(BROADCAST, mac(0xA), seq=1)]
    assert nothing_received(fc)
    control(d, "attach", switch="vale0", port="c")
    fa.transmit([frame(BROADCAST, mac(0xA), seq=2)])
    assert fb.receive(1) == fc.receive(1) == [frame(BROADCAST, mac(0xA), seq=2)]
    control(d, "detach", switch="vale0", port="c")
    fa.transmit([frame(BROADCAST, mac(0xA), seq=3)])
    assert fb.receive(1) == [frame(BROADCAST, mac(0xA), seq=3)]
    assert nothing_received(fc)


def test_attach_to_a_new_switch_creates_it(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "", "b": ""})
    control(d, "attach", switch="vale1", port="a")
    control(d, "attach", switch="vale1", port="b")
    fa, fb = d.frontend("a"), d.frontend("b")
    fb.post_receive_buffers(1)
    fa.transmit([frame(BROADCAST, mac(0xA))])
    assert fb.receive(1) == [frame(BROADCAST, mac(0xA))]
    assert list(control(d, "list")["switches"]) == ["vale1"]


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("attach", {"switch": "vale0", "port": "nope"}, "no port named 'nope'"),
        ("attach", {"switch": "vale0", "port": "a"}, "already attached to switch 'vale0'"),
        ("attach", {"switch": "vale1", "port": "l1"}, "is in a link"),
        ("attach", {"switch": "bad name", "port": "c"}, "names are 1-32 characters"),
        ("detach", {"switch": "vale9", "port": "a"}, "no switch named 'vale9'"),
        ("detach", {"switch": "vale0", "port": "c"}, "not attached to switch 'vale0'"),
        ("list", {"switch": "vale9"}, "no switch named 'vale9'"),
        ("move", {"switch": "vale0", "port": "c"}, "expected"),
    ],
)
def test_switch_commands_refuse_nonsense_clearly(
    start_daemon: StartDaemon, op: str, args: dict[str, str], message: str
) -> None:
    d = start_daemon({"a": "", "b": "", "c": "", "l1": "", "l2": ""}, ["l1,l2"], switches=["vale0=a,b"])
    with pytest.raises(ControlError, match=message):
        control(d, op, **args)
    assert [p.name for p in d.daemon.switches["vale0"].ports] == ["a", "b"]


def test_the_switch_cli_attaches_detaches_and_lists(
    start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon({"a": "", "b": "", "c": ""}, switches=["vale0=a,b"])
    sock = str(d.workdir / "control.sock")
    assert cli.main(["switch", "attach", "vale0", "c", "--control", sock]) == 0
    assert capsys.readouterr().out == "attached c to vale0\n"
    fa, fc = d.frontend("a"), d.frontend("c")
    fc.post_receive_buffers(1)
    fa.transmit([frame(BROADCAST, mac(0xA))])
    assert fc.receive(1) == [frame(BROADCAST, mac(0xA))]
    assert cli.main(["switch", "list", "--control", sock]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vale0: 3 port(s), 1 address(es), aging 300 s"
    assert out[2].split() == ["a", "1", "0", "1", "0", "0", "0", "0"]
    assert out[4].split() == ["c", "0", "0", "0", "0", "0", "1", "0"]
    assert out[5].startswith(f"  {mac(0xA)} on a (seen ")
    assert cli.main(["switch", "detach", "vale0", "c", "--control", sock]) == 0
    assert capsys.readouterr().out == "detached c from vale0\n"
    assert cli.main(["switch", "detach", "vale0", "c", "--control", sock]) == 1
    assert "not attached" in capsys.readouterr().err
    assert cli.main(["switch", "list", "vale0", "--json", "--control", sock]) == 0
    assert '"aging": 300.0' in capsys.readouterr().out


# --- host rings and generic ports ---------------------------------------------------------------------------
@needs_root
def test_a_vm_on_a_tap_talks_to_the_host_stack(tap: str, start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": f"host={tap}"})
    assert isinstance(d.daemon.serving["a"], HostBridge)
    assert d.daemon.status({})["ports"]["a"]["host"] == tap
    fa = d.frontend("a")
    with packet_socket(tap) as stack:
        up = [frame(mac(0xC), mac(0xA), seq=1), frame(mac(0xC), mac(0xA), 1514, 2)]
        fa.transmit(up)
        assert recv_frames(stack, 2) == up
        down = [frame(mac(0xA), mac(0xC), seq=3), frame(mac(0xA), mac(0xC), 1514, 4)]
        fa.post_receive_buffers(4)
        for f in down:
            stack.send(f)
        assert fa.receive(2) == down
    host = d.daemon.stats({})["ports"]["a"]["host"]
    assert (host["tap"], host["tx_packets"], host["rx_packets"]) == (tap, 2, 2)


@needs_root
def test_an_idle_tap_port_leaves_the_datapath_asleep(tap: str, start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": f"host={tap}"}, switches=["vale0=a"])
    d.frontend("a")
    with packet_socket(tap) as stack:
        for k in range(50):
            stack.send(frame(BROADCAST, mac(0xC), seq=k))
        d.wait(lambda: port_stats(d, "a^")["rx_frames"] == 50, "the switch to take 50 frames from the TAP")
    tid = d.daemon.worker.workers[0]._thread.native_id
    stat = Path(f"/proc/self/task/{tid}/stat")

    def cpu() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(0.5)  # a measurement window, not synchronisation
    assert cpu() - before < 0.1, "the worker spins on a readable fd"


@needs_root
def test_a_port_with_host_rings_on_a_switch_brings_its_host_side(tap: str, start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": f"host={tap}", "b": ""}, switches=["vale0=a,b"])
    assert list(switch_stats(d)["ports"]) == ["a", "a^", "b"]
    fa, fb = d.frontend("a"), d.frontend("b")
    fa.post_receive_buffers(8)
    fb.post_receive_buffers(8)
    with packet_socket(tap) as stack:
        stack.send(frame(BROADCAST, mac(0xC), seq=1))  # the host stack floods: both guests get it
        assert fa.receive(1) == fb.receive(1) == [frame(BROADCAST, mac(0xC), seq=1)]
        fb.transmit([frame(mac(0xC), mac(0xB), seq=2)])  # b answers the host stack, through a's TAP
        assert recv_frames(stack, 1) == [frame(mac(0xC), mac(0xB), seq=2)]
        assert nothing_received(fa)
    assert port_stats(d, "a^")["tx_frames"] == 1 and port_stats(d, "b")["forwarded"] == 1
    compiled = d.daemon.switches["vale0"]._compiled
    assert compiled is None or not compiled._passes  # host rings: the Python round
    control(d, "detach", switch="vale0", port="a")  # back to its TAP alone
    assert isinstance(d.daemon.serving["a"], HostBridge)
    assert list(switch_stats(d)["ports"]) == ["b"]


@needs_root
def test_a_generic_port_on_a_veth_joins_a_switch(veth: VethPair, start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": ""}, switches=["vale0=a,up"], other_ports=[f"up=generic,ifname={veth.name}"])
    assert d.daemon.status({})["ports"]["up"]["ifname"] == veth.name
    fa = d.frontend("a")
    sent = [frame(BROADCAST, mac(0xA), seq=1), frame(BROADCAST, mac(0xA), 1514, 2)]
    with packet_socket(veth.peer) as far:
        fa.transmit(sent)
        assert recv_frames(far, 2) == sent
        fa.post_receive_buffers(2)
        far.send(frame(mac(0xA), mac(0xD), seq=3))
        assert fa.receive(1) == [frame(mac(0xA), mac(0xD), seq=3)]
    totals = d.daemon.stats({})["ports"]["up"]["totals"]
    assert (totals["rx_packets"], totals["tx_packets"]) == (1, 2)


@needs_root
def test_tcp_between_two_host_stacks_through_the_switch_with_their_offloads_on(
    start_daemon: StartDaemon,
) -> None:
    """Two TAPs behind host rings on a switch, each moved into a namespace of its own: the kernel hands the
    TAPs partial checksums and 64 KiB GSO frames (IFF_VNET_HDR, TUNSETOFFLOAD), which both take: they cross
    the switch whole after their headers (NS_VNET_HDR), and a TCP stream crosses intact. Neither end is in
    the test's own namespace: the test runs twice (both datapaths), perhaps at once in two workers, and two
    TAPs there on one subnet sent one run's stream to the other's server (both failed once so)."""
    with Netns() as na, Netns() as nb, Tap() as ta, Tap() as tb:
        for t in (ta, tb):
            disable_ipv6(t.name)
        d = start_daemon({"a": f"host={ta.name}", "b": f"host={tb.name}"}, switches=["vale0=a,b"])
        # Attached first (a TAP is found by name in our namespace), then moved: the open file goes along.
        for tap, ns, addr in ((ta, na, "10.78.0.1/24"), (tb, nb, "10.78.0.2/24")):
            ip("link", "set", "dev", tap.name, "netns", ns.name)
            tap.netns = ns.name
            ip("addr", "add", addr, "dev", tap.name, netns=ns.name)
            ip("link", "set", "dev", tap.name, "up", netns=ns.name)
        serve = (
            "import socket, hashlib; s = socket.create_server(('10.78.0.2', 7777)); c, _ = s.accept(); "
            "h = hashlib.sha256(); d = c.recv(1 << 16)\nwhile d: h.update(d); d = c.recv(1 << 16)\n"
            "print(h.hexdigest())"
        )
        # The client waits for the server to listen (30 s at most), sends 1 MiB and prints its digest.
        send = (
            "import socket, time, hashlib\ndeadline = time.monotonic() + 30\nwhile True:\n    try:\n"
            "        c = socket.create_connection(('10.78.0.2', 7777), timeout=30); break\n"
            "    except OSError:\n        if time.monotonic() > deadline: raise\n        time.sleep(0.05)\n"
            "blob = bytes(k % 253 for k in range(1 << 20)); c.sendall(blob); c.close()\n"
            "print(hashlib.sha256(blob).hexdigest())"
        )
        run = ["ip", "netns", "exec"]
        pipe = {"stdout": subprocess.PIPE, "text": True}
        with (
            subprocess.Popen([*run, nb.name, sys.executable, "-c", serve], **pipe) as server,
            subprocess.Popen([*run, na.name, sys.executable, "-c", send], **pipe) as client,
        ):
            try:
                received, _ = server.communicate(timeout=60)
                sent, _ = client.communicate(timeout=30)
            finally:
                server.kill()
                client.kill()
        assert client.returncode == 0, "the client in namespace a could not connect or send"
        assert received.strip() == sent.strip() != ""
        host = d.stats("a")["host"]
        assert host["rx_offload_passed"] > 0, host
        assert (host["rx_offloaded"], host["rx_bad_header"], host["rx_drops"]) == (0, 0, 0), host

"""The learning switch and the host bridge, driven directly: ports are in-memory adapters whose "wire" the
test holds (frames injected into their RX rings, frames their TX rings send collected), and the forwarder's
run() is called by the test, so every count is exact and no thread or timer is involved. Every test runs
twice: with the switch's compiled kernel and with the reference (VHOSTMAP_REFERENCE_DATAPATH=1)."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator, Sequence

import pytest

from vhostmap.forwarding.hostbridge import HostBridge
from vhostmap.forwarding.rings import move_frames
from vhostmap.forwarding.switch import CompiledMacTable, MacTable, Switch
from vhostmap.netmap.abi import NS_MOREFRAG, NS_NO_LEARN, nm_prev
from vhostmap.netmap.adapter import NetmapAdapter
from vhostmap.netmap.allocator import AllocatorParams, NetmapMemory
from vhostmap.netmap.frames import RxFill, SlotFrames
from vhostmap.netmap.kring import Kring

PARAMS = AllocatorParams(if_num=16, ring_num=96, ring_size=4096, buf_num=4096)
BUF = PARAMS.buf_size
SLOTS = 64
BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac(n: int) -> str:
    """A locally administered unicast address ending in ``n``."""
    return f"02:00:00:00:00:{n:02x}"


def frame(dst: str, src: str, length: int = 60, seq: int = 0) -> bytes:
    """An Ethernet frame from ``src`` to ``dst`` of ``length`` bytes whose payload depends on ``seq``."""
    head = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb5"
    body = (seq.to_bytes(4, "big") + bytes(range(256)) * (length // 256 + 1))[: length - len(head)]
    return head + body


class WirePort(NetmapAdapter):
    """A NIC whose wire the test holds: ``inject`` frames it "receives", ``sent`` lists what it transmitted.

    With ``stalled`` its TX rings take nothing (a guest without receive buffers): they fill up.
    """

    def __init__(self, name: str, memory: NetmapMemory, *, rings: int = 1, slots: int = SLOTS) -> None:
        super().__init__(
            name, memory, num_tx_rings=rings, num_rx_rings=rings, num_tx_desc=slots, num_rx_desc=slots
        )
        self.incoming: list[deque[bytes]] = [deque() for _ in range(rings)]
        self.sent: list[bytes] = []
        self.sent_bufs: list[list[int]] = []
        self.stalled = False

    def inject(self, frames: Sequence[bytes], ring: int = 0) -> None:
        self.incoming[ring].extend(frames)

    def nm_rxsync(self, kring: Kring, flags: int) -> None:
        kring.nr_hwcur = kring.rhead
        queue = self.incoming[kring.ring_id]
        with RxFill(kring, self.memory) as fill:
            while queue and fill.put(queue[0]):
                queue.popleft()

    def nm_txsync(self, kring: Kring, flags: int) -> None:
        n = kring.nkr_num_slots
        if not self.stalled and kring.pending():
            frames = SlotFrames(kring, self.memory, kring.nr_hwcur, kring.pending())
            for i in range(len(frames)):
                self.sent.append(b"".join(bytes(v) for v in frames.payload(i)))
                self.sent_bufs.append([int(frames.bufs[j]) for j in range(frames.starts[i], frames.ends[i])])
            kring.nr_hwcur = (kring.nr_hwcur + frames.slots) % n
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, n)

    def take(self) -> list[bytes]:
        """What was sent since the last call."""
        out, self.sent, self.sent_bufs = self.sent, [], []
        return out


class QueueHostPort:
    """A host stack in memory: ``inject`` frames the stack sends, ``sent`` what was written to it."""

    def __init__(self, adapter: NetmapAdapter) -> None:
        self.adapter = adapter
        self.incoming: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        adapter.host_port = self

    @property
    def name(self) -> str:
        return "stack0"

    @property
    def accepted_offloads(self) -> int:
        return 0  # frames arrive complete

    def pass_offloads(self, needs: int) -> None:
        pass  # it sends none

    def inject(self, frames: Sequence[bytes]) -> None:
        self.incoming.extend(frames)

    def txsync(self, kring: Kring, flags: int) -> None:
        n = kring.nkr_num_slots
        if kring.pending():
            frames = SlotFrames(kring, self.adapter.memory, kring.nr_hwcur, kring.pending())
            self.sent += [b"".join(bytes(v) for v in frames.payload(i)) for i in range(len(frames))]
            kring.nr_hwcur = (kring.nr_hwcur + frames.slots) % n
        kring.nr_hwtail = nm_prev(kring.nr_hwcur, n)

    def rxsync(self, kring: Kring, flags: int) -> None:
        kring.nr_hwcur = kring.rhead
        with RxFill(kring, self.adapter.memory) as fill:
            while self.incoming and fill.put(self.incoming[0]):
                self.incoming.popleft()

    def send_up(self, kring: Kring) -> int:
        return 0

    def wake_fds(self) -> Sequence[int]:
        return [self.fd]

    def close(self) -> None:
        os.close(self.fd)
        self.adapter.host_port = None


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


pytestmark = pytest.mark.usefixtures("datapath")  # every test with both datapaths (conftest)


@pytest.fixture
def mem() -> Iterator[NetmapMemory]:
    with NetmapMemory(PARAMS) as m:
        yield m


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ports(mem: NetmapMemory) -> Iterator[list[WirePort]]:
    """Three ports p0..p2."""
    made = [WirePort(f"p{i}", mem) for i in range(3)]
    yield made
    for p in made:
        p.close()
    assert mem.live_ifs() == []


@pytest.fixture
def switch(ports: list[WirePort], clock: Clock) -> Switch:
    sw = Switch("vale0", clock=clock)
    for p in ports:
        sw.attach(p)
    return sw


def run(sw: Switch) -> None:
    """Run the switch until nothing moves (each run releases what the previous one took)."""
    for _ in range(16):
        if not sw.run():
            return
    raise AssertionError("the switch kept finding work")


def stats(sw: Switch, port: str) -> dict[str, int]:
    s = sw.stats()["ports"]
    assert isinstance(s, dict)
    return dict(s[port])


# --- learning and flooding ----------------------------------------------------------------------------------
def test_unknown_unicast_is_flooded_to_every_other_port_and_never_back(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    f = frame(mac(0xB), mac(0xA))
    p0.inject([f])
    run(switch)
    assert (p0.take(), p1.take(), p2.take()) == ([], [f], [f])
    assert stats(switch, "p0") == {
        "rx_frames": 1,
        "rx_bytes": 60,
        "forwarded": 0,
        "flooded": 1,
        "filtered": 0,
        "dropped": 0,
        "tx_frames": 0,
        "tx_bytes": 0,
        "tx_dropped": 0,
    }
    assert stats(switch, "p1")["tx_frames"] == stats(switch, "p2")["tx_frames"] == 1


def test_broadcast_and_multicast_are_flooded_even_from_a_learnt_address(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    p1.inject([frame(mac(0xA), mac(0x01))])  # p1's address is learnt
    run(switch)
    for p in ports:
        p.take()
    group = frame("01:00:5e:00:00:01", mac(0xA)), frame(BROADCAST, mac(0xA))
    p0.inject(group)
    run(switch)
    assert p1.take() == list(group) and p2.take() == list(group) and p0.take() == []
    assert stats(switch, "p0")["flooded"] == 2


def test_once_both_addresses_are_learnt_frames_go_to_one_port_zero_copy(
    switch: Switch, ports: list[WirePort], mem: NetmapMemory
) -> None:
    p0, p1, p2 = ports
    a, b = mac(0xA), mac(0xB)
    p0.inject([frame(b, a, seq=1)])  # unknown: flooded; a learnt on p0
    run(switch)
    p1.inject([frame(a, b, seq=2)])  # a is known: to p0 only; b learnt on p1
    run(switch)
    for p in ports:
        p.take()
    rx_slot = p0.rx_rings[0].ring.tail  # where p0's next received frame lands
    p0.inject([frame(b, a, seq=3)])
    p0.rxsync(0)
    received_buf = int(p0.rx_rings[0].ring.slots["buf_idx"][rx_slot])
    run(switch)
    assert p1.sent == [frame(b, a, seq=3)] and p2.sent == [] and p0.sent == []
    assert p1.sent_bufs == [[received_buf]]  # the very buffer p0 received into: no copy
    assert {k: stats(switch, "p0")[k] for k in ("forwarded", "flooded")} == {"forwarded": 1, "flooded": 1}
    assert stats(switch, "p1")["forwarded"] == 1
    addresses = switch.stats()["addresses"]
    assert [(e["mac"], e["port"]) for e in addresses] == [(a, "p0"), (b, "p1")]  # type: ignore[index]


def test_a_flooded_frame_is_copied_into_each_destination_buffer(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    f = frame(BROADCAST, mac(0xA), length=1514)
    p0.inject([f])
    run(switch)
    assert p1.sent == [f] and p2.sent == [f]
    [[b1]], [[b2]] = p1.sent_bufs, p2.sent_bufs
    assert b1 != b2


def test_a_flood_with_a_single_destination_moves_zero_copy(ports: list[WirePort], clock: Clock) -> None:
    p0, p1, _ = ports
    sw = Switch("vale1", clock=clock)
    sw.attach(p0)
    sw.attach(p1)
    f = frame(BROADCAST, mac(0xA), length=1514)
    rx_slot = p0.rx_rings[0].ring.tail
    p0.inject([f])
    p0.rxsync(0)
    received_buf = int(p0.rx_rings[0].ring.slots["buf_idx"][rx_slot])
    run(sw)
    assert p1.sent == [f]
    assert p1.sent_bufs == [[received_buf]]  # its only destination took the buffer itself
    assert stats(sw, "p0")["flooded"] == 1


def test_a_frame_to_an_address_learnt_on_its_own_port_is_filtered(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    p0.inject([frame(BROADCAST, mac(0xA)), frame(BROADCAST, mac(0xC))])
    run(switch)
    for p in ports:
        p.take()
    p0.inject([frame(mac(0xC), mac(0xA))])  # both behind p0 (say, a hub): the switch keeps out of it
    run(switch)
    assert (p0.take(), p1.take(), p2.take()) == ([], [], [])
    assert stats(switch, "p0")["filtered"] == 1


def test_a_station_that_moves_is_followed_to_its_new_port(switch: Switch, ports: list[WirePort]) -> None:
    p0, p1, p2 = ports
    p0.inject([frame(BROADCAST, mac(0xA))])
    run(switch)
    p1.inject([frame(BROADCAST, mac(0xA))])  # a moved from p0 to p1
    run(switch)
    for p in ports:
        p.take()
    p2.inject([frame(mac(0xA), mac(0xB))])
    run(switch)
    assert (p0.take(), p1.take()) == ([], [frame(mac(0xA), mac(0xB))])


def test_learnt_addresses_age_out_and_are_flooded_to_again(
    ports: list[WirePort], clock: Clock, mem: NetmapMemory
) -> None:
    sw = Switch("vale0", aging=60, clock=clock)
    for p in ports:
        sw.attach(p)
    p0, p1, p2 = ports
    p0.inject([frame(BROADCAST, mac(0xA))])
    run(sw)
    for p in ports:
        p.take()
    clock.now += 59
    p1.inject([frame(mac(0xA), mac(0xB))])
    run(sw)
    assert (p0.take(), p2.take()) == ([frame(mac(0xA), mac(0xB))], [])
    clock.now += 61  # a was last heard from 120 s ago
    p1.inject([frame(mac(0xA), mac(0xB))])
    run(sw)
    assert (p0.take(), p2.take()) == ([frame(mac(0xA), mac(0xB))], [frame(mac(0xA), mac(0xB))])
    assert [e["mac"] for e in sw.stats()["addresses"]] == [mac(0xB)]  # type: ignore[index]


def test_ns_no_learn_frames_teach_the_switch_nothing(switch: Switch, ports: list[WirePort]) -> None:
    p0 = ports[0]
    p0.inject([frame(BROADCAST, mac(0xA))])
    p0.rxsync(0)
    p0.rx_rings[0].ring.slots["flags"][0] |= NS_NO_LEARN
    run(switch)
    assert switch.stats()["addresses"] == []


def test_the_address_table_is_bounded(ports: list[WirePort], clock: Clock) -> None:
    sw = Switch("vale0", max_addresses=4, clock=clock)
    for p in ports:
        sw.attach(p)
    ports[0].inject([frame(BROADCAST, mac(n)) for n in range(1, 7)])
    run(sw)
    assert len(sw.table) == 4 and sw.table.not_learnt == 2
    clock.now += 301  # old entries make room again
    ports[1].inject([frame(BROADCAST, mac(0x20))])
    run(sw)
    assert [e["mac"] for e in sw.stats()["addresses"]] == [mac(0x20)]  # type: ignore[index]


def test_mac_table_rejects_nonsense() -> None:
    for table in (MacTable, CompiledMacTable):
        with pytest.raises(ValueError, match="aging"):
            table(aging=0)


def test_the_switch_runs_the_selected_implementation(switch: Switch, datapath: str) -> None:
    assert switch.reference == (datapath == "reference")
    assert isinstance(switch.table, MacTable if switch.reference else CompiledMacTable)


# --- malformed frames, full rings, jumbo frames -------------------------------------------------------------
def test_runt_frames_are_dropped_and_counted(switch: Switch, ports: list[WirePort]) -> None:
    p0, p1, _ = ports
    p0.inject([b"\xff" * 10, frame(BROADCAST, mac(0xA))])
    run(switch)
    assert p1.take() == [frame(BROADCAST, mac(0xA))]
    s = stats(switch, "p0")
    assert (s["rx_frames"], s["flooded"], s["dropped"]) == (2, 1, 1)


def test_a_full_destination_drops_and_counts_and_never_stalls_the_others(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    p1.stalled = True
    sent = [frame(BROADCAST, mac(0xA), seq=k) for k in range(SLOTS + 10)]
    for start in range(0, len(sent), 16):
        p0.inject(sent[start : start + 16])
        run(switch)
    assert p2.take() == sent  # the healthy port got everything, in order
    assert p1.take() == []
    s0, s1 = stats(switch, "p0"), stats(switch, "p1")
    assert s1["tx_frames"] == SLOTS - 1  # its TX ring holds all it can, one slot stays empty
    assert s1["tx_dropped"] == s0["dropped"] == len(sent) - (SLOTS - 1)
    p1.stalled = False
    run(switch)  # a run for any reason delivers what waited
    assert p1.take() == sent[: SLOTS - 1]


@pytest.mark.parametrize("flood", [False, True], ids=["unicast", "flooded"])
def test_jumbo_frames_cross_whole_over_several_slots(
    switch: Switch, ports: list[WirePort], flood: bool
) -> None:
    p0, p1, p2 = ports
    a, b = mac(0xA), mac(0xB)
    if not flood:
        p1.inject([frame(BROADCAST, b)])
        run(switch)
        for p in ports:
            p.take()
    jumbos = [frame(b, a, length=9014, seq=k) for k in range(3)]  # five slots each
    p0.inject([jumbos[0], frame(b, a, seq=9), *jumbos[1:]])
    run(switch)
    assert p1.take() == [jumbos[0], frame(b, a, seq=9), *jumbos[1:]]
    assert p2.take() == ([jumbos[0], frame(b, a, seq=9), *jumbos[1:]] if flood else [])


def test_a_jumbo_frame_that_does_not_fit_whole_is_dropped_not_split(
    switch: Switch, ports: list[WirePort]
) -> None:
    p0, p1, p2 = ports
    p1.stalled = True
    small = [frame(BROADCAST, mac(0xA), seq=k) for k in range(SLOTS - 3)]  # leaves two free slots in p1
    p0.inject(small)
    run(switch)
    jumbo = frame(BROADCAST, mac(0xA), length=9014)
    p0.inject([jumbo, frame(BROADCAST, mac(0xA), seq=99)])
    run(switch)
    assert p2.take() == [*small, jumbo, frame(BROADCAST, mac(0xA), seq=99)]
    kring = p1.tx_rings[0]
    assert kring.pending() == SLOTS - 3  # the jumbo took none of the two last slots
    assert stats(switch, "p1")["tx_dropped"] == 2
    flags = kring.ring.slots["flags"][: SLOTS - 3]
    assert not (flags & NS_MOREFRAG).any()


# --- ports come and go --------------------------------------------------------------------------------------
def test_detach_forgets_the_port_and_its_addresses_and_attach_takes_a_new_one(
    switch: Switch, ports: list[WirePort], mem: NetmapMemory
) -> None:
    p0, p1, p2 = ports
    p1.inject([frame(BROADCAST, mac(0xB))])
    run(switch)
    for p in ports:
        p.take()
    switch.detach(p1)
    assert [p.name for p in switch.ports] == ["p0", "p2"]
    assert switch.stats()["addresses"] == []
    p0.inject([frame(mac(0xB), mac(0xA))])  # unknown again: flooded to who is left
    run(switch)
    assert (p1.take(), p2.take()) == ([], [frame(mac(0xB), mac(0xA))])
    with pytest.raises(KeyError):
        switch.detach(p1)
    p3 = WirePort("p3", mem)
    try:
        switch.attach(p3)
        with pytest.raises(ValueError, match="already attached"):
            switch.attach(p3)
        p2.inject([frame(BROADCAST, mac(0xC))])
        run(switch)
        assert p3.take() == [frame(BROADCAST, mac(0xC))]
    finally:
        switch.detach(p3)
        p3.close()


def test_a_switch_whose_ports_all_left_runs_a_round_that_moves_nothing(
    switch: Switch, ports: list[WirePort]
) -> None:
    """The datapath may run a switch once more after its last port left (a wakeup already queued): that round
    moves nothing and raises nothing (it raised, and the datapath dropped the switch, until it did not)."""
    for p in ports:
        switch.detach(p)
    assert switch.ports == []
    assert switch.run() is False
    switch.share_offloads()


def test_ports_with_several_rings_forward_queue_i_to_queue_i(mem: NetmapMemory, clock: Clock) -> None:
    a, b = WirePort("a", mem, rings=2), WirePort("b", mem, rings=2)
    c = WirePort("c", mem, rings=1)
    sw = Switch("vale0", clock=clock)
    for p in (a, b, c):
        sw.attach(p)
    try:
        f0, f1 = frame(BROADCAST, mac(0xA), seq=0), frame(BROADCAST, mac(0xA), seq=1)
        a.inject([f0], ring=0)
        a.inject([f1], ring=1)
        run(sw)
        assert sorted(b.take()) == sorted([f0, f1]) and sorted(c.take()) == sorted([f0, f1])
        assert b.tx_rings[0].nr_hwcur == 1 and b.tx_rings[1].nr_hwcur == 1
    finally:
        for p in (a, b, c):
            p.close()


def test_a_port_with_host_rings_brings_its_host_side_as_a_second_port(
    mem: NetmapMemory, clock: Clock
) -> None:
    vm, uplink = WirePort("vm0", mem), WirePort("uplink", mem)
    host = QueueHostPort(vm)
    sw = Switch("vale0", clock=clock)
    sw.attach(vm)
    sw.attach(uplink)
    try:
        assert [p.name for p in sw.ports] == ["vm0", "vm0^", "uplink"]
        assert host.fd in sw.wake_fds()
        host.inject([frame(BROADCAST, mac(0xC))])  # the host stack speaks: flooded to the VM and the uplink
        run(sw)
        assert vm.take() == uplink.take() == [frame(BROADCAST, mac(0xC))]
        vm.inject([frame(mac(0xC), mac(0xA))])  # the VM answers the host stack only
        run(sw)
        assert host.sent == [frame(mac(0xC), mac(0xA))] and uplink.take() == []
        assert stats(sw, "vm0^")["tx_frames"] == 1 and stats(sw, "vm0")["forwarded"] == 1
        sw.detach(vm)
        assert [p.name for p in sw.ports] == ["uplink"]
    finally:
        vm.close()
        uplink.close()
    assert vm.host_port is None


def test_wake_fds_lists_each_fd_once(mem: NetmapMemory, clock: Clock) -> None:
    vm = WirePort("vm0", mem)
    host = QueueHostPort(vm)
    sw = Switch("vale0", clock=clock)
    sw.attach(vm)
    assert sw.wake_fds() == [host.fd]
    vm.close()


def test_ports_must_share_a_buffer_size(mem: NetmapMemory, clock: Clock) -> None:
    with NetmapMemory(
        AllocatorParams(if_num=2, ring_num=8, ring_size=4096, buf_num=1024, buf_size=4096)
    ) as big:
        a, b = WirePort("a", mem), WirePort("b", big)
        sw = Switch("vale0", clock=clock)
        sw.attach(a)
        with pytest.raises(ValueError, match="4096-byte buffers"):
            sw.attach(b)
        a.close()
        b.close()


def test_ports_of_another_allocator_get_copies(mem: NetmapMemory, clock: Clock) -> None:
    with NetmapMemory(PARAMS) as other:
        a, b = WirePort("a", mem), WirePort("b", other)
        sw = Switch("vale0", clock=clock)
        sw.attach(a)
        sw.attach(b)
        b.inject([frame(BROADCAST, mac(0xB))])
        run(sw)
        a.take()
        f = frame(mac(0xB), mac(0xA), length=3000)
        a.inject([f])
        run(sw)
        assert b.take() == [f]
        a.close()
        b.close()


# --- the host bridge ----------------------------------------------------------------------------------------
def test_the_host_bridge_moves_whole_frames_both_ways(mem: NetmapMemory) -> None:
    vm = WirePort("vm0", mem)
    host = QueueHostPort(vm)
    bridge = HostBridge(vm)
    assert bridge.wake_fds() == [host.fd]
    to_host = [frame(mac(0xC), mac(0xA), seq=1), frame(mac(0xC), mac(0xA), length=9014, seq=2)]
    to_vm = [frame(mac(0xA), mac(0xC), length=5000, seq=3), frame(mac(0xA), mac(0xC), seq=4)]
    vm.inject(to_host)
    host.inject(to_vm)
    while bridge.run():
        pass
    assert host.sent == to_host and vm.take() == to_vm
    vm.close()


def test_the_host_bridge_holds_frames_while_the_vm_takes_none(mem: NetmapMemory) -> None:
    vm = WirePort("vm0", mem, slots=16)
    host = QueueHostPort(vm)
    bridge = HostBridge(vm)
    vm.stalled = True
    frames = [frame(mac(0xA), mac(0xC), seq=k) for k in range(20)]
    host.inject(frames)
    while bridge.run():
        pass
    assert vm.take() == [] and vm.tx_rings[0].pending() == 15
    vm.stalled = False
    while bridge.run():
        pass
    assert vm.take() == frames and bridge.dropped == 0
    vm.close()


def test_a_host_bridge_needs_host_rings(mem: NetmapMemory) -> None:
    vm = WirePort("vm0", mem)
    with pytest.raises(ValueError, match="no host rings"):
        HostBridge(vm)
    vm.close()


def test_move_frames_drops_fragments_that_can_never_end(mem: NetmapMemory) -> None:
    a, b = WirePort("a", mem, slots=8), WirePort("b", mem, slots=8)
    a.inject([frame(BROADCAST, mac(0xA), seq=k) for k in range(7)])
    a.rxsync(0)
    src = a.rx_rings[0].ring
    src.slots["flags"][:7] = NS_MOREFRAG
    assert move_frames(src, b.tx_rings[0].ring, mem.nbufs) == (0, 7)
    assert src.head == 7
    a.close()
    b.close()


def test_switch_state_is_json_friendly(switch: Switch, ports: list[WirePort]) -> None:
    ports[0].inject([frame(BROADCAST, mac(0xA))])
    run(switch)
    state = json.loads(json.dumps(switch.stats()))
    assert state["aging"] == 300.0 and state["addresses"][0]["port"] == "p0"

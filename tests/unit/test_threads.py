"""Several datapath threads (``--cpu 0-1``): receive queues assigned round-robin or pinned, and exactness
through a link and through the switch with fake front-ends as guests: every frame delivered once, in order per
flow, counters that add up, while two threads forward into the same TX rings (a link between ports with
different queue counts, a switch with all-to-all traffic). Every traffic test runs with both datapaths."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from daemons import RunningDaemon, StartDaemon

from vhostmap.cli import main
from vhostmap.daemon.config import ConfigError, build_config
from vhostmap.lab.frontend import FakeFrontend

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="two datapath threads need two usable CPUs")
TWO = f"{CPUS[0]},{CPUS[1]}" if len(CPUS) >= 2 else ""
SIZES = [64, 1500]


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, size: int, flow: int, seq: int) -> bytes:
    """A frame from ``src`` to ``dst`` of ``size`` bytes whose payload says which flow and which one it is."""
    head = dst + src + b"\x88\xb5" + flow.to_bytes(2, "big") + seq.to_bytes(4, "big")
    return head + bytes((seq + i) & 0xFF for i in range(size - len(head)))


def flow_seq(f: bytes) -> tuple[int, int]:
    return int.from_bytes(f[14:16], "big"), int.from_bytes(f[16:20], "big")


def threads(d: RunningDaemon) -> list[list[tuple[str, int]]]:
    """The receive queues of each datapath thread, as `status` shows them."""
    shown = d.daemon.status({})["datapath"]["threads"]
    return [[(q["port"], q["queue"]) for q in t["rx_queues"]] for t in shown]


# --- assignment ---------------------------------------------------------------------------------------------
@needs_two_cpus
def test_receive_queues_go_round_robin_and_status_shows_them(start_daemon: StartDaemon) -> None:
    d = start_daemon({"a": "queues=2", "b": "queues=2", "c": ""}, ["a,b"], cpu=TWO)
    assert threads(d) == [[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("b", 1)]]
    shown = d.daemon.status({})["datapath"]["threads"]
    assert [t["cpu"] for t in shown] == CPUS[:2]
    ids = [w.native_id for w in d.daemon.worker.workers]
    assert [os.sched_getaffinity(i) for i in ids] == [{CPUS[0]}, {CPUS[1]}]  # type: ignore[arg-type]


@needs_two_cpus
@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "not-isolated"])
def test_rxq_affinity_pins_queues_and_the_others_go_round_robin(
    start_daemon: StartDaemon, isolate: bool
) -> None:
    # A thread serving pinned queues gets no other (OVS's pmd-rxq-isolate) unless told otherwise.
    d = start_daemon(
        {"a": f"queues=2,rxq_affinity=0:{CPUS[1]},1:{CPUS[1]}", "b": "queues=2"}, cpu=TWO, rxq_isolate=isolate
    )
    if isolate:
        assert threads(d) == [[("b", 0), ("b", 1)], [("a", 0), ("a", 1)]]
    else:
        assert threads(d) == [[("b", 0)], [("a", 0), ("a", 1), ("b", 1)]]
    shown = d.daemon.status({})["datapath"]["threads"]
    assert [t["isolated"] for t in shown] == [False, isolate]
    pinned = [q["pinned"] for t in shown for q in t["rx_queues"]]
    assert sorted(pinned) == [False, False, True, True]


@needs_two_cpus
def test_when_every_thread_serves_pinned_queues_the_others_still_get_one(
    start_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = start_daemon({"a": f"queues=2,rxq_affinity=0:{CPUS[0]},1:{CPUS[1]}", "b": "queues=2"}, cpu=TWO)
    assert threads(d) == [[("a", 0), ("b", 0)], [("a", 1), ("b", 1)]]
    assert "every datapath thread serves pinned receive queues" in caplog.text


@needs_two_cpus
def test_forwarders_that_cannot_be_split_run_whole_on_one_thread(start_daemon: StartDaemon) -> None:
    # A generator feeds its guest's receive queues alone: one thread runs all of it, on both of the port's
    # queue pairs, while a sink of a 2-queue port is split, each thread draining its own receive queue.
    d = start_daemon({"g": "queues=2,generate=60", "s": "queues=2"}, cpu=TWO)
    placed = {
        name: [
            k for k, w in enumerate(d.daemon.worker.workers) for f in w._forwarders if f.name.startswith(name)
        ]
        for name in ("source g", "sink s")
    }
    assert placed == {"source g": [0], "sink s": [0, 1]}
    fg = d.frontend("g", queue_pairs=2)
    for pair in (0, 1):
        fg.post_receive_buffers(4, pair=pair)
        assert len(fg.receive(4, pair=pair)) == 4


def test_a_pinned_cpu_outside_the_cpu_list_is_refused_at_start(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = f"a=vhost-user,path={sock_dir}/a.sock,queues=2,rxq_affinity=0:{CPUS[0]},1:4095"
    with pytest.raises(ConfigError, match="pins queue 1 to CPU 4095, which runs no datapath thread"):
        build_config(None, [port], cpu=str(CPUS[0]))
    with pytest.raises(ConfigError, match=r"pins queue 0 .*\(datapath CPUs, --cpu / cpu: none given\)"):
        build_config(None, [port])
    argv = ["serve", "--cpu", str(CPUS[0]), "--port", port, "--control", f"{sock_dir}/control.sock"]
    assert main(argv) == 2
    assert "rxq_affinity pins queue 1 to CPU 4095" in capsys.readouterr().err
    assert not list(sock_dir.iterdir())  # nothing was started


def test_cpu_lists_and_rxq_affinity_parse_from_toml_and_flags() -> None:
    toml = {"cpu": "0-1", "ports": {"a": {"path": "/tmp/a.sock", "queues": 2, "rxq_affinity": "0:1,1:0"}}}
    if len(CPUS) >= 2 and CPUS[:2] == [0, 1]:
        config = build_config(toml)
        assert config.cpu == (0, 1) and config.port("a").rxq_affinity == ((0, 1), (1, 0))
    config = build_config(
        None,
        [f"a=vhost-user,path=/tmp/a.sock,queues=2,rxq_affinity=0:{CPUS[0]},1:{CPUS[0]}"],
        cpu=str(CPUS[0]),
    )
    assert config.port("a").rxq_affinity == ((0, CPUS[0]), (1, CPUS[0]))
    with pytest.raises(ConfigError, match=r"rxq_affinity names queue 2; the port has queues 0\.\.1"):
        build_config(None, ["a=vhost-user,path=/tmp/a.sock,queues=2,rxq_affinity=2:0"])
    with pytest.raises(ConfigError, match="QUEUE:CPU pairs"):
        build_config(None, ["a=vhost-user,path=/tmp/a.sock,rxq_affinity=zero"])
    # rxq_isolate: true unless the file says false; the flag (--no-rxq-isolate) wins over the file.
    assert build_config({}).rxq_isolate is True
    assert build_config({"rxq_isolate": False}).rxq_isolate is False
    assert build_config({"rxq_isolate": True}, rxq_isolate=False).rxq_isolate is False
    with pytest.raises(ConfigError, match="rxq_isolate must be true or false"):
        build_config({"rxq_isolate": "no"})


# --- exactness ----------------------------------------------------------------------------------------------
def reclaim(fe: FakeFrontend, pair: int, n: int) -> None:
    """Wait for the device to have taken ``n`` frames transmitted on ``pair`` (their descriptors back)."""
    fe.wait_used(fe.queues[2 * pair + 1], n, timeout=10)


@needs_two_cpus
@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_link_with_two_threads_into_one_tx_ring_delivers_every_frame_once_in_order(
    start_daemon: StartDaemon, size: int, layout: str
) -> None:
    # a's two receive queues are on two threads, and both feed b's single TX ring (both ports' rings split,
    # or both packed).
    packed = layout == "packed"
    option = ",packed=on" if packed else ""
    d = start_daemon({"a": f"queues=2{option}", "b": option.lstrip(",")}, ["a,b"], cpu=TWO)
    assert threads(d) == [[("a", 0), ("b", 0)], [("a", 1)]]
    fa = d.frontend("a", queue_pairs=2, packed=packed)
    fb = d.frontend("b", packed=packed)
    per_round, rounds = 60, 12
    got: list[bytes] = []
    for r in range(rounds):
        fb.post_receive_buffers(2 * per_round)
        for pair in (0, 1):
            fa.transmit(
                [frame(mac(2), mac(1), size, pair, r * per_round + k) for k in range(per_round)], pair=pair
            )
        for pair in (0, 1):
            reclaim(fa, pair, per_round)
        got += fb.receive(2 * per_round, timeout=10)
    sent = 2 * per_round * rounds
    for pair in (0, 1):
        seqs = [s for f, s in map(flow_seq, got) if f == pair]
        assert seqs == list(range(per_round * rounds)), f"flow {pair}: lost, repeated or reordered"
    assert all(len(f) == size for f in got)
    a, b = d.totals("a"), d.totals("b")
    assert (a["rx_packets"], b["tx_packets"], a["rx_dropped"], b["tx_dropped"]) == (sent, sent, 0, 0)
    assert d.stats("a")["queues"][0]["rx_packets"] == d.stats("a")["queues"][1]["rx_packets"] == sent // 2


def all_to_all(
    d: RunningDaemon,
    names: list[str],
    size: int,
    per_pair: int,
    rounds: int,
    packed: frozenset[str] = frozenset(),
) -> None:
    """Every port sends ``per_pair`` frames to every other one per round; checks that each got exactly what
    was sent to it, in order per source, and that the switch's counters agree. The guests of ``packed``
    drive packed rings."""
    fes = [d.frontend(n, packed=n in packed) for n in names]
    n = len(fes)
    for i, fe in enumerate(fes):  # learning: one broadcast each, which everyone else gets
        for other in fes:
            if other is not fe:
                other.post_receive_buffers(1)
        fe.transmit([frame(b"\xff" * 6, mac(i + 1), size, i, 0)])
        reclaim(fe, 0, 1)
        for j, other in enumerate(fes):
            if j != i:
                assert [flow_seq(f) for f in other.receive(1)] == [(i, 0)]
    got: list[list[bytes]] = [[] for _ in fes]
    for r in range(rounds):
        for fe in fes:
            fe.post_receive_buffers(per_pair * (n - 1))
        for i, fe in enumerate(fes):
            batch = [
                frame(mac(j + 1), mac(i + 1), size, i, 1 + r * per_pair + k)
                for k in range(per_pair)
                for j in range(n)
                if j != i
            ]
            fe.transmit(batch)
        for fe in fes:
            reclaim(fe, 0, per_pair * (n - 1))
        for j, fe in enumerate(fes):
            got[j] += fe.receive(per_pair * (n - 1), timeout=20)
    for j, frames in enumerate(got):
        assert all(len(f) == size and f[:6] == mac(j + 1) for f in frames)
        for i in range(n):
            if i != j:
                seqs = [s for f, s in map(flow_seq, frames) if f == i]
                assert seqs == list(range(1, 1 + per_pair * rounds)), f"{names[i]} -> {names[j]}"
    stats = d.daemon.stats({})["switches"]["vale0"]["ports"]
    sent = per_pair * (n - 1) * rounds
    for name in names:
        s = stats[name]
        assert (s["rx_frames"], s["forwarded"], s["flooded"]) == (sent + 1, sent, 1)
        assert (s["tx_frames"], s["dropped"], s["tx_dropped"]) == (sent + n - 1, 0, 0)
        assert d.totals(name)["tx_packets"] == sent + n - 1 and d.totals(name)["rx_packets"] == sent + 1


@needs_two_cpus
@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["split", "mixed"])
def test_a_switch_with_two_threads_delivers_every_frame_once_in_order(
    start_daemon: StartDaemon, size: int, layout: str
) -> None:
    names = ["a", "b", "c", "e"]
    # Mixed: a and b drive packed rings (one on each thread), c and e split ones.
    packed = frozenset({"a", "b"} if layout == "mixed" else ())
    d = start_daemon(
        {n: "packed=on" if n in packed else "" for n in names}, switches=["vale0=a,b,c,e"], cpu=TWO
    )
    assert threads(d) == [[("a", 0), ("c", 0)], [("b", 0), ("e", 0)]]
    all_to_all(d, names, size, per_pair=20, rounds=4, packed=packed)


@needs_two_cpus
def test_sixteen_ports_on_a_switch_all_to_all_with_two_polling_threads(start_daemon: StartDaemon) -> None:
    names = [f"p{k}" for k in range(16)]
    d = start_daemon(dict.fromkeys(names, ""), switches=["vale0=" + ",".join(names)], cpu=TWO, poll=True)
    all_to_all(d, names, 64, per_pair=8, rounds=2)


@needs_two_cpus
@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_attach_detach_and_reconnects_under_two_thread_traffic_lose_nothing(
    start_daemon: StartDaemon, poll: bool
) -> None:
    # While a and b, each on its own datapath thread, exchange frames through the switch, the control plane
    # attaches and detaches c over and over and e's front-end reconnects: a and b get every frame once and in
    # order, no port breaks, and c and e forward afterwards.
    d = start_daemon({"a": "", "b": "", "c": "", "e": ""}, switches=["vale0=a,b,e"], cpu=TWO, poll=poll)
    assert threads(d) == [[("a", 0), ("c", 0)], [("b", 0), ("e", 0)]]
    fa, fb = d.frontend("a"), d.frontend("b")
    for src, dst, n in ((fa, fb, 1), (fb, fa, 2)):  # each learns the other's address
        dst.post_receive_buffers(1)
        src.transmit([frame(mac(3 - n), mac(n), 64, 9, 0)])
        assert len(dst.receive(1)) == 1
    stop = threading.Event()
    churned = [0, 0]

    def churn() -> None:
        while not stop.is_set():
            d.daemon.attach("vale0", "c")
            d.daemon.detach("vale0", "c")
            churned[0] += 1
            if churned[0] % 4 == 0:
                d.frontend("e").close()  # connects, negotiates, leaves
                churned[1] += 1

    churner = threading.Thread(target=churn, name="churn")
    churner.start()
    try:
        # Rounds of traffic until the control plane has churned enough meanwhile (a bound, not a wait).
        per_round, rounds = 40, 0
        got: dict[int, list[bytes]] = {1: [], 2: []}
        while rounds < 10 or churned[0] < 20 or churned[1] < 3:
            assert rounds < 5000, f"the control plane churned too little: {churned}"
            r, rounds = rounds, rounds + 1
            for src, dst, n in ((fa, fb, 1), (fb, fa, 2)):
                dst.post_receive_buffers(per_round)
                src.transmit([frame(mac(3 - n), mac(n), 64, n, r * per_round + k) for k in range(per_round)])
            for src, dst, n in ((fa, fb, 1), (fb, fa, 2)):
                reclaim(src, 0, per_round)
                got[n] += dst.receive(per_round, timeout=10)
    finally:
        stop.set()
        churner.join(30)
    assert not churner.is_alive()
    for n, frames in got.items():
        assert [s for f, s in map(flow_seq, frames) if f == n] == list(range(per_round * rounds))
    assert [d.device(p).broken for p in "abce"] == [None] * 4
    d.daemon.attach("vale0", "c")
    fc = d.frontend("c")
    fc.post_receive_buffers(1)
    fa.transmit([frame(b"\xff" * 6, mac(1), 64, 7, 0)])  # a broadcast reaches c on the switch again
    assert [flow_seq(f) for f in fc.receive(1)] == [(7, 0)]

"""Poll mode and CPU pinning: the datapath thread that never sleeps, and threads pinned where they are told.

A polling worker runs its forwarders pass after pass without any kick; the proof is traffic that front-ends
queue without kicking, which an interrupt-mode worker would never see. Its ports ask drivers not to kick at
all (VRING_USED_F_NO_NOTIFY, or avail_event left alone with EVENT_IDX), as DPDK's polling back-end does.
Pinning is read back from the kernel (``/proc/self/task/TID/status``), and a CPU that does not exist
is refused before anything starts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemons import RunningDaemon, StartDaemon
from test_worker import CountingForwarder

from vhostmap.cli import main
from vhostmap.daemon.config import ConfigError, build_config
from vhostmap.daemon.worker import Worker
from vhostmap.lab.frontend import FakeFrontend, FakeQueue
from vhostmap.lab.wait import wait_until
from vhostmap.system.cpu import format_cpu_list, online_cpus, parse_cpu_list
from vhostmap.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VRING_USED_F_NO_NOTIFY,
    bit,
)

# The CPUs this test may pin to: online and allowed to this process.
USABLE_CPUS = sorted(online_cpus() & os.sched_getaffinity(0))
MISSING_CPU = max(online_cpus()) + 1


def allowed_cpus(tid: int | None) -> set[int]:
    """The CPUs thread ``tid`` of this process may run on, as the kernel reports them."""
    assert tid is not None, "thread not started"
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.partition(":")[2])
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def wait(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    return wait_until(predicate, timeout, what, interval=0.005)


@pytest.fixture
def polling() -> Iterator[Worker]:
    w = Worker(poll=True)
    w.start()
    yield w
    w.stop()


# --- the worker ---------------------------------------------------------------------------------------------


def test_polling_worker_runs_forwarders_again_and_again_without_any_fd(polling: Worker) -> None:
    # No wake fd at all: an interrupt-mode worker runs this forwarder once (when added) and never again.
    fwd = CountingForwarder([])
    polling.add(fwd)
    wait(lambda: fwd.runs >= 1000, "a thousand passes")
    assert polling.poll


def test_polling_worker_ignores_kicks_and_still_runs(polling: Worker) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fwd = CountingForwarder([kick])
        polling.add(fwd)
        os.eventfd_write(kick, 5)
        before = fwd.runs
        wait(lambda: fwd.runs > before + 100, "passes after a kick")
        # Kicks are not even watched, so nobody drained this one.
        assert os.eventfd_read(kick) == 5
    finally:
        polling.stop()
        os.close(kick)


def test_polling_worker_follows_forwarders_added_and_removed(polling: Worker) -> None:
    first, second = CountingForwarder([]), CountingForwarder([])
    polling.add(first)
    wait(lambda: first.runs >= 10, "the first forwarder to run")
    polling.remove(first)
    # remove() took the datapath lock: from here on, the first forwarder cannot run again.
    stopped_at = first.runs
    polling.add(second)
    wait(lambda: second.runs >= 200, "passes with the second forwarder")
    assert first.runs == stopped_at


def test_polling_worker_drops_a_failing_forwarder_and_keeps_the_others(polling: Worker) -> None:
    bad, good = CountingForwarder([], fail=True), CountingForwarder([])
    polling.add(bad)
    polling.add(good)
    wait(lambda: good.runs >= 200, "passes of the good forwarder")
    assert bad.runs == 1


def test_polling_worker_thread_ends_on_stop() -> None:
    w = Worker(poll=True)
    w.start()
    fwd = CountingForwarder([])
    w.add(fwd)
    wait(lambda: fwd.runs >= 10, "passes")
    tid = w.native_id
    assert Path(f"/proc/self/task/{tid}").exists()
    w.stop()
    # join() returns when the Python thread is done; the kernel task goes a moment later.
    wait(lambda: not Path(f"/proc/self/task/{tid}").exists(), "the datapath thread to exit")
    runs = fwd.runs
    w.stop()  # idempotent
    assert fwd.runs == runs


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
@pytest.mark.parametrize("cpu", USABLE_CPUS)
def test_worker_thread_is_pinned_to_its_cpu_and_only_it(cpu: int, poll: bool) -> None:
    mine = allowed_cpus(threading.get_native_id())
    w = Worker(poll=poll, cpu=cpu)
    try:
        w.start()
        assert allowed_cpus(w.native_id) == {cpu}
        assert allowed_cpus(threading.get_native_id()) == mine  # the caller's thread is left alone
    finally:
        w.stop()


@pytest.mark.parametrize("cpu", [MISSING_CPU, 4096, -1])
def test_worker_refuses_a_cpu_that_does_not_exist(cpu: int) -> None:
    with pytest.raises(ValueError, match=rf"datapath CPU {cpu} does not exist \(online CPUs: "):
        Worker(cpu=cpu)


def test_cpu_lists_parse_and_format_like_the_kernel_writes_them() -> None:
    assert parse_cpu_list("0-3,6,8-9\n") == {0, 1, 2, 3, 6, 8, 9}
    assert format_cpu_list({9, 0, 1, 2, 3, 6, 8}) == "0-3,6,8-9"
    assert format_cpu_list({5}) == "5"
    assert parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text()) == online_cpus()


# --- configuration and command line -------------------------------------------------------------------------


def test_config_takes_poll_and_cpus_from_toml_and_flags_override_them() -> None:
    cpu = USABLE_CPUS[-1]
    toml = {"poll": True, "cpu": cpu, "control_cpu": USABLE_CPUS[0]}
    config = build_config(toml, ["a=vhost-user,path=/tmp/a.sock"])
    assert (config.poll, config.cpu, config.control_cpu) == (True, (cpu,), USABLE_CPUS[0])
    config = build_config(dict(toml), ["a=vhost-user,path=/tmp/a.sock"], poll=False, cpu=USABLE_CPUS[0])
    assert (config.poll, config.cpu) == (False, (USABLE_CPUS[0],))
    default = build_config(None, ["a=vhost-user,path=/tmp/a.sock"])
    assert (default.poll, default.cpu, default.control_cpu) == (False, None, None)


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ({"cpu": MISSING_CPU}, {}, f"cpu: datapath CPU {MISSING_CPU} does not exist"),
        ({}, {"control_cpu": MISSING_CPU}, f"control_cpu: control CPU {MISSING_CPU} does not exist"),
        ({"poll": "yes"}, {}, "poll must be true or false"),
        ({"cpu": "one"}, {}, "cpu must be a CPU number or a CPU list"),
        ({"cpu": True}, {}, "cpu must be a CPU number or a CPU list"),
        ({"control_cpu": True}, {}, "control_cpu must be a CPU number"),
    ],
)
def test_config_refuses_bad_poll_and_cpu_settings(
    toml: dict[str, Any], flags: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(toml, ["a=vhost-user,path=/tmp/a.sock"], **flags)


@pytest.mark.parametrize("flag", ["--cpu", "--control-cpu"])
def test_serve_refuses_a_missing_cpu_before_it_starts(
    flag: str, sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", flag, str(MISSING_CPU), "--port", f"a=vhost-user,path={sock_dir}/a.sock"]
    assert main([*argv, "--control", f"{sock_dir}/control.sock"]) == 2
    assert f"CPU {MISSING_CPU} does not exist (online CPUs: " in capsys.readouterr().err
    assert not list(sock_dir.iterdir())  # nothing was started


# --- the daemon ---------------------------------------------------------------------------------------------

StartPolling = Callable[..., RunningDaemon]


@pytest.fixture
def start_polling(start_daemon: StartDaemon) -> StartPolling:
    """``start_daemon`` with the poll and CPU settings given (poll mode by default), and all its checks."""

    def start(
        ports: Mapping[str, str],
        links: Sequence[str] = (),
        *,
        poll: bool = True,
        cpu: int | None = None,
        control_cpu: int | None = None,
        **kwargs: Any,
    ) -> RunningDaemon:
        return start_daemon(ports, links, poll=poll, cpu=cpu, control_cpu=control_cpu, **kwargs)

    return start


def without_kicks(fe: FakeFrontend, monkeypatch: pytest.MonkeyPatch) -> FakeFrontend:
    """Make ``fe`` queue buffers without ever kicking the device."""

    def publish(fq: FakeQueue, heads: list[int], kick: bool = True) -> None:
        FakeFrontend.publish(fe, fq, heads, kick=False)

    monkeypatch.setattr(fe, "publish", publish)
    return fe


def frame(size: int, seq: int) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + bytes([seq % 256]) * (size - 14)


@pytest.mark.parametrize("size", [60, 1514])
def test_polling_daemon_forwards_frames_nobody_kicked_for(
    start_polling: StartPolling, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    d = start_polling({"a": "", "b": ""}, links=["a,b"])
    assert d.daemon.worker.poll
    fa = without_kicks(d.frontend("a"), monkeypatch)
    fb = without_kicks(d.frontend("b"), monkeypatch)
    sent = [frame(size, k) for k in range(32)]
    fb.post_receive_buffers(len(sent))
    fa.transmit(sent)
    assert fb.receive(len(sent), timeout=10) == sent
    for fq in (fa.queues[1], fb.queues[0]):
        with pytest.raises(BlockingIOError):  # never kicked
            os.eventfd_read(fq.kick)
    a, b = d.totals("a"), d.totals("b")
    assert (a["rx_packets"], a["rx_bytes"]) == (len(sent), len(sent) * size)
    assert (b["tx_packets"], b["tx_bytes"]) == (len(sent), len(sent) * size)
    assert a["rx_dropped"] == b["tx_dropped"] == 0


def test_polling_daemon_sink_counts_what_a_lone_port_sends(
    start_polling: StartPolling, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = start_polling({"a": ""})
    fa = without_kicks(d.frontend("a"), monkeypatch)
    for batch in range(4):
        fa.transmit([frame(64, batch * 64 + k) for k in range(64)])
        fa.wait_used(fa.queues[1], 64, timeout=10)
    totals = d.wait(lambda: (t := d.totals("a"))["rx_packets"] == 256 and t, "256 frames in the sink")
    assert totals["rx_dropped"] == 256
    assert d.daemon.serving["a"]._plan is not None  # the sink's rounds were vhu_sink_pass
    assert totals["rx_bytes"] == 256 * 64


def test_daemon_pins_its_datapath_and_control_threads(start_polling: StartPolling) -> None:
    datapath, control = USABLE_CPUS[-1], USABLE_CPUS[0]
    d = start_polling({"a": ""}, cpu=datapath, control_cpu=control)
    assert allowed_cpus(d.daemon.worker.native_id) == {datapath}
    # The control plane is the thread running the daemon's event loop (the main thread of `vhostmap serve`).
    assert allowed_cpus(d.thread.native_id) == {control}
    fa = d.frontend("a")
    fa.transmit([frame(64, k) for k in range(8)])
    d.wait(lambda: d.totals("a")["rx_packets"] == 8, "8 frames in the sink")


def used_flags_and_avail_event(fe: FakeFrontend, fq: FakeQueue) -> tuple[int, int]:
    """used->flags and avail_event (the word after the used ring) of ``fq``, as the driver reads them."""
    mem = fe.mem
    flags = int.from_bytes(mem[fq.used : fq.used + 2], "little")
    at = fq.used + 4 + 8 * fq.num
    return flags, int.from_bytes(mem[at : at + 2], "little")


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_a_polling_daemon_asks_drivers_not_to_kick(
    start_polling: StartPolling, poll: bool, event_idx: bool
) -> None:
    d = start_polling({"a": "", "b": ""}, links=["a,b"], poll=poll)
    features = (
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | (bit(VIRTIO_RING_F_EVENT_IDX) * event_idx)
    )
    fa, fb = d.frontend("a", features=features), d.frontend("b", features=features)
    tx, rx = fa.queues[1], fb.queues[0]
    sent = [frame(60, k) for k in range(8)]
    fb.post_receive_buffers(len(sent))
    fa.transmit(sent)
    assert fb.receive(len(sent), timeout=10) == sent
    # The source's batch completes just after the delivery (one copy): its used entries, then its kick
    # setting.
    done: list[tuple[int, int]] = []
    d.wait(lambda: done.extend(fa.used(tx)) or len(done) == len(sent), "the transmissions to complete")
    for fe, fq in ((fa, tx), (fb, rx)):
        flags, avail_event = used_flags_and_avail_event(fe, fq)
        if event_idx:
            # The flag means nothing with EVENT_IDX: only a device that wants kicks moves avail_event.
            assert flags == 0
            assert avail_event == (0 if poll else fq.avail_idx)
        else:
            assert flags == (VRING_USED_F_NO_NOTIFY if poll else 0)


def _busy(worker: Worker, window: float) -> float:
    """The share of ``window`` seconds in which ``worker`` had work (its idle_ns against the clock)."""
    idle0, clock0 = worker.idle_ns(), time.perf_counter_ns()
    time.sleep(window)  # a measurement window, not synchronisation
    idle1, clock1 = worker.idle_ns(), time.perf_counter_ns()
    return 1 - (idle1 - idle0) / (clock1 - clock0)


@pytest.mark.parametrize("poll", [False, True], ids=["interrupt", "poll"])
def test_a_worker_says_how_much_of_its_time_was_work(poll: bool) -> None:
    # What `vhostmap status` shows per datapath thread and scripts/bench reports per run (datapath busy).
    worker = Worker(poll=poll)
    worker.start()
    try:
        idle = CountingForwarder([])
        worker.add(idle)
        assert _busy(worker, 0.3) < 0.2, "a worker with nothing to do is idle (asleep, or in empty passes)"
        worker.remove(idle)
        assert worker.rounds == 0, "rounds that moved nothing are not counted"
        moves = CountingForwarder([], budget=5)  # moves something in each of its first 5 rounds
        worker.add(moves)
        wait_until(lambda: worker.rounds == 5 and moves.runs > 5, 5, "the 5 rounds that moved and one more")
        worker.remove(moves)
        if poll:
            busy = CountingForwarder([], budget=10**9)  # moves something on every pass
            worker.add(busy)
            assert _busy(worker, 0.3) > 0.9, "a polling worker whose every pass moves something is busy"
            worker.remove(busy)
    finally:
        worker.stop()


def test_status_shows_each_threads_idle_time(start_polling: StartPolling) -> None:
    d = start_polling({"a": ""}, poll=False)
    first = d.daemon.status({})["datapath"]
    second = wait_until(
        lambda: (s := d.daemon.status({})["datapath"])["clock_ns"] > first["clock_ns"] and s,
        5,
        "the clock to move",
    )
    idle = [t["idle_ns"] for t in (first["threads"][0], second["threads"][0])]
    assert 0 <= idle[0] <= idle[1] <= second["clock_ns"]
    assert second["threads"][0]["rounds"] == 0, "nothing was sent: no round moved frames"

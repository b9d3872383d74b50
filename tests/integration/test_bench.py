"""scripts/bench in small: one short P1 round measures both back-ends, one short G1 round moves TSO frames
whole and segmented, one short T1 round copies a file between two guests on every back-end, and nothing
outlives the benchmark, also when it is interrupted with Ctrl-C.

The benchmark runs as its own process in a session of its own, so that every process it started (the
daemon, each testpmd) can be found by session id afterwards, even once reparented to init.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vhostmap.lab.bench import TX_FIRST_BURSTS
from vhostmap.lab.guestkernel import GuestKernel
from vhostmap.lab.testpmd import DEFAULT_BURST, DPDK_RUNTIME, HUGEPAGES
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

QUICK = ["--runs", "1", "--seconds", "1", "--warmup", "0.5", "--sizes", "64", "--only", "P1"]


def session_processes(sid: int) -> dict[int, str]:
    """Live processes of session ``sid``, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def dpdk_files(pid: int) -> list[Path]:
    """Hugepage files and runtime directories of the testpmds process ``pid`` started."""
    return [*HUGEPAGES.glob(f"vhm{pid}t*"), *DPDK_RUNTIME.glob(f"vhm{pid}t*")]


def start_bench(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "vhostmap.lab.bench", *args]
    argv += ["--json-out", str(tmp_path / "bench.json"), "--png", str(tmp_path / "bench.png")]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def assert_nothing_left(proc: subprocess.Popen[str]) -> None:
    left = session_processes(proc.pid)
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    files = dpdk_files(proc.pid)
    assert not left, f"processes left behind: {left}"
    assert not files, f"DPDK files left behind: {files}"


def run_bench(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[str, str, dict[str, Any]]:
    """Run the benchmark to its end: its stdout, stderr and JSON report, nothing of it left behind."""
    proc = start_bench(tmp_path, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        assert_nothing_left(proc)
    assert proc.returncode == 0, err
    return out, err, json.loads((tmp_path / "bench.json").read_text())


def test_a_quick_p1_round_measures_both_backends_over_both_layouts(tmp_path: Path) -> None:
    out, err, report = run_bench(tmp_path, *QUICK, "--layouts", "split,packed")
    assert not report["interrupted"]
    rates = {r["backend"]: r for r in report["results"]}
    assert list(rates) == ["vhostmap", "dpdk", "vhostmap+packed", "dpdk+packed"]
    for r in rates.values():
        assert (r["scenario"], r["size"], len(r["mpps"])) == ("P1", 64, 1)
        assert r["mpps"][0] > 0 and r["median_mpps"] == r["mpps"][0]
    # Each layout is compared with DPDK's over the same one (the bench waited for the port to negotiate it).
    for layout in ("", "+packed"):
        assert rates["vhostmap" + layout]["ratio_to_dpdk"] == pytest.approx(
            rates["vhostmap" + layout]["mpps"][0] / rates["dpdk" + layout]["mpps"][0]
        )
    assert rates["vhostmap"]["round_ratios"] == [pytest.approx(rates["vhostmap"]["ratio_to_dpdk"])]
    # How much of the measured interval vhostmap's datapath thread had work (DPDK's is not known).
    busy = rates["vhostmap"]["datapath_busy"]
    assert len(busy) == 1 and 0 < busy[0] <= 1 and rates["dpdk"]["datapath_busy"] is None
    assert "datapath busy per run:" in out
    # Frames per datapath round that moved frames: at least one (a round counts only if it moved some).
    per_round = rates["vhostmap"]["frames_per_round"]
    assert len(per_round) == 1 and per_round[0] >= 1 and rates["dpdk"]["frames_per_round"] is None
    assert "frames per datapath round:" in out
    assert "P1 dequeue" in out and "vhostmap/DPDK" in out
    # The front-end's and the back-end's CPUs probed around every run, on its progress line, in the table and
    # in the JSON, with the ratio over the rounds whose probes matched (1 round: 0 or 1 of them).
    for r in rates.values():
        [probes] = r["core_round_trip_ns"]
        assert 0 < probes["before"] < 1e6 and 0 < probes["after"] < 1e6, probes
    assert (
        len(re.findall(r"run 1/1: [0-9.]+ Mpps \(.*cores \d+/\d+ ns, windows( [0-9.]+@\d+)+\)", err)) == 4
    ), err
    # ...and between the windows of every run (QUICK measures 1 s: two windows), its processes stopped.
    for r in rates.values():
        [windows] = r["windows"]
        assert len(windows) == 2 and all(w["rate"] > 0 and 0 < w["before"] < 1e6 for w in windows), windows
        assert windows[0]["after"] == windows[1]["before"]
    assert out.count("core round trip per run (ns, before/after):") == 4
    assert re.search(r"matched [01]/1 \(core probes within 1.3x\):", out)
    assert report["core_probe"]["cpus"] == [0, 1]
    assert rates["vhostmap"]["matched_rounds"] in ([], [1])
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is missing" in err
    else:
        assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_a_quick_p3_round_reports_the_frames_each_loop_ran_with(tmp_path: Path) -> None:
    quick = [a if a != "P1" else "P3" for a in QUICK]
    out, err, report = run_bench(tmp_path, *quick)
    rates = {r["backend"]: r for r in report["results"]}
    assert list(rates) == ["vhostmap-link", "vhostmap-switch", "dpdk"]
    injected = 2 * TX_FIRST_BURSTS * DEFAULT_BURST  # tx_first's bursts on both front-end ports
    for r in rates.values():
        assert r["mpps"][0] > 0
        # Frames sent and not received back once the front-end stopped: what circulated, never more than
        # tx_first injected, and some (the rate above came from them).
        [circulating] = r["circulating"]
        assert 0 < circulating <= injected, r
    assert len(re.findall(r"run 1/1: [0-9.]+ Mpps \((.*, )?\d+ frames circulating, cores", err)) == 3, err
    assert out.count("frames circulating per run:") == 3


def test_a_quick_g1_round_moves_tso_frames_whole_and_segmented(tmp_path: Path) -> None:
    out, err, report = run_bench(tmp_path, "--only", "G1", "--runs", "1", "--seconds", "1", "--warmup", "0.5")
    rates = {r["backend"]: r for r in report["results"]}
    assert list(rates) == ["vhostmap-mtu", "vhostmap-tso", "vhostmap-tso-completed", "dpdk"]
    for r in rates.values():
        assert (r["scenario"], r["unit"], r["size"], len(r["gbit_s"])) == ("G1", "Gbit/s", 64000, 1)
        assert r["gbit_s"][0] > 0
    # What vhostmap sent: whole 64000-byte frames (and their headers) to the front-end that takes TSO, each
    # segmented into MTU frames for the one that does not, MTU frames from the plain generator.
    sent = dict(
        re.findall(
            r"G1 TSO enqueue 64000 B, (vhostmap-[a-z-]+), run 1/1: .*?\((\d+ frames segmented, \d+ B)", err
        )
    )
    assert sent["vhostmap-tso"] == "0 frames segmented, 64000 B", err
    completed = re.fullmatch(r"(\d+) frames segmented, (\d+) B", sent["vhostmap-tso-completed"])
    assert completed and int(completed[1]) > 0 and int(completed[2]) <= 1514, err
    assert sent["vhostmap-mtu"] == "0 frames segmented, 1514 B", err
    assert "Gbit/s per run" in out


def test_a_quick_t1_round_copies_a_file_between_guests_on_every_backend(
    tmp_path: Path, guest_kernel: GuestKernel
) -> None:
    # 8 MiB fetched once per back-end, no warm-up: about a minute, nearly all of it booting guests.
    quick = ["--only", "T1", "--runs", "1", "--file-mb", "8", "--seconds", "0.1", "--warmup", "0"]
    out, _, report = run_bench(tmp_path, *quick, timeout=300)
    rates = {r["backend"]: r for r in report["results"]}
    assert list(rates) == ["vhostmap-link", "vhostmap-link-offloads-off", "vhostmap-switch", "dpdk"]
    for r in rates.values():
        assert (r["scenario"], r["unit"], r["file_mib"], len(r["mbit_s"])) == ("T1", "Mbit/s", 8, 1)
        assert r["mbit_s"][0] > 0 and r["median_mbit_s"] == r["mbit_s"][0]
        # Guest A's file and guest B's copy (the benchmark fails a run whose md5s differ).
        [(sent, received)] = r["md5"]
        assert re.fullmatch("[0-9a-f]{32}", sent) and received == sent
    link, off = rates["vhostmap-link"], rates["vhostmap-link-offloads-off"]
    assert link["ratio_to_dpdk"] == pytest.approx(link["mbit_s"][0] / rates["dpdk"]["mbit_s"][0])
    assert link["offload_round_ratios"] == [pytest.approx(link["mbit_s"][0] / off["mbit_s"][0])]
    # With offloads guest A's TCP crosses in frames larger than the MTU (TSO), through vhostmap as through
    # DPDK's tso=1; without them, at most the MTU's.
    for name in ("vhostmap-link", "vhostmap-switch", "dpdk"):
        assert rates[name]["frame_bytes"][0] > 2000, rates[name]
    assert off["frame_bytes"][0] <= 1514 + 12, off  # a frame and its virtio-net header
    # What each back-end dropped meanwhile is counted (vhostmap's port counters, testpmd's forward engine).
    assert all(r["dropped"][0] >= 0 for r in rates.values())
    assert "Mbit/s per run" in out and "over offloads=off:" in out


@pytest.mark.parametrize(
    ("args", "process"),
    [
        pytest.param([*QUICK, "--runs", "3", "--seconds", "30"], "dpdk-testpmd", id="P1"),
        # T1: while the guests boot beside the daemon.
        pytest.param(["--only", "T1", "--runs", "3", "--file-mb", "8"], "qemu-system", id="T1"),
    ],
)
def test_ctrl_c_stops_everything_and_keeps_what_was_measured(
    tmp_path: Path, args: list[str], process: str, request: pytest.FixtureRequest
) -> None:
    if process == "qemu-system":
        request.getfixturevalue("guest_kernel")  # skips without the lab's guest
    proc = start_bench(tmp_path, *args)
    try:
        # Interrupt in the middle of a run: once testpmd (or QEMU) is up beside the daemon.
        wait_until(
            lambda: any(process in c for c in session_processes(proc.pid).values()),
            60,
            f"the benchmark to start {process}",
        )
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to the whole process group
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        assert_nothing_left(proc)
    assert proc.returncode == 130, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["interrupted"]


def test_a_baseline_checkout_runs_in_every_round_and_is_compared(tmp_path: Path) -> None:
    # This checkout as its own baseline: both series are measured, and each round gives a ratio.
    root = Path(__file__).resolve().parents[2]
    out, _, report = run_bench(tmp_path, *QUICK, "--runs", "2", "--baseline", str(root), timeout=180)
    rates = {r["backend"]: r for r in report["results"]}
    assert list(rates) == ["vhostmap", "vhostmap@baseline", "dpdk"]
    assert all(len(r["mpps"]) == 2 and all(m > 0 for m in r["mpps"]) for r in rates.values())
    ours, base = rates["vhostmap"]["mpps"], rates["vhostmap@baseline"]["mpps"]
    assert rates["vhostmap"]["baseline_round_ratios"] == [
        pytest.approx(a / b) for a, b in zip(ours, base, strict=True)
    ]
    assert report["settings"]["baseline"] == str(root)
    assert "over the baseline:" in out


def test_a_baseline_without_built_kernels_is_refused(tmp_path: Path) -> None:
    proc = start_bench(tmp_path, *QUICK, "--baseline", str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and out == ""
    assert f"{tmp_path} is not a vhostmap checkout with its kernels built" in err

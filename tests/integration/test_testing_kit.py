"""The testing kit (vhostmap.testing) as its users meet it: its fixtures build working labs, a failing test's
report shows the guest consoles and the daemon log and leaves nothing behind, a killed session's leftovers are
swept by the next session, and two xdist workers build labs side by side.

The tests that check whole sessions run pytest in a subprocess (pytester) on a small test file, with the
plugin loaded the way users get it: through its ``pytest11`` entry point.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vhostmap.lab.netns import link_exists, netns_exists
from vhostmap.lab.wait import wait_until
from vhostmap.testing import Daemon, Guest, HostNamespace, HostTap, Lab, Testpmd, Topology
from vhostmap.testing.leftovers import sweeps_held

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow

# What an inner test writes about its lab, for the outer test to check afterwards.
REPORT_MADE = """
import json, os
from pathlib import Path

def report_made(topo, where):
    lab = topo.lab
    made = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "gw0"),
        "dir": str(lab.dir),
        "subnet": str(lab.names.subnet),
        "namespaces": [h.name for h in topo.hosts.values()],
        "links": [h.ifname for h in topo.hosts.values()],
        "daemon": topo.vhostmap.pid,
        "qemu": [g.pid for g in topo.guests.values()],
        "macs": [m for g in topo.guests.values() for m in g.macs],
        "control": topo.vhostmap.control,
        "record": str(lab.record.path),
    }
    Path(where).write_text(json.dumps(made))
"""

README = Path(__file__).resolve().parents[2] / "README.md"
SMALL_LAB = {"switches": ["sw0"], "guests": {"vm": {"nics": ["sw0"]}}, "hosts": {"ns": {"switch": "sw0"}}}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def assert_all_gone(made: dict[str, Any]) -> None:
    """Nothing an inner test's lab made is left: processes, directory, namespaces, interfaces, record."""
    assert not any(alive(p) for p in [made["daemon"], *made["qemu"]]), made
    assert not Path(made["dir"]).exists(), made["dir"]
    assert not any(netns_exists(n) for n in made["namespaces"]), made["namespaces"]
    assert not any(link_exists(n) for n in made["links"]), made["links"]
    assert not Path(made["record"]).exists(), made["record"]


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester with the helper its test files import."""
    pytester.makepyfile(report_made=REPORT_MADE)
    return pytester


def test_a_topology_of_two_guests_a_namespace_and_taps_on_a_switch_reaches_everywhere(
    topology: Callable[[dict[str, Any]], Topology],
) -> None:
    """Hosts of both kinds: a namespace behind a veth (h), one around a TAP (t), and a TAP left on the host
    (u, no address); t fetches a file from a guest over TCP, through the TAP's offloads."""
    topo = topology(
        {
            "switches": ["sw0"],
            "guests": {"a": {"nics": ["sw0"]}, "b": {"nics": ["sw0"]}},
            "hosts": {
                "h": {"switch": "sw0"},
                "t": {"switch": "sw0", "kind": "tap"},
                "u": {"switch": "sw0", "kind": "tap", "netns": False},
            },
        }
    )
    a, b, h, t, u = topo.guests["a"], topo.guests["b"], topo.hosts["h"], topo.hosts["t"], topo.hosts["u"]
    assert isinstance(t, HostNamespace) and isinstance(u, HostTap)
    subnet = topo.lab.names.subnet
    assert all(ip is not None and ip.split("/")[0] in [str(x) for x in subnet] for ip in [*a.ips, *b.ips])
    assert len({a.ip, b.ip, h.ip, t.ip}) == 4 and len({*a.macs, *b.macs}) == 2
    assert a.ping(b.ip) == 0.0 and b.ping(h.ip) == 0.0 and h.ping(a.ip)
    assert a.ping(t.ip) == 0.0 and t.ping(b.ip)
    b.run("mkdir -p /srv && dd if=/dev/urandom of=/srv/blob bs=1k count=64 2>/dev/null", check=True)
    b.run("busybox httpd -p 8080 -h /srv", check=True)
    [sent] = b.run("md5sum /srv/blob", check=True).output.split()[:1]
    got = t.run(["sh", "-c", f"busybox wget -q -O - http://{b.ip}:8080/blob | md5sum"], timeout=60)
    assert got.stdout.split()[:1] == [sent], got
    result = a.run(f"echo to {b.ip}; exit 3")
    assert (result.rc, result.output) == (3, f"to {b.ip}\n")
    assert sorted(topo.vhostmap.switches()["sw0"]["ports"]) == ["a.0", "b.0", "h", "t", "t^", "u", "u^"]
    # u is in the host's namespace, up, and got the guests' ARP broadcasts from the switch.
    assert link_exists(u.ifname) and not link_exists(t.inside)
    assert int(Path(f"/sys/class/net/{u.ifname}/statistics/rx_packets").read_text()) > 0


def test_the_fixtures_alone_put_a_guest_on_a_tap_in_a_namespace_and_a_testpmd_on_a_link(
    vhostmap_lab: Lab,
    vhostmap: Callable[..., Daemon],
    guest: Callable[..., Guest],
    netns: Callable[..., HostNamespace],
    testpmd: Callable[..., Testpmd],
) -> None:
    """Guest a's port has its host rings on a TAP, which goes into a namespace; guest b's port is linked to a
    testpmd front-end in icmpecho mode, which answers b's pings to any address."""
    tap = vhostmap_lab.tap_name()
    daemon = vhostmap({"a": f"vhost-user,host={tap}", "b": "vhost-user", "pmd": "vhost-user"}, [("b", "pmd")])
    ns = netns("tapside", tap=tap)
    pmd = testpmd(["pmd"], forward_mode="icmpecho", cpu=0)
    pmd.start()
    a = guest("a", ["a"], wait=False)
    b = guest("b", ["b"])
    vhostmap_lab.wait_guests([a])
    assert a.ping(ns.ip) == 0.0 and ns.ping(a.ip)
    assert b.ping(str(vhostmap_lab.names.subnet[200])) == 0.0
    assert daemon.stats()["pmd"]["totals"]["rx_packets"] >= 3
    assert pmd.file_prefix.startswith("vhk")


def make_wheel(directory: Path) -> Path:
    """A pure-Python wheel of one module, kitdemo (ANSWER = 42), as a user's own package. Byte for byte the
    same every run (fixed timestamps), so the image made with it is a cache hit after the first run."""
    wheel = directory / "kitdemo-1.0-py3-none-any.whl"
    members = {
        "kitdemo/__init__.py": "ANSWER = 42\n",
        "kitdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: kitdemo\nVersion: 1.0\n",
        "kitdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "kitdemo-1.0.dist-info/RECORD": "",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in members.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), text)
    return wheel


def test_guests_on_an_image_extended_with_a_package_a_wheel_and_a_file_have_them_all(
    topology: Callable[[dict[str, Any]], Topology], tmp_path: Path
) -> None:
    """The Python image plus iperf3 (from Debian, with its libraries), a wheel and a file: the guests import
    the wheel, read the file and run iperf3 between them over the switch."""
    (tmp_path / "hello.txt").write_text("hello from the host\n")
    image = {
        "base": "python",
        "packages": ["iperf3"],
        "wheels": [str(make_wheel(tmp_path))],
        "files": {str(tmp_path / "hello.txt"): "/etc/hello.txt"},
    }
    topo = topology(
        {"switches": ["sw0"], "guests": {n: {"nics": ["sw0"], "image": image} for n in ("server", "client")}}
    )
    server, client = topo.guests["server"], topo.guests["client"]
    assert client.run("python3 -c 'import kitdemo; print(kitdemo.ANSWER)'", timeout=60).output == "42\n"
    assert client.run("cat /etc/hello.txt").output == "hello from the host\n"
    server.run("iperf3 -s -D -1", check=True)
    wait_until(lambda: server.run("netstat -ltn | grep -q :5201").rc == 0, 30, "iperf3 to listen")
    result = client.run(f"iperf3 -c {server.ip} -t 2 -J", timeout=60, check=True)
    sent = json.loads(result.output)["end"]["sum_received"]["bytes"]
    assert sent > 1_000_000, result.output[-500:]


def test_vhostmap_image_build_makes_an_image_once_and_boots_it(tmp_path: Path) -> None:
    # New content each run: the first build below is a real one, not a cache hit of an earlier run.
    (tmp_path / "hello.txt").write_text(f"hello {time.time_ns()}\n")
    build = [sys.executable, "-m", "vhostmap.cli", "image", "build"]
    command = [*build, "--file", f"{tmp_path}/hello.txt:/etc/h"]
    # No check=True: a failure's report shows what the command said (a CalledProcessError would not).
    first = subprocess.run([*command, "--boot"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    image = Path(first.stdout.strip())
    assert image.is_file() and "ready" in first.stderr and "booted in" in first.stderr, first.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == str(image) and "(cached)" in again.stderr, again.stderr


def test_the_readme_example_passes_as_a_users_test_file(inner: pytest.Pytester) -> None:
    section = README.read_text().split("## Testing your software in VMs", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README's section has no Python example"
    inner.makepyfile(test_readme=match.group(1))
    inner.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_failing_test_reports_consoles_and_daemon_log_and_leaves_nothing(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_fails=f"""
        from report_made import report_made

        def test_fails(topology):
            topo = topology({SMALL_LAB!r})
            topo.guests["vm"].run("echo a line the console does not have > /dev/console")
            report_made(topo, "made.json")
            assert topo.guests["vm"].run("false").rc == 0
        """
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # The lab's label is w<worker>l<lab>: an outer xdist worker's PYTEST_XDIST_WORKER reaches the inner run.
    assert re.search(r"vhostmap w\d+l0: guest vm console \(booted in", out), out
    assert "a line the console does not have" in out
    assert re.search(r"vhostmap w\d+l0: vhostmap log", out), out
    assert "vhostmap: 1 guest boot(s)" in out
    assert_all_gone(json.loads((inner.path / "made.json").read_text()))


def test_a_killed_session_leaves_what_the_next_session_removes(inner: pytest.Pytester) -> None:
    """Besides the topology, the inner test starts a daemon that gives up root (``--user``), which clears its
    parent-death signal: it outlives the killed session with its sockets and its TAP, until the next
    session's sweep kills it."""
    inner.makepyfile(
        test_killed=f"""
        import json, time
        from pathlib import Path
        from report_made import report_made

        def test_killed(topology, vhostmap_lab):
            topo = topology({SMALL_LAB!r})
            tap = vhostmap_lab.tap_name()
            ports = {{"s": f"vhost-user,host={{tap}}"}}
            stray = vhostmap_lab.vhostmap(ports, name="stray", extra_args=["--user", "nobody"])
            stray_made = {{"pid": stray.pid, "control": stray.control, "socket": str(stray.socket("s"))}}
            Path("stray.json").write_text(json.dumps({{**stray_made, "tap": tap}}))
            report_made(topo, "made.json")
            time.sleep(600)
        """
    )
    made_file = inner.path / "made.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(inner.path), os.environ.get("PYTHONPATH", "")])}
    stray: dict[str, Any] = {}
    try:
        # From the kill to the end of the next session, no other pytest session on the machine sweeps (they
        # skip): what is checked here is what the killed session left, and the next session's sweep (under
        # the lock this test holds) is what removes it.
        with sweeps_held() as held:
            with subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_killed.py"],
                cwd=inner.path,
                env=env,
                stdout=subprocess.DEVNULL,
            ) as session:
                try:
                    wait_until(made_file.exists, 120, "the inner session to build its lab")
                finally:
                    session.send_signal(signal.SIGKILL)
            made = json.loads(made_file.read_text())
            stray = json.loads((inner.path / "stray.json").read_text())
            # QEMU and the lab's daemon die with the session (pdeathsig); the rest stays behind.
            processes = [made["daemon"], *made["qemu"]]
            wait_until(lambda: not any(alive(p) for p in processes), 10, "QEMU and vhostmap to die")
            assert Path(made["dir"]).exists() and Path(made["record"]).exists()
            assert all(netns_exists(n) for n in made["namespaces"])
            assert all(link_exists(n) for n in made["links"])
            assert alive(stray["pid"]) and link_exists(stray["tap"]), stray
            assert Path(stray["control"]).exists() and Path(stray["socket"]).exists(), stray

            inner.makepyfile(test_next="def test_next():\n    pass\n")
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_next.py"],
                cwd=inner.path,
                env={**env, **held.session_env()},
                pass_fds=(held.fd,),
                capture_output=True,
                text=True,
                timeout=120,
            )
        header = result.stdout
        assert result.returncode == 0 and "1 passed" in header, header + result.stderr
        assert "vhostmap.testing: removed leftovers of killed sessions" in header
        assert made["namespaces"][0] in header and made["dir"] in header
        assert f"vhostmap daemon pid {stray['pid']}" in header
        assert_all_gone(made)
        # Killed and waited for by the sweep: gone, and its TAP with it, before the next session's tests ran.
        assert not alive(stray["pid"]) and not link_exists(stray["tap"]), stray
        assert not Path(stray["control"]).exists() and not Path(stray["socket"]).exists(), stray
    finally:
        if stray and alive(stray["pid"]):  # the sweep failed: do not leave it to the next run
            os.kill(stray["pid"], signal.SIGKILL)


def test_two_xdist_workers_build_labs_side_by_side(inner: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    inner.makepyfile(
        test_parallel=f"""
        import os
        import pytest
        from report_made import report_made

        @pytest.mark.parametrize("n", [0, 1])
        def test_lab(topology, n):
            topo = topology({SMALL_LAB!r})
            vm, ns = topo.guests["vm"], topo.hosts["ns"]
            assert vm.ping(ns.ip) == 0.0 and ns.ping(vm.ip)
            report_made(topo, f"made-{{n}}.json")
        """
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=2)
    made = [json.loads((inner.path / f"made-{n}.json").read_text()) for n in (0, 1)]
    # Each worker took one test (two tests, two idle workers), and their labs shared nothing.
    assert {m["worker"] for m in made} == {"gw0", "gw1"}
    for key in ("dir", "subnet", "namespaces", "links", "macs", "control"):
        assert made[0][key] != made[1][key], key
    for m in made:
        assert_all_gone(m)

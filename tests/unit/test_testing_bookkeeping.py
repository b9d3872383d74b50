"""The testing kit's bookkeeping, without VMs: labs' ranges and names never overlap, records of dead
sessions are swept and those of live ones are not, a bad topology is refused naming its entry, a TOML
topology builds what its dict does, and image requests are read as they are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest

from vhostmap.lab.testpmd import HUGEPAGES
from vhostmap.lab.userimage import ImageBuildError
from vhostmap.lab.userimage import build as build_image
from vhostmap.testing import HostNamespace, HostTap, ImageSpec, Lab, LabNames, TopologyError, build
from vhostmap.testing.leftovers import _HUGEPAGE, LAB_ROOT, Record, sweeps_held
from vhostmap.testing.names import worker_index
from vhostmap.testing.topology import image_of, load


def test_labs_of_two_workers_and_two_labs_of_one_worker_share_no_subnet_or_mac() -> None:
    labs = [LabNames(worker=0, index=0), LabNames(worker=0, index=1), LabNames(worker=1, index=0)]
    assert len({lab.subnet for lab in labs}) == 3
    macs = [lab.mac() for lab in labs for _ in range(3)]
    assert len(set(macs)) == 9
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)  # locally administered, unicast
    first = labs[0]
    assert [first.ip(), first.ip()] == ["10.100.1.1/24", "10.100.1.2/24"]


def test_interface_names_fit_ifnamsiz_and_are_never_handed_out_twice() -> None:
    names = [LabNames(worker=7, index=i).ifname(kind) for i in range(50) for kind in "nvt"]
    assert len(set(names)) == len(names)
    assert all(n.startswith("vhk") and len(n.encode()) <= 15 for n in names)


def test_the_worker_index_comes_from_pytest_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert worker_index() == 3 and LabNames.next().worker == 3
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert worker_index() == 0


def test_a_hugepage_prefix_names_its_owner_so_a_sweep_can_tell_it_is_stale() -> None:
    prefix = LabNames(worker=0, index=4).hugepage_prefix()
    match = _HUGEPAGE.match(prefix + "map_0")
    assert match is not None and int(match.group(1)) > 0


def fake_daemon(control: Path) -> subprocess.Popen[bytes]:
    """A process whose command line is a lab daemon's as far as the sweep can tell (``serve --control``)."""
    code = "import time; time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--control", str(control)])


def test_a_dead_sessions_record_is_swept_and_a_live_ones_is_not() -> None:
    """With the daemons: a dead record's, and one in a kit directory no record claims (started before its pid
    was recorded), are killed; a live record's, and one outside the kit's directories, are not."""
    with sweeps_held() as sweep_now:  # no other session on the machine sweeps meanwhile
        finished = subprocess.Popen(["true"])
        finished.wait()  # its pid names a process that no longer runs
        dead_dir, live_dir, lost_dir = (LAB_ROOT / f"vhk-unit-{k}" for k in ("dead", "live", "lost"))
        other_dir = LAB_ROOT / "vhostmap-unit-not-the-kits"
        dirs = (dead_dir, live_dir, lost_dir, other_dir)
        for directory in dirs:
            directory.mkdir()
            (directory / "x.sock").write_text("")
        daemons = {d: fake_daemon(d / "vhostmap-ctl.sock") for d in dirs}
        dead = Record(lab="unitdead", owner=finished.pid, owner_start="0", dirs=[str(dead_dir)])
        dead.daemons.append((daemons[dead_dir].pid, str(dead_dir / "vhostmap-ctl.sock")))
        live = Record(lab="unitlive", dirs=[str(live_dir)])
        live.daemons.append((daemons[live_dir].pid, str(live_dir / "vhostmap-ctl.sock")))
        try:
            dead.save()
            live.save()
            removed = sweep_now()
            assert f"directory {dead_dir}" in removed and f"directory {lost_dir}" in removed
            assert not dead_dir.exists() and not dead.path.exists() and not lost_dir.exists()
            assert live_dir.exists() and live.path.exists() and other_dir.exists()
            for directory in (dead_dir, lost_dir):
                assert f"vhostmap daemon pid {daemons[directory].pid}" in removed
                assert daemons[directory].wait(timeout=10) == -signal.SIGKILL
            assert daemons[live_dir].poll() is None and daemons[other_dir].poll() is None
        finally:
            for proc in daemons.values():
                proc.kill()
                proc.wait()
            for record in (dead, live):
                record.remove()
            for directory in dirs:
                subprocess.run(["rm", "-rf", str(directory)], check=True)


def test_a_sweep_skips_while_sweeps_are_held_and_a_later_one_sweeps() -> None:
    """Another session that starts while a test holds sweeps off leaves what is there (also one that was
    told of the held lock but not given it: an xdist worker of the test's child session); a later one
    removes it, or a child session the holder passed its lock to."""
    lost = LAB_ROOT / "vhk-unit-held"
    other_session = [sys.executable, "-c", "from vhostmap.testing.leftovers import sweep; print(sweep())"]
    run = {"capture_output": True, "text": True, "timeout": 60}
    try:
        for handed_over in (False, True):
            lost.mkdir()
            with sweeps_held() as held:
                skipped = subprocess.run(other_session, check=True, **run)
                assert skipped.stdout.strip() == "[]" and lost.exists(), skipped.stderr
                env = {**os.environ, **held.session_env()}
                told = subprocess.run(other_session, env=env, **run)
                assert told.stdout.strip() == "[]" and lost.exists(), told.stderr
                if handed_over:
                    child = subprocess.run(other_session, env=env, pass_fds=(held.fd,), **run)
                    assert f"directory {lost}" in child.stdout and not lost.exists(), child.stderr
            if not handed_over:
                with sweeps_held() as sweep_now:
                    assert f"directory {lost}" in sweep_now() and not lost.exists()
    finally:
        subprocess.run(["rm", "-rf", str(lost)], check=True)


def test_hugepage_files_of_a_dead_testpmd_owner_are_swept_and_a_live_ones_are_not() -> None:
    with sweeps_held() as sweep_now:  # no other session on the machine sweeps meanwhile
        if not HUGEPAGES.is_dir():
            pytest.skip(f"no {HUGEPAGES}")
        finished = subprocess.Popen(["true"])
        finished.wait()
        dead = HUGEPAGES / f"vhk{finished.pid}t0x0map_0"
        live = HUGEPAGES / f"{LabNames(worker=0, index=9).hugepage_prefix()}map_0"
        try:
            dead.touch()
            live.touch()
            assert f"hugepage file {dead}" in sweep_now()
            assert not dead.exists() and live.exists()
        finally:
            dead.unlink(missing_ok=True)
            live.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"switches": ["sw0"], "vms": {}}, "unknown topology keys ['vms']"),
        ({"switches": ["sw0"], "guests": {"a": {"nics": ["sw1"]}}}, "guest a NIC 0: no switch 'sw1'"),
        ({"guests": {"a": {"nic": ["sw0"]}}}, "guest a: unknown keys ['nic']"),
        ({"guests": {"a": {}}, "hosts": {"a": {"switch": "sw0"}}}, "['a'] name both a guest and a host"),
        (
            {"switches": ["sw0"], "hosts": {"h": {"switch": "sw0", "kind": "tun"}}},
            "h: kind must be veth or tap",
        ),
        (
            {"switches": ["sw0"], "hosts": {"h": {"switch": "sw0", "netns": False}}},
            "h: netns is for kind tap",
        ),
        (
            {"switches": ["sw0"], "hosts": {"h": {"switch": "sw0", "kind": "tap", "netns": "no"}}},
            "h: netns must be true or false, not 'no'",
        ),
        ({"switches": ["sw0"], "hosts": {"h": {"switch": "sw0", "ip": 7}}}, "h: ip must be an address"),
        ({"switches": ["sw0"], "hosts": {"h": {"switch": "sw0", "tap": 1}}}, "h: unknown keys ['tap']"),
        ({"switches": ["sw0"], "hosts": {"h": {"switch": "sw1", "kind": "tap"}}}, "host h: no switch 'sw1'"),
    ],
)
def test_a_bad_topology_is_refused_naming_its_entry(spec: dict[str, object], message: str) -> None:
    with Lab() as lab, pytest.raises(TopologyError) as refused:
        build(lab, spec)
    assert message in str(refused.value)
    assert not lab.dir.exists() and not Path(lab.record.path).exists()


def test_image_files_are_local_colon_absolute_remote() -> None:
    assert ImageSpec.parse_file("conf/a:b.toml:/etc/app.toml") == (Path("conf/a:b.toml"), "/etc/app.toml")
    for bad in ("conf.toml", "conf.toml:etc/app.toml", ":/etc/x"):
        with pytest.raises(ValueError, match="LOCAL:/absolute"):
            ImageSpec.parse_file(bad)


def test_packages_and_wheels_on_the_busybox_image_are_refused_before_anything_is_built() -> None:
    with pytest.raises(ImageBuildError, match="need base python"):
        build_image(ImageSpec(base="busybox", packages=("iperf3",)))


def test_a_topology_image_table_becomes_an_image_spec_with_python_as_the_base_for_packages() -> None:
    spec = image_of("vm", {"packages": ["iperf3"], "files": {"a.txt": "/etc/a.txt"}})
    assert spec == ImageSpec(base="python", packages=("iperf3",), files=((Path("a.txt"), "/etc/a.txt"),))
    assert image_of("vm", "busybox") == "busybox"
    with pytest.raises(TopologyError, match="unknown image keys"):
        image_of("vm", {"pkgs": ["x"]})


TOML_TOPOLOGY = """
[switches.sw0]
aging = 300

[switches.sw1]

[guests.server]
nics = ["sw0", { switch = "sw1", ip = "10.9.9.1/24", mtu = 9000 }]
image = "python"
memory_mb = 512
cmdline = "quiet"

[guests.client]
nics = [{ switch = "sw1", ip = false }]
image = { base = "python", packages = ["iperf3"], files = { "conf/app.toml" = "/etc/app.toml" } }

[hosts.ns0]
switch = "sw0"
ip = "10.9.8.1/24"
"""

SAME_AS_DICT = {
    "switches": {"sw0": {"aging": 300}, "sw1": {}},
    "guests": {
        "server": {
            "nics": ["sw0", {"switch": "sw1", "ip": "10.9.9.1/24", "mtu": 9000}],
            "image": "python",
            "memory_mb": 512,
            "cmdline": "quiet",
        },
        "client": {
            "nics": [{"switch": "sw1", "ip": False}],
            "image": {"base": "python", "packages": ["iperf3"], "files": {"conf/app.toml": "/etc/app.toml"}},
        },
    },
    "hosts": {"ns0": {"switch": "sw0", "ip": "10.9.8.1/24"}},
}


class RecordingLab:
    """What `build` asks of a `Lab`, written down instead of done: no daemon, namespace or guest is made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def netns(self, name: str, *, address: str | None = None, tap: str | None = None) -> HostNamespace:
        self.calls.append(("netns", (name, address, *([tap] if tap else []))))
        veth = None if tap else f"veth-{name}"
        return HostNamespace(f"ns-{name}", address or "", ifname=veth, inside=tap or "eth0")

    def tap_name(self) -> str:
        self.calls.append(("tap_name", ()))
        return f"tap{sum(c[0] == 'tap_name' for c in self.calls)}"

    def host_tap(self, name: str, tap: str, *, address: str | None = None) -> HostTap:
        self.calls.append(("host_tap", (name, tap, address)))
        return HostTap(name, tap, address)

    def vhostmap(self, ports: dict[str, str], switches: dict[str, list[str]]) -> str:
        self.calls.append(("vhostmap", (ports, switches)))
        return "daemon"

    def nic(self, port: str, *, ip: object, mtu: int | None) -> tuple[str, object, int | None]:
        return (port, ip, mtu)

    def guest(self, name: str, nics: list[object], **options: Any) -> str:
        self.calls.append(("guest", (name, nics, options)))
        return f"guest {name}"

    def wait_guests(self, guests: Any) -> None:
        self.calls.append(("wait", list(guests)))


def test_a_topology_toml_file_builds_the_same_lab_as_its_dict(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(TOML_TOPOLOGY)
    assert load(path) == load(str(path)) == SAME_AS_DICT
    from_file, from_dict = RecordingLab(), RecordingLab()
    topo = build(cast(Lab, from_file), path)
    build(cast(Lab, from_dict), SAME_AS_DICT)
    assert from_file.calls == from_dict.calls
    assert from_file.calls[:2] == [
        ("netns", ("ns0", "10.9.8.1/24")),
        (
            "vhostmap",
            (
                {
                    "ns0": "generic,ifname=veth-ns0",
                    "server.0": "vhost-user",
                    "server.1": "vhost-user",
                    "client.0": "vhost-user",
                },
                {"sw0": ["ns0", "server.0", "aging=300"], "sw1": ["server.1", "client.0"]},
            ),
        ),
    ]
    (_, server), (_, client), wait = from_file.calls[2:]
    assert server[:2] == ("server", [("server.0", True, None), ("server.1", "10.9.9.1/24", 9000)])
    assert (
        server[2]["image"] == "python" and server[2]["memory_mb"] == 512 and server[2]["cmdline"] == "quiet"
    )
    assert server[2]["wait"] is False  # the guests boot side by side; build waits for all of them at the end
    assert client[:2] == ("client", [("client.0", None, None)])
    assert client[2]["image"] == ImageSpec(
        base="python", packages=("iperf3",), files=((Path("conf/app.toml"), "/etc/app.toml"),)
    )
    assert wait == ("wait", ["guest server", "guest client"])
    assert set(topo.guests) == {"server", "client"} and topo.hosts["ns0"].ifname == "veth-ns0"


def test_a_bad_topology_toml_file_is_refused_like_its_dict(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('switches = ["sw0"]\n[guests.a]\nnics = ["sw1"]\n')
    with Lab() as lab, pytest.raises(TopologyError, match="guest a NIC 0: no switch 'sw1'"):
        build(lab, path)
    bad = tmp_path / "not.toml"
    bad.write_text("switches = [sw0\n")
    with Lab() as lab, pytest.raises(tomllib.TOMLDecodeError):
        build(lab, bad)


def test_tap_hosts_are_the_host_rings_of_a_port_moved_into_a_namespace_or_left_on_the_host() -> None:
    """A TAP host is a front-end-less vhost-user port with ``host=`` on its switch; once the daemon has made
    the TAP, it goes into a namespace with an address (the default) or stays on the host."""
    spec = {
        "switches": ["sw0"],
        "guests": {"vm": {"nics": ["sw0"]}},
        "hosts": {
            "veth": {"switch": "sw0"},
            "inns": {"switch": "sw0", "kind": "tap", "ip": "10.9.8.7/24"},
            "bare": {"switch": "sw0", "kind": "tap", "netns": False},
        },
    }
    lab = RecordingLab()
    topo = build(cast(Lab, lab), spec)
    assert lab.calls[:4] == [
        ("netns", ("veth", None)),
        ("tap_name", ()),
        ("tap_name", ()),
        (
            "vhostmap",
            (
                {
                    "veth": "generic,ifname=veth-veth",
                    "inns": "vhost-user,host=tap1",
                    "bare": "vhost-user,host=tap2",
                    "vm.0": "vhost-user",
                },
                {"sw0": ["veth", "inns", "bare", "vm.0"]},
            ),
        ),
    ]
    # The TAPs exist once the daemon runs, and are placed before the guests start.
    assert lab.calls[4:6] == [
        ("netns", ("inns", "10.9.8.7/24", "tap1")),
        ("host_tap", ("bare", "tap2", None)),
    ]
    assert [c[0] for c in lab.calls[6:]] == ["guest", "wait"]
    inns, bare = topo["inns"], topo["bare"]
    assert isinstance(inns, HostNamespace) and inns.inside == "tap1" and inns.ip == "10.9.8.7"
    assert isinstance(bare, HostTap) and bare.ifname == "tap2"
    with pytest.raises(ValueError, match="no address"):
        bare.ip  # noqa: B018 (the property raises)

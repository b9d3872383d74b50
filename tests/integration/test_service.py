"""vhostmap as a service: service/vhostmap.service with service/vhostmap.toml, checked by systemd-analyze and
run by the same command lines the unit gives (this machine's PID 1 is not systemd, so nothing can start the
unit itself) under a real systemd-journald, with the notification socket systemd would give it.

What a permanent host expects of it: the unit is valid; READY=1 comes once it serves, as the user the unit
names with no capability left; it still takes traffic (dpdk-testpmd) and its TAP exists; a broken guest is
in the journal with the port, queue and reason as fields; SIGTERM says STOPPING=1, exits 0 and removes its
sockets although root created them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from vhostmap.control.client import call
from vhostmap.lab.frontend import FakeFrontend
from vhostmap.lab.testpmd import Testpmd, VirtioUserPort
from vhostmap.lab.wait import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UNIT, CONFIG = ROOT / "service" / "vhostmap.service", ROOT / "service" / "vhostmap.toml"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNALD = "/lib/systemd/systemd-journald"
# The unprivileged user the test's daemon becomes (the unit's `vhostmap`, which a host creates).
USER, GROUP = "nobody", "nogroup"


def journal_listening() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(JOURNAL_SOCKET)
        except OSError:
            return False
    return True


@contextmanager
def journald() -> Iterator[None]:
    """A systemd-journald to log to: the machine's, or one started for the test (and stopped after)."""
    if journal_listening():
        yield
        return
    made = (
        {p.name for p in Path(JOURNAL_SOCKET).parent.glob("*")}
        if Path(JOURNAL_SOCKET).parent.exists()
        else set()
    )
    proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(journal_listening, 10, "systemd-journald to listen")
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        for p in Path(JOURNAL_SOCKET).parent.glob("*"):
            if p.name not in made and p.is_socket():
                p.unlink()


def unit_for_test(run_dir: Path, config: Path) -> str:
    """The unit with this checkout's vhostmap, a run directory and configuration of the test's, and a user
    that exists here."""
    return (
        UNIT.read_text()
        .replace("/opt/vhostmap/.venv/bin/vhostmap", f"{sys.executable} -m vhostmap.cli")
        .replace("/run/vhostmap", str(run_dir))
        .replace("/etc/vhostmap/vhostmap.toml", str(config))
        .replace("-o vhostmap -g vhostmap", f"-o {USER} -g {GROUP}")
        .replace("--user vhostmap", f"--user {USER}")
    )


def unit_command(unit: str, key: str) -> list[str]:
    [line] = [line for line in unit.splitlines() if line.startswith(f"{key}=")]
    return shlex.split(line.split("=", 1)[1])


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not Path(JOURNALD).exists(), reason="systemd is installed by scripts/setup")
def test_the_unit_runs_the_daemon_as_a_user_with_journal_fields_and_readiness(tmp_path: Path) -> None:
    run_dir = Path(f"/run/vhostmap-test-{os.getpid()}")
    tap = f"vhmsvc{os.getpid() % 10000}"
    config = tmp_path / "vhostmap.toml"
    config.write_text(
        CONFIG.read_text()
        .replace("/run/vhostmap", str(run_dir))
        .replace('"vhm0"', f'"{tap}"')
        .replace("127.0.0.1:9447", f"127.0.0.1:{free_tcp_port()}")
    )
    unit = unit_for_test(run_dir, config)
    (tmp_path / "vhostmap.service").write_text(unit)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "vhostmap.service")], capture_output=True, text=True
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, ""), "systemd-analyze verify"

    # As systemd's /run/systemd/notify: a socket the daemon can still write to once it is the user.
    notify_path = Path(f"/run/vhostmap-test-{os.getpid()}.notify")
    stderr_path = tmp_path / "stderr"
    with ExitStack() as stack:
        stack.enter_context(journald())
        stack.callback(shutil.rmtree, run_dir, True)
        notifications = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notifications.bind(str(notify_path))
        stack.callback(notify_path.unlink)
        notify_path.chmod(0o666)
        notifications.settimeout(30)
        subprocess.run(unit_command(unit, "ExecStartPre"), check=True)
        stderr = stack.enter_context(open(stderr_path, "wb"))
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        daemon = stack.enter_context(
            subprocess.Popen(unit_command(unit, "ExecStart"), stderr=stderr, env=env)
        )
        stack.callback(lambda: daemon.poll() is None and daemon.kill())
        assert notifications.recv(4096) == b"READY=1", "the daemon's readiness"

        # Root did the setup; the daemon is the user now, without any capability or way back.
        status = status_fields(daemon.pid)
        nobody = subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True).stdout.strip()
        assert status["Uid"].split() == [nobody] * 4
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
        assert subprocess.run(["ip", "link", "show", tap], capture_output=True).returncode == 0

        # It serves: testpmd sends into vm0, the switch floods to vm1 (no guest: dropped) and the host's TAP.
        control = str(run_dir / "control.sock")

        def vm0_received() -> int:
            return int(call(control, "stats")["ports"]["vm0"]["totals"]["rx_packets"])

        with Testpmd([VirtioUserPort(run_dir / "vm0.sock")], forward_mode="txonly") as tp:
            tp.start()
            tp.wait_for_packets(1000, direction="tx")
            sent = tp.stop()[0].tx_packets
            # Still connected: frames testpmd queued but the daemon has not taken yet would go with the
            # connection (a busy machine leaves some), so the count is awaited before testpmd leaves.
            wait_until(
                lambda: vm0_received() == sent,
                30,
                f"{sent} frames from testpmd in vm0",
                details=lambda: f"vm0 received {vm0_received()}",
            )

        # A guest that breaks its ring: the journal has the port, queue and reason as fields.
        with FakeFrontend(str(run_dir / "vm1.sock")) as fe:
            fe.connect()
            fe.negotiate()
            fe.write_desc(fe.queues[1], 0, 1 << 50, 64, 0)
            fe.publish(fe.queues[1], [0])

            def broken_in_journal() -> dict[str, str] | None:
                out = subprocess.run(
                    [
                        "journalctl",
                        "-o",
                        "json",
                        "--no-pager",
                        f"_PID={daemon.pid}",
                        "SYSLOG_IDENTIFIER=vhostmap",
                    ],
                    capture_output=True,
                    text=True,
                ).stdout
                entries = [json.loads(line) for line in out.splitlines()]
                return next((e for e in entries if "device broken" in e.get("MESSAGE", "")), None)

            entry = wait_until(broken_in_journal, 30, "the broken device in the journal")
        print(json.dumps({k: v for k, v in entry.items() if not k.startswith("_")}, indent=1))
        assert entry["PORT"] == "vm1" and entry["QUEUE"] == "1" and entry["PRIORITY"] == "3"
        assert "guest address in no region" in entry["REASON"] and entry["REASON"] in entry["MESSAGE"]

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert notifications.recv(4096) == b"STOPPING=1"
        assert sorted(p.name for p in run_dir.iterdir()) == [], "sockets left behind by the daemon"
    assert stderr_path.read_bytes() == b"", "everything went to the journal"
